"""A library that stays captioned from the command line: reused copies, prune, read-only databases."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from caption_cli.store import Store
from tests.test_cli_annotate import db, fake, photos, rows, run  # noqa: F401 - fixtures
from tests.test_pipeline import make_photos


def test_annotate_reports_reused_copies_and_missing_files(fake, photos: Path, db: Path, tmp_path: Path):
    assert run("annotate", photos, "--db", db, "--workers", "0").exit_code == 0
    shutil.copytree(photos, tmp_path / "photos" / "copy")
    (photos / "a" / "p001.png").unlink()

    result = run("annotate", photos, "--db", db, "--workers", "0", "--json")

    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(line["reused"] for line in lines if line["status"] == "ok") == [True, True, True]
    assert "Captioned 0, reused 3, skipped 2, failed 0" in result.stderr
    assert "1 stored file(s) no longer exist (caption-cli prune forgets them)" in result.stderr


def test_prune_dry_run_lists_then_prune_removes(fake, photos: Path, db: Path):
    run("annotate", photos, "--db", db, "--workers", "0")
    gone = photos / "b" / "p000.png"
    gone.unlink()
    run("annotate", photos, "--db", db, "--workers", "0")

    dry = run("prune", "--db", db, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert f"would remove: {gone}" in dry.stdout and "(dry run: nothing was changed)" in dry.stdout
    assert len(rows(db)) == 3

    done = run("prune", "--db", db, "--json")
    assert done.exit_code == 0 and json.loads(done.stdout) == {"removed": [str(gone)], "back": [], "dry_run": False}
    assert [Path(path) for path, *_ in rows(db)] == sorted(p for p in photos.rglob("*.png"))
    assert "0 row(s) of missing files removed." in run("prune", "--db", db).stdout


def test_prune_without_a_database_is_a_usage_error(db: Path):
    result = run("prune", "--db", db)
    assert result.exit_code == 2 and "no caption database" in result.output


def test_show_finds_a_photo_through_a_symlinked_folder(fake, photos: Path, db: Path, tmp_path: Path):
    os.symlink(photos, tmp_path / "alias")
    run("annotate", tmp_path / "alias", "--db", db, "--workers", "0")
    assert {Path(path).parent.parent for path, *_ in rows(db)} == {photos}  # real paths stored
    shown = run("show", tmp_path / "alias" / "a" / "p001.png", "--db", db)
    assert shown.exit_code == 0 and "a green square" in shown.stdout


def _captioned_db(tmp_path: Path) -> Path:
    from tests.test_pipeline import FakeCaptioner
    from caption_cli.pipeline import AnnotateOptions, annotate

    folder = tmp_path / "archive"
    make_photos(folder / "photos", 4)
    db_path = folder / "captions.db"
    with Store(db_path) as store:
        annotate([folder / "photos"], FakeCaptioner(), store, AnnotateOptions(workers=0))
    assert not Path(f"{db_path}-wal").exists()  # the last close checkpointed everything
    return db_path


def _reading_commands(db_path: Path, out: Path) -> list[list[str]]:
    return [["search", "green", "--db", str(db_path), "--json"],
            ["show", str(db_path.parent / "photos" / "a" / "p001.png"), "--db", str(db_path)],
            ["report", "--db", str(db_path), "--out", str(out), "--workers", "1"]]


def test_reading_commands_serve_a_database_whose_wal_files_cannot_be_created(tmp_path: Path):
    db_path = _captioned_db(tmp_path)
    for suffix in ("-shm", "-wal"):  # something else holds those names: SQLite cannot create them
        Path(f"{db_path}{suffix}").mkdir()
    with pytest.raises(Exception):  # the plain (writable, WAL) open fails here ...
        Store(db_path)
    for args in _reading_commands(db_path, tmp_path / "report"):  # ... the reading commands do not
        result = run(*args)
        assert result.exit_code == 0, (args, result.output)
    assert "a green square" in run(*_reading_commands(db_path, tmp_path)[1]).stdout
    assert (tmp_path / "report" / "index.html").is_file()


def _read_only_prefix(folder: Path) -> list[str]:
    """A command prefix that runs with folder read-only: a read-only bind mount in a
    private mount namespace as root (chmod does not stop root), chmod otherwise."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return []
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind -o ro '{folder}' '{folder}'"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a read-only folder here as root: {probe.stderr.decode().strip()}")
    return ["unshare", "-m", "sh", "-c", f"mount --bind -o ro '{folder}' '{folder}' && exec \"$@\"", "sh"]


def test_reading_commands_serve_a_database_in_a_read_only_folder(tmp_path: Path):
    db_path = _captioned_db(tmp_path)
    prefix = _read_only_prefix(db_path.parent)
    try:
        cli = [sys.executable, "-m", "caption_cli"]
        touch = subprocess.run(prefix + ["touch", str(db_path.parent / "x")], capture_output=True)
        assert touch.returncode != 0  # the folder really is read-only
        for args in _reading_commands(db_path, tmp_path / "report"):
            result = subprocess.run(prefix + cli + args, capture_output=True, text=True, timeout=120)
            assert result.returncode == 0, (args, result.stderr)
        found = subprocess.run(prefix + cli + _reading_commands(db_path, tmp_path)[0], capture_output=True,
                               text=True, timeout=120)
        assert [hit["caption"] for hit in json.loads(found.stdout)] == ["a green square"]
        written = subprocess.run(prefix + cli + ["prune", "--db", str(db_path)], capture_output=True,
                                 text=True, timeout=120)
        assert written.returncode == 1 and str(db_path) in written.stderr  # writing fails, clearly
    finally:
        db_path.parent.chmod(0o755)
