"""The write-metadata command: database rows -> metadata, exit codes, --json, --dry-run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from caption_cli.cli import app
from caption_cli.results import Alternative, Caption, CaptionResult
from caption_cli.store import Store

EXIFTOOL = shutil.which("exiftool")
if EXIFTOOL is None and not os.environ.get("CI"):
    pytest.skip("exiftool is not installed (apt install libimage-exiftool-perl)", allow_module_level=True)

MODEL_ID = "sat-lite0-flickr8k@0123456789ab"


def tags(path: Path) -> dict:
    done = subprocess.run([EXIFTOOL, "-j", "-G1", str(path)], capture_output=True, text=True, encoding="utf-8")
    return json.loads(done.stdout)[0]


def captioned(path: Path, text: str, confidence: float | None = 0.9) -> CaptionResult:
    words = text.split()
    info = path.stat()
    caption = Caption(text, -0.5, words, np.full((len(words), 7, 7), 1 / 49, np.float32),
                      [Alternative(text, -0.5, confidence)], confidence=confidence)
    return CaptionResult(path, info.st_size, info.st_mtime, "ok", 64, 48, caption=caption)


@pytest.fixture
def library(tmp_path: Path) -> tuple[Path, Path]:
    """Photos in two folders plus a database: three captioned, one failed."""
    photos = tmp_path / "photos"
    (photos / "trip").mkdir(parents=True)
    for name, colour in [("dog.jpg", (40, 140, 60)), ("cat.png", (200, 40, 30)), ("trip/boat.webp", (0, 0, 200))]:
        Image.new("RGB", (64, 48), colour).save(photos / name)
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    db = tmp_path / "captions.db"
    with Store(db) as store:
        run = store.start_run(MODEL_ID, "cpu", ["annotate"])
        broken = photos / "broken.jpg"
        store.write_batch(
            [
                captioned(photos / "dog.jpg", "a dog runs on the grass"),
                captioned(photos / "cat.png", "eine Katze schläft — 猫"),
                captioned(photos / "trip/boat.webp", "a boat on the water"),
                CaptionResult(broken, broken.stat().st_size, broken.stat().st_mtime, "error", error="cannot decode"),
            ],
            MODEL_ID,
            run,
        )
    return photos, db


def flat(text: str) -> str:
    """Typer's boxed usage errors as one plain line."""
    return " ".join(text.replace("│", " ").split())


def invoke(*args: str | Path):
    return CliRunner().invoke(app, ["write-metadata", *map(str, args)])


def test_sidecars_by_default(library) -> None:
    photos, db = library
    result = invoke("--db", db)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "Metadata (sidecar): 3 written, 0 unchanged, 0 skipped, 0 held back (confidence below 0.50), 0 failed"
    found = tags(photos / "cat.png.xmp")
    assert found["XMP-dc:Description"] == "eine Katze schläft — 猫"
    assert found["XMP-captioncli:Model"] == "sat-lite0-flickr8k"
    assert not (photos / "broken.jpg.xmp").exists()  # failed rows have no caption to write
    assert "XMP-dc:Description" not in tags(photos / "dog.jpg")


def test_in_place_twice_then_unchanged(library) -> None:
    photos, db = library
    first = invoke("--db", db, "--mode", "in-place", "--json")
    assert first.exit_code == 0, first.output
    report = json.loads(first.stdout)
    assert report["counts"] == {"written": 3, "unchanged": 0, "skipped": 0, "held-back": 0, "error": 0}
    assert tags(photos / "trip/boat.webp")["IFD0:ImageDescription"] == "a boat on the water"
    with Store(db) as store:  # the new size/mtime is stored, so annotate's resume still skips
        row = store.get_image(str(photos / "dog.jpg"))
    assert row["size"] == (photos / "dog.jpg").stat().st_size

    second = invoke("--db", db, "--mode", "in-place", "--json")
    assert json.loads(second.stdout)["counts"] == {"written": 0, "unchanged": 3, "skipped": 0, "held-back": 0, "error": 0}


def test_paths_select_files_and_folders(library) -> None:
    photos, db = library
    result = invoke(photos / "trip", photos / "dog.jpg", "--db", db, "--json", "--sidecar-name", "adobe")
    assert result.exit_code == 0, result.output
    files = {Path(f["path"]).name: f["status"] for f in json.loads(result.stdout)["files"]}
    assert files == {"dog.jpg": "written", "boat.webp": "written"}
    assert (photos / "dog.xmp").exists() and (photos / "trip/boat.xmp").exists()
    assert not (photos / "cat.xmp").exists()


def test_a_file_not_in_the_database_fails(library) -> None:
    photos, db = library
    stranger = photos / "stranger.jpg"
    Image.new("RGB", (8, 8)).save(stranger)
    result = invoke(stranger, "--db", db)
    assert result.exit_code == 1
    assert f"{stranger}: no caption in the database; run annotate first" in result.stderr


def test_a_failed_file_makes_exit_code_1_and_the_rest_is_written(library) -> None:
    photos, db = library
    (photos / "dog.jpg").chmod(0o444)
    result = invoke("--db", db, "--mode", "in-place")
    assert result.exit_code == 1
    assert f"{photos / 'dog.jpg'}: read-only file; left unchanged" in result.stderr
    assert "2 written, 0 unchanged, 0 skipped, 0 held back (confidence below 0.50), 1 failed" in result.stdout
    assert tags(photos / "cat.png")["XMP-dc:Description"] == "eine Katze schläft — 猫"


def test_a_persons_description_is_reported_as_skipped(library) -> None:
    photos, db = library
    subprocess.run([EXIFTOOL, "-q", "-overwrite_original", "-XMP-dc:Description=Rex at two", str(photos / "dog.jpg")], check=True)
    with Store(db) as store:  # keep the database key in step with the edit
        info = (photos / "dog.jpg").stat()
        store.update_keys([(photos / "dog.jpg", info.st_size, info.st_mtime)])
    result = invoke(photos / "dog.jpg", "--db", db, "--mode", "in-place")
    assert result.exit_code == 0
    assert "kept the description a person wrote ('Rex at two'); --overwrite replaces it" in result.stderr
    assert invoke(photos / "dog.jpg", "--db", db, "--mode", "in-place", "--overwrite").exit_code == 0
    assert tags(photos / "dog.jpg")["XMP-dc:Description"] == "a dog runs on the grass"


def test_dry_run_changes_nothing(library) -> None:
    photos, db = library
    before = {p: p.read_bytes() for p in photos.rglob("*") if p.is_file()}
    result = invoke("--db", db, "--mode", "in-place", "--dry-run")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "Metadata (in-place): 3 would write, 0 unchanged, 0 skipped, 0 held back (confidence below 0.50), 0 failed"
    assert {p: p.read_bytes() for p in photos.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mode", "inplace"], "'inplace' is not one of 'sidecar', 'in-place'"),
        (["--sidecar-name", "lightroom"], "'lightroom' is not one of 'default', 'adobe'"),
    ],
)
def test_bad_options_are_usage_errors(library, args: list[str], message: str) -> None:
    _, db = library
    result = invoke("--db", db, *args)
    assert result.exit_code == 2
    assert message in flat(result.stderr)


def test_missing_database_is_a_usage_error(tmp_path: Path) -> None:
    result = invoke("--db", tmp_path / "nope.db")
    assert result.exit_code == 2
    assert "nope.db: no caption database here; run 'caption-cli annotate DIR' first" in flat(result.stderr)


@pytest.mark.parametrize(("minimum", "written"), [(None, {"dog.jpg"}), ("0.2", {"dog.jpg", "cat.png"}), ("0", {"dog.jpg", "cat.png", "boat.webp"})])
def test_captions_below_min_confidence_are_held_back_and_counted(tmp_path: Path, minimum, written: set) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for name, colour in [("dog.jpg", (40, 140, 60)), ("cat.png", (200, 40, 30)), ("boat.webp", (0, 0, 200))]:
        Image.new("RGB", (64, 48), colour).save(photos / name)
    db = tmp_path / "captions.db"
    with Store(db) as store:
        run = store.start_run(MODEL_ID, "cpu", ["annotate"])
        store.write_batch([captioned(photos / "dog.jpg", "a dog", 0.5),  # exactly at the default: kept
                           captioned(photos / "cat.png", "a cat", 0.49),
                           captioned(photos / "boat.webp", "a boat", None)],  # unknown: only at 0
                          MODEL_ID, run)
    extra = ["--min-confidence", minimum] if minimum is not None else []
    result = CliRunner().invoke(app, ["write-metadata", "--db", str(db), "--json", *extra])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {Path(f["path"]).name for f in report["files"] if f["status"] == "written"} == written
    assert report["counts"]["held-back"] == 3 - len(written)
    assert report["counts"]["written"] == len(written)
    assert {Path(p).name for p in photos.glob("*.xmp")} == {f"{name}.xmp" for name in written}
    held = {Path(f["path"]).name: f["message"] for f in report["files"] if f["status"] == "held-back"}
    if "cat.png" in held:
        assert held["cat.png"] == f"confidence 0.49 is below --min-confidence {float(minimum or 0.5):.2f}"
    if "boat.webp" in held:
        assert held["boat.webp"].startswith("caption has no confidence")


def test_a_stop_waits_for_the_photo_in_hand_says_how_far_it_got_and_a_rerun_goes_on(library, monkeypatch) -> None:
    import signal
    import time

    from caption_cli import metadata

    photos, db = library
    real_write = metadata.MetadataWriter.write
    calls = []

    def sigterm_during_the_second_photo(self, requests):
        done = real_write(self, requests)  # the photo is rewritten in place...
        calls.append(len(requests))
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # ...and a stop comes before its new key is stored
            time.sleep(0.05)
        return done

    monkeypatch.setattr(metadata.MetadataWriter, "write", sigterm_during_the_second_photo)
    result = invoke("--db", db, "--mode", "in-place")
    assert result.exit_code == 143, result.output
    assert ("Stopped by SIGTERM after 2 file(s): 2 written, 0 unchanged, 0 skipped, 0 held back, 0 failed."
            in result.stderr)
    with Store(db) as store:  # both rewritten photos have their new size and mtime in the database
        keys = {Path(row["path"]).name: (row["size"], row["mtime"]) for row in store.iter_images(status="ok")}
    for name in ("cat.png", "dog.jpg"):
        info = (photos / name).stat()
        assert keys[name] == (info.st_size, info.st_mtime), name

    monkeypatch.setattr(metadata.MetadataWriter, "write", real_write)
    again = invoke("--db", db, "--mode", "in-place")
    assert again.exit_code == 0, again.output
    assert again.stdout.startswith("Metadata (in-place): 1 written, 2 unchanged, 0 skipped")
