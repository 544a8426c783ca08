"""The annotate, search, show and info commands: CliRunner with a fake captioner, subprocesses
for what only a real process shows (SIGKILL, two writers, `python -m`, no torch)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from io import StringIO
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from caption_cli.cli import app
from caption_cli.commands import annotate as commands
from caption_cli.results import CaptionResult
from tests.conftest import sigint_as_in_a_terminal
from tests.test_pipeline import FakeCaptioner, make_photos

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture
def fake(monkeypatch):
    """Replace the model factory; records how it was called."""
    calls = []

    def load_captioner(model, device, beam=None, alternatives=None):
        calls.append({"model": model, "device": device, "beam": beam, "alternatives": alternatives})
        return FakeCaptioner()

    monkeypatch.setattr(commands, "load_captioner", load_captioner)
    return calls


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    make_photos(tmp_path / "photos", 3)
    return tmp_path / "photos"


@pytest.fixture
def db(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.delenv("CAPTION_CLI_DB", raising=False)
    return tmp_path / "captions.db"


def run(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "400"})


def plain(text: str) -> str:
    """Typer's error box without the box: one space between words."""
    return re.sub(r"\s+", " ", re.sub("[│╭╮╰╯─]", " ", text))


def rows(db: Path, sql: str = "select path, status, caption, error from images order by path"):
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


def make_odd_file(folder: Path, name: str | bytes, content: bytes = b"not an image") -> Path:
    """A file whose name is not UTF-8 or holds control characters, or a clean skip
    where the file system refuses such names (macOS, some network mounts)."""
    path = folder / (os.fsdecode(name) if isinstance(name, bytes) else name)
    try:
        path.write_bytes(content)
    except (OSError, UnicodeEncodeError) as exc:
        pytest.skip(f"this file system refuses the name {name!r}: {exc}")
    return path


LATIN1 = b"lat\xe9.png"  # "latin" with a Latin-1 e-acute: not UTF-8
LATIN1_SHOWN = "lat\\xe9.png"  # how the CLI prints it


# ------------------------------------------------------------------------ annotate


def test_annotate_all_good_exit_0(fake, photos: Path, db: Path):
    result = run("annotate", photos, "--db", db, "--workers", "0")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert result.stdout.startswith("Captioned 3, reused 0, skipped 0, failed 0 in ")
    assert result.stdout.rstrip().endswith("on cpu.")
    assert [(Path(p).name, s, c) for p, s, c, _ in rows(db)] == [
        ("p001.png", "ok", "a green square"),
        ("p000.png", "ok", "a red square"),
        ("p002.png", "ok", "a blue square"),
    ]
    assert fake == [{"model": None, "device": "auto", "beam": None, "alternatives": None}]


def test_annotate_bad_files_one_line_each_exit_1(fake, tmp_path: Path, db: Path):
    make_photos(tmp_path / "photos", 4)
    (tmp_path / "photos" / "empty.jpg").write_bytes(b"")
    (tmp_path / "photos" / "notes.JPG").write_text("a text file\n")
    result = run("annotate", tmp_path / "photos", "--db", db, "--workers", "0")
    assert result.exit_code == 1
    assert sorted(result.stderr.splitlines()) == [
        f"{tmp_path / 'photos' / 'empty.jpg'}: empty file (0 bytes)",
        f"{tmp_path / 'photos' / 'notes.JPG'}: not a supported image (content is not JPEG/PNG/WEBP/HEIF/TIFF/BMP/GIF)",
    ]
    assert "Captioned 4, reused 0, skipped 0, failed 2" in result.stdout
    assert sorted(s for _, s, _, _ in rows(db)) == ["error", "error", "ok", "ok", "ok", "ok"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["annotate", "{tmp}/nowhere"], "does not exist"),
        (["annotate", "{photos}", "--batch-size", "0"], "--batch-size"),
        (["annotate", "{photos}", "--batch-size", "100000"], "--batch-size"),
        (["annotate", "{photos}", "--workers", "-1"], "--workers"),
        (["annotate", "{photos}", "--device", "tpu"], "--device"),
        (["annotate", "{photos}", "--beam", "2", "--alternatives", "3"], "--alternatives 3 is more than --beam 2"),
        (["annotate", "{photos}", "--db", "{tmp}/missing/dir/c.db"], "does not exist"),
        (["annotate", "{photos}", "--model", "{tmp}/no-bundle"], "--model"),
        (["annotate", "{photos}", "--write-metadata", "everywhere"], "--write-metadata"),
        (["annotate"], "Missing argument"),
        (["search", "dog", "--db", "{tmp}/none.db"], "no caption database"),
        (["search", "  ", "--db", "{tmp}/none.db"], "the query is empty"),
        (["show", "x.jpg", "--db", "{tmp}/none.db"], "no caption database"),
        (["annotate", "{photos}", "--beam", "40"], "Invalid value for --beam: 40 is more than 32"),
        (["annotate", "{photos}", "--alternatives", "33"], "Invalid value for --alternatives: 33 is more than 32"),
        (["search", '"', "--db", "{tmp}/none.db"], 'has no word to look for; give words, or "words in quotes"'),
        (["search", "* ()", "--db", "{tmp}/none.db"], "has no word to look for"),
        (["search", os.fsdecode(b"r\xe9d"), "--db", "{tmp}/none.db"], "the query is not valid UTF-8: r\\xe9d"),
    ],
)
def test_usage_errors_exit_2_before_the_model_loads(fake, photos: Path, db: Path, monkeypatch, args, message):
    tmp = photos.parent
    monkeypatch.chdir(tmp)  # so the default ./captions.db is `db`
    result = run(*[a.format(tmp=tmp, photos=photos) for a in args])
    assert result.exit_code == 2, result.output
    assert message in plain(result.stderr)
    assert fake == []  # nothing loaded
    assert not db.exists() and list(tmp.glob("*.db*")) == []  # and no database left behind


def test_usage_errors_found_in_the_bundle_leave_no_database(tiny_bundle: Path, photos: Path, db: Path):
    """The bundle's own beam (3) is only known once it is read: still exit 2, no new file."""
    result = run("annotate", photos, "--db", db, "--model", tiny_bundle, "--alternatives", "5", "--workers", "0")
    assert result.exit_code == 2, result.output
    assert "alternatives must be an integer from 1 to beam_size (3), got 5" in plain(result.stderr)
    assert not db.exists()


def test_bundle_problem_is_a_usage_error_for_model(photos: Path, db: Path, tmp_path: Path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "model.json").write_text("{not json")
    result = run("annotate", photos, "--db", db, "--model", bundle)
    assert result.exit_code == 2
    assert "not valid JSON" in plain(result.stderr)
    assert not db.exists()


def test_annotate_json_streams_one_object_per_image(fake, photos: Path, db: Path):
    (photos / "bad.png").write_text("nope")
    result = run("annotate", photos, "--db", db, "--workers", "0", "--json")
    assert result.exit_code == 1
    objects = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted((Path(o["path"]).name, o["status"], o["caption"]) for o in objects) == [
        ("bad.png", "error", None),
        ("p000.png", "ok", "a red square"),
        ("p001.png", "ok", "a green square"),
        ("p002.png", "ok", "a blue square"),
    ]
    for o in objects:
        assert {"path", "status", "caption", "score", "error"} <= set(o)
        assert (o["score"] == -0.5) == (o["status"] == "ok")
    assert "Captioned 3, reused 0, skipped 0, failed 1" in result.stderr  # the summary stays off stdout

    again = run("annotate", photos, "--db", db, "--workers", "0", "--json")
    statuses = sorted(json.loads(line)["status"] for line in again.stdout.splitlines())
    assert statuses == ["error", "skipped", "skipped", "skipped"]


def test_non_utf8_name_is_one_printable_line_in_text_mode(fake, photos: Path, db: Path):
    make_odd_file(photos, LATIN1)
    result = run("annotate", photos, "--db", db, "--workers", "0")
    assert result.exit_code == 1
    [line] = result.stderr.splitlines()
    assert line.startswith(f"{photos / LATIN1_SHOWN}: ") and "UTF-8" in line
    assert "Captioned 3, reused 0, skipped 0, failed 1" in result.stdout


def test_non_utf8_name_keeps_json_output_valid_utf8(launcher: Path, photos: Path, db: Path):
    """A real process: its stdout writes lone surrogates back as raw bytes (surrogateescape),
    which is how invalid UTF-8 reached the JSON before."""
    make_odd_file(photos, LATIN1)
    result = subprocess.run(
        [sys.executable, str(launcher), "annotate", str(photos), "--db", str(db), "--workers", "0", "--json"],
        env=_env(PYTHONIOENCODING="utf-8:surrogateescape"), capture_output=True, timeout=120,
    )
    assert result.returncode == 1, result.stderr
    objects = [json.loads(line) for line in result.stdout.decode("utf-8").splitlines()]  # strict UTF-8
    odd = [o for o in objects if o["status"] == "error"]
    assert [o["path"] for o in odd] == [str(photos / LATIN1_SHOWN)]
    assert len(objects) == 4
    [line] = result.stderr.decode("utf-8").splitlines()[:-1]  # the last line is the summary
    assert line.startswith(f"{photos / LATIN1_SHOWN}: ")


def test_control_characters_in_a_name_stay_on_its_one_line(fake, photos: Path, db: Path):
    odd = make_odd_file(photos, "two\nlines\x1b[2J.png")
    result = run("annotate", photos, "--db", db, "--workers", "0")
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"{photos}/two\\nlines\\x1b[2J.png: not a supported image (content is not JPEG/PNG/WEBP/HEIF/TIFF/BMP/GIF)"
    ]
    as_json = run("annotate", photos, "--db", db, "--workers", "0", "--json")
    errors = [o for o in map(json.loads, as_json.stdout.splitlines()) if o["status"] == "error"]
    assert [o["path"] for o in errors] == [str(odd)]  # JSON keeps the real name, escaped its own way


def test_progress_bar_prints_names_literally_and_ends_at_its_total(fake, photos: Path, db: Path, monkeypatch):
    """The interactive path: rich prints the error lines above the bar, so a `:sunny:`
    or `[bold]` in a file name must not become an emoji or a style, and files that the
    walk reports (a name that is not UTF-8) count in the total."""
    screen = StringIO()
    monkeypatch.setattr(commands, "_interactive", lambda: True)
    real_console = commands._stderr_console  # the function under test, pointed at a fake terminal
    monkeypatch.setattr(commands, "_stderr_console", lambda: real_console(file=screen, force_terminal=True, width=300))
    make_odd_file(photos, ":sunny: [bold]x[red].png")
    make_odd_file(photos, LATIN1)
    result = run("annotate", photos, "--db", db, "--workers", "0")
    assert result.exit_code == 1
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())
    assert f"{photos}/:sunny: [bold]x[red].png: not a supported image" in shown
    assert "\u2600" not in shown  # no ☀
    assert f"{photos / LATIN1_SHOWN}: " in shown
    counts = set(re.findall(r"(\d+)/(\d+)", shown))
    assert {total for _, total in counts} == {"5"} and ("5", "5") in counts


def test_captioning_does_not_wait_for_the_count_behind_the_bar(photos: Path, db: Path, monkeypatch):
    """On a NAS counting the files is a long second walk: it runs beside the captioning."""
    screen = StringIO()
    monkeypatch.setattr(commands, "_interactive", lambda: True)
    real_console = commands._stderr_console
    monkeypatch.setattr(commands, "_stderr_console", lambda: real_console(file=screen, force_terminal=True, width=300))
    captioning = threading.Event()

    class SignallingCaptioner(FakeCaptioner):
        def caption(self, pixels):
            captioning.set()
            return super().caption(pixels)

    monkeypatch.setattr(commands, "load_captioner", lambda *args, **kwargs: SignallingCaptioner())
    count_saw_captioning = []

    def slow_count(paths, options):
        count_saw_captioning.append(captioning.wait(timeout=10))  # a walk slower than the run
        return 3

    monkeypatch.setattr(commands, "_count", slow_count)
    result = run("annotate", photos, "--db", db, "--workers", "0")
    assert result.exit_code == 0 and result.stdout.startswith("Captioned 3, reused 0, skipped 0, failed 0")
    for _ in range(100):  # the count thread returns once captioning has started
        if count_saw_captioning:
            break
        time.sleep(0.05)
    assert count_saw_captioning == [True]
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())
    assert "3/3" in shown  # the last frame shows what was done, count or not


def test_reporter_console_never_reads_emoji_or_markup():
    screen = StringIO()
    console = commands._stderr_console(file=screen, force_terminal=True, width=200)
    with commands._Reporter(as_json=False, show_progress=True, total=1, console=console) as reporter:
        reporter.result(CaptionResult(path=Path("/p/:smile: [b]x[/b].png"), size=0, mtime=0.0,
                                      status="error", error="cause :+1: [red]"))
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())
    assert "/p/:smile: [b]x[/b].png: cause :+1: [red]" in shown
    assert "\U0001f604" not in shown and "\U0001f44d" not in shown


def test_resume_force_and_options_reach_the_captioner(fake, photos: Path, db: Path):
    assert run("annotate", photos, "--db", db, "--workers", "0").exit_code == 0
    again = run("annotate", photos, "--db", db, "--workers", "0")
    assert again.exit_code == 0 and again.stdout.startswith("Captioned 0, reused 0, skipped 3, failed 0")
    assert "--force" not in again.stderr  # same options: nothing to hint at
    other_options = run("annotate", photos, "--db", db, "--workers", "0", "--beam", "5")
    assert other_options.exit_code == 0 and other_options.stdout.startswith("Captioned 0, reused 0, skipped 3")
    assert "3 file(s) were already captioned by this model" in other_options.stderr
    assert "add --force" in other_options.stderr
    forced = run(
        "annotate", photos, "--db", db, "--workers", "0", "--force",
        "--device", "cpu", "--beam", "5", "--alternatives", "2", "--batch-size", "2",
    )
    assert forced.exit_code == 0 and forced.stdout.startswith("Captioned 3, reused 0, skipped 0, failed 0")
    assert fake[-1] == {"model": None, "device": "cpu", "beam": 5, "alternatives": 2}
    assert len(rows(db)) == 3 and rows(db, "select count(*) from alternatives") == [(6,)]


def test_recursion_and_hidden_flags(fake, tmp_path: Path, db: Path):
    make_photos(tmp_path / "top" / "sub", 2)  # top/sub/{a,b}/p00N.png
    make_photos(tmp_path / "top" / ".hidden", 1)
    Image.new("RGB", (8, 8)).save(tmp_path / "top" / "here.png")
    flat = run("annotate", tmp_path / "top", "--db", db, "--workers", "0", "--no-recursive", "--dry-run")
    assert flat.stdout.startswith("Captioned 1,")
    deep = run("annotate", tmp_path / "top", "--db", db, "--workers", "0", "--dry-run")
    assert deep.stdout.startswith("Captioned 3,")
    hidden = run("annotate", tmp_path / "top", "--db", db, "--workers", "0", "--dry-run", "--include-hidden")
    assert hidden.stdout.startswith("Captioned 4,")
    assert "dry run: nothing was written" in hidden.stdout
    assert not db.exists()


def test_database_from_environment(fake, photos: Path, tmp_path: Path, monkeypatch):
    target = tmp_path / "from-env.db"
    monkeypatch.setenv("CAPTION_CLI_DB", str(target))
    assert run("annotate", photos, "--workers", "0").exit_code == 0
    assert len(rows(target)) == 3
    hits = run("search", "red", "--json")
    assert [Path(h["path"]).name for h in json.loads(hits.stdout)] == ["p000.png"]


def test_annotate_with_worker_processes_via_cli(fake, photos: Path, db: Path):
    result = run("annotate", photos, "--db", db, "--workers", "2", "--batch-size", "2")
    assert result.exit_code == 0, result.output
    assert len(rows(db)) == 3


def test_write_metadata_in_place_then_resume_skips(fake, tmp_path: Path, db: Path):
    if not shutil.which("exiftool"):
        pytest.skip("exiftool is not installed")
    folder = tmp_path / "jpegs"
    folder.mkdir()
    for name, colour in [("one.jpg", (200, 20, 20)), ("two.jpg", (20, 20, 200))]:
        Image.new("RGB", (40, 30), colour).save(folder / name, quality=90)
    result = run("annotate", folder, "--db", db, "--workers", "0", "--write-metadata", "in-place")
    assert result.exit_code == 0, result.output
    assert "metadata written 2, held back 0 (confidence below 0.50), failed 0" in result.stdout
    described = subprocess.run(
        ["exiftool", "-s3", "-XMP-dc:Description", str(folder / "one.jpg")],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert described == "a red square"
    again = run("annotate", folder, "--db", db, "--workers", "0")
    assert again.stdout.startswith("Captioned 0, reused 0, skipped 2, failed 0")  # new size/mtime stored


def test_write_metadata_holds_back_captions_below_min_confidence(fake, tmp_path: Path, db: Path):
    if not shutil.which("exiftool"):
        pytest.skip("exiftool is not installed")
    folder = tmp_path / "jpegs"
    folder.mkdir()
    for name, colour in [("one.jpg", (200, 20, 20)), ("two.jpg", (20, 20, 200))]:
        Image.new("RGB", (40, 30), colour).save(folder / name, quality=90)
    # the fake is 0.75 sure of every caption
    strict = run("annotate", folder, "--db", db, "--workers", "0", "--write-metadata", "sidecar",
                 "--min-confidence", "0.8")
    assert strict.exit_code == 0, strict.output  # holding back is not a failure
    assert "Captioned 2" in strict.stdout and "metadata written 0, held back 2 (confidence below 0.80)" in strict.stdout
    assert not list(folder.glob("*.xmp"))
    assert rows(db, "select confidence from images") == [(0.75,), (0.75,)]  # stored all the same
    # a second run skips the captioning and writes the stored captions that now pass
    looser = run("annotate", folder, "--db", db, "--workers", "0", "--write-metadata", "sidecar",
                 "--min-confidence", "0.7")
    assert looser.exit_code == 0, looser.output
    assert "skipped 2" in looser.stdout and "metadata written 2, held back 0" in looser.stdout
    assert sorted(p.name for p in folder.glob("*.xmp")) == ["one.jpg.xmp", "two.jpg.xmp"]


def test_annotate_json_has_confidence(fake, photos: Path, db: Path):
    result = run("annotate", photos, "--db", db, "--workers", "0", "--json")
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["confidence"] for r in records] == [0.75, 0.75, 0.75]
    assert [a["confidence"] for a in records[0]["alternatives"]] == [0.75, 0.25]


# -------------------------------------------------------------------- search, show


@pytest.fixture
def annotated(fake, photos: Path, db: Path) -> Path:
    (photos / "bad.png").write_text("nope")
    run("annotate", photos, "--db", db, "--workers", "0")
    return photos


def test_search(annotated: Path, db: Path):
    result = run("search", "red squares", "--db", db)
    assert result.exit_code == 0
    assert result.stdout == f"{annotated / 'b' / 'p000.png'}\ta red square\t-0.500\tconfidence 0.75\n"
    as_json = json.loads(run("search", "square", "--db", db, "--json", "--limit", "2").stdout)
    assert len(as_json) == 2 and {"path", "caption", "score", "confidence", "model_id"} <= set(as_json[0])
    assert as_json[0]["confidence"] == 0.75
    nothing = run("search", "giraffe", "--db", db)
    assert nothing.exit_code == 0 and nothing.stdout == "" and "No caption matches" in nothing.stderr
    phrase = run("search", '"red square"', "--db", db)
    assert phrase.exit_code == 0 and phrase.stdout.startswith(f"{annotated / 'b' / 'p000.png'}\t")
    assert run("search", '"square red"', "--db", db).stdout == ""  # a phrase keeps word order
    assert run("search", 'red "', "--db", db).exit_code == 0  # a stray quote is harmless


def test_show_text_and_json(annotated: Path, db: Path, monkeypatch):
    photo = annotated / "a" / "p001.png"
    monkeypatch.chdir(photo.parent)
    result = run("show", "p001.png", "--db", db)  # a relative path works
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == str(photo)
    assert lines[1] == "  caption: a green square  (score -0.500, confidence 0.75)"
    assert lines[-2:] == ["    1. a green square  (-0.500, confidence 0.75)",
                          "    2. a green thing  (-0.900, confidence 0.25)"]
    data = json.loads(run("show", photo, "--db", db, "--json").stdout)
    assert data["caption"] == "a green square" and data["status"] == "ok"
    assert data["words"] == ["a", "green", "square"]
    assert [a["caption"] for a in data["alternatives"]] == ["a green square", "a green thing"]


def test_show_missing_and_failed_images_exit_1(annotated: Path, db: Path):
    missing = run("show", annotated / "never.jpg", "--db", db)
    assert missing.exit_code == 1 and "not in" in missing.stderr
    failed = run("show", annotated / "bad.png", "--db", db)
    assert failed.exit_code == 1 and "error: not a supported image" in failed.stdout
    failed_json = run("show", annotated / "bad.png", "--db", db, "--json")
    assert failed_json.exit_code == 1  # the same exit code in both modes
    assert json.loads(failed_json.stdout)["status"] == "error"


def test_show_a_non_utf8_name_is_a_one_line_error(annotated: Path, db: Path):
    result = run("show", annotated / os.fsdecode(LATIN1), "--db", db)
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: {annotated / LATIN1_SHOWN}: file name is not valid UTF-8, so it is not in {db}"
        " (rename it and annotate it)\n"
    )


def test_show_heatmap(annotated: Path, db: Path, tmp_path: Path):
    out = tmp_path / "heat.png"
    result = run("show", annotated / "b" / "p000.png", "--db", db, "--heatmap", out)
    assert result.exit_code == 0, result.output
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 100
    bad_folder = run("show", annotated / "b" / "p000.png", "--db", db, "--heatmap", tmp_path / "no" / "x.png")
    assert bad_folder.exit_code == 2


# ---------------------------------------------------------------------------- info


def test_info_text_and_json(fake):
    result = run("info")
    assert result.exit_code == 0, result.output
    assert "fake (fake@000000000000)" in result.stdout
    assert "scores:    test split\n           BLEU-4 0.250\n" in result.stdout
    assert "CPUExecutionProvider" in result.stdout and "device:    cpu" in result.stdout
    data = json.loads(run("info", "--json", "--device", "cpu").stdout)
    assert data["device"] == "cpu" and data["model_id"] == "fake@000000000000"
    assert data["scores"] == {"split": "test", "BLEU-4": 0.25}
    assert "CPUExecutionProvider" in data["providers_available"]
    assert fake[-1]["device"] == "cpu"


def test_info_score_lines_of_the_shipped_bundle():
    from caption_cli.bundle import load_bundle
    from caption_cli.commands.annotate import _score_lines

    meta = load_bundle(None).meta
    lines = _score_lines(meta["scores"], meta["search"]["beam_size"])
    assert lines[0].startswith("test split · flickr8k (Karpathy split, 1000 images) · onnxruntime")
    assert lines[1].startswith("beam 3 (default): ")
    assert f"BLEU-4 {meta['scores']['by_beam']['3']['BLEU-4']:.3f}" in lines[1]
    assert lines[2].startswith(f"{meta['scores']['more'][0]['dataset']} test, beam 3: ")
    assert lines[-1].startswith("selected: ")
    assert _score_lines({}, 3) == []


def test_info_score_lines_name_every_test_set():
    from caption_cli.commands.annotate import _score_lines

    scores = {"split": "test", "dataset": "flickr8k", "beam_size": 3, "CIDEr": 0.5, "selection": "val CIDEr",
              "more": [{"split": "test", "dataset": "coco (277 images)", "beam_size": 3, "CIDEr": 0.6, "BLEU-4": 0.2}]}
    assert _score_lines(scores, 3) == ["test split · flickr8k", "beam 3 (default): CIDEr 0.500",
                                       "coco (277 images) test, beam 3: BLEU-4 0.200, CIDEr 0.600",
                                       "selected: val CIDEr"]


# --------------------------------------------------------------------- subprocesses

LAUNCHER = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {repo!r})
    from tests.test_pipeline import FakeCaptioner
    import caption_cli.commands.annotate as commands

    def load_captioner(*args, **kwargs):
        return FakeCaptioner(delay=float(os.environ.get("FAKE_DELAY", "0")))

    commands.load_captioner = load_captioner
    if __name__ == "__main__":  # the decoder workers are spawned: they must not run the CLI
        from caption_cli.cli import main
        main(prog_name="caption-cli")
    """
)


@pytest.fixture
def launcher(tmp_path: Path) -> Path:
    script = tmp_path / "fake_cli.py"
    script.write_text(LAUNCHER.format(repo=str(REPO)))
    return script


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CAPTION_CLI_DB"}
    env.update(extra)
    return env


def _count_ok(db: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return conn.execute("select count(*) from images where status = 'ok'").fetchone()[0]
    except sqlite3.Error:
        return 0  # not created yet


def test_sigkill_then_resume_captions_every_image_exactly_once(launcher: Path, tmp_path: Path, db: Path):
    expected = make_photos(tmp_path / "photos", 24)
    args = [sys.executable, str(launcher), "annotate", str(tmp_path / "photos"), "--db", str(db),
            "--batch-size", "2", "--workers", "1"]
    process = subprocess.Popen(args, env=_env(FAKE_DELAY="0.2"), start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while _count_ok(db) < 4 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, process.stderr.read().decode()
    os.killpg(process.pid, signal.SIGKILL)  # the run, and its decoder worker, mid-batch
    process.wait(10)
    process.stderr.close()
    done_before = _count_ok(db)
    assert 4 <= done_before < 24

    resumed = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.startswith(f"Captioned {24 - done_before}, reused 0, skipped {done_before}, failed 0")
    assert rows(db, "select count(*), count(distinct path) from images") == [(24, 24)]
    assert {Path(p): c for p, _, c, _ in rows(db)} == expected
    assert rows(db, "select count(*) from alternatives") == [(48,)]
    assert rows(db, "select count(*) from attention") == [(72,)]
    assert rows(db, "select count(*) from runs where finished_at is null") == [(1,)]  # the killed one


@pytest.mark.parametrize("signum, named", [(signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "Ctrl-C")])
def test_a_stop_signal_ends_the_run_cleanly_and_the_next_run_goes_on(launcher: Path, tmp_path: Path, db: Path,
                                                                     signum: int, named: str):
    expected = make_photos(tmp_path / "photos", 24)
    args = [sys.executable, str(launcher), "annotate", str(tmp_path / "photos"), "--db", str(db),
            "--batch-size", "2", "--workers", "1"]
    process = subprocess.Popen(args, env=_env(FAKE_DELAY="0.2"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, preexec_fn=sigint_as_in_a_terminal)
    try:
        deadline = time.monotonic() + 60
        while _count_ok(db) < 4 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process.poll() is None
        process.send_signal(signum)  # to the run alone, as `kill` or a service manager sends it
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    done = _count_ok(db)
    # after cleaning up, the process ends by the signal itself, so a shell's loop stops too
    assert process.returncode == -signum, err
    assert 4 <= done < 24 and "Traceback" not in err
    assert f"Stopped by {named} after " in err and f"captioned {done}, reused 0, skipped 0, failed 0." in err
    assert "run the same command again to go on" in err
    assert rows(db, "select captioned, finished_at is not null from runs") == [(done, 1)]  # the run is closed

    resumed = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.startswith(f"Captioned {24 - done}, reused 0, skipped {done}, failed 0")
    assert rows(db, "select count(*), count(distinct path) from images") == [(24, 24)]
    assert {Path(p): c for p, _, c, _ in rows(db)} == expected


def test_two_annotate_processes_share_one_database(launcher: Path, tmp_path: Path, db: Path):
    expected = make_photos(tmp_path / "photos", 16)
    args = [sys.executable, str(launcher), "annotate", str(tmp_path / "photos"), "--db", str(db),
            "--batch-size", "2", "--workers", "0"]
    both = [subprocess.Popen(args, env=_env(FAKE_DELAY="0.1"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in both]
    for process, (_, err) in zip(both, outputs):
        assert process.returncode == 0, err
        assert "locked" not in err
    assert rows(db, "select count(*), count(distinct path) from images") == [(16, 16)]
    assert {Path(p): c for p, _, c, _ in rows(db)} == expected
    assert rows(db, "select count(*) from alternatives") == [(32,)]
    assert rows(db, "select count(*) from attention") == [(48,)]
    assert rows(db, "select count(*) from runs where finished_at is not null") == [(2,)]
    with sqlite3.connect(db) as conn:
        assert conn.execute("pragma integrity_check").fetchone()[0] == "ok"


def test_python_dash_m_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "caption_cli", "annotate", "--help"],
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "Example: caption-cli annotate" in result.stdout


# ---------------------------------------------------------------- the tiny bundle


def test_cli_end_to_end_with_the_tiny_bundle(tiny_bundle: Path, photos: Path, db: Path, tmp_path: Path):
    annotated = run("annotate", photos, "--db", db, "--model", tiny_bundle, "--device", "cpu",
                    "--workers", "0", "--json")
    assert annotated.exit_code == 0, annotated.output
    objects = [json.loads(line) for line in annotated.stdout.splitlines()]
    assert len(objects) == 3 and all(o["status"] == "ok" and o["caption"] for o in objects)
    assert all(len(o["alternatives"]) == 3 for o in objects)  # the bundle's default
    assert "on cpu" in annotated.stderr

    first = objects[0]
    out = tmp_path / "heat.png"
    shown = run("show", first["path"], "--db", db, "--heatmap", out, "--json")
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.stdout)
    assert data["caption"] == first["caption"] and " ".join(data["words"]) == first["caption"]
    assert out.stat().st_size > 0

    word = first["caption"].split()[-1]
    if word not in ("a", "on", "the"):  # FTS drops nothing, but keep the check meaningful
        hits = json.loads(run("search", word, "--db", db, "--json").stdout)
        assert first["path"] in [h["path"] for h in hits]

    info = json.loads(run("info", "--model", tiny_bundle, "--device", "cpu", "--json").stdout)
    assert info["name"] == "tiny-random" and info["device"] == "cpu"
    assert info["image_size"] == 64 and info["grid"] == [2, 2]
    assert info["backbone"] and "CPUExecutionProvider" in info["providers"]


SITECUSTOMIZE = textwrap.dedent(
    """
    import importlib.abc, sys

    class _NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"torch", "torchvision", "onnx"}:
                raise ImportError(f"{name} is blocked: the runtime must not need it")
            return None

    sys.meta_path.insert(0, _NoTorch())
    """
)


def test_runtime_works_without_torch_or_onnx(tiny_bundle: Path, photos: Path, tmp_path: Path):
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = _env(PYTHONPATH=os.pathsep.join([str(blocker), str(REPO)]))  # workers inherit it too
    check = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert check.returncode != 0 and "blocked" in check.stderr

    db = tmp_path / "no-torch.db"
    result = subprocess.run(
        [sys.executable, "-m", "caption_cli", "annotate", str(photos), "--db", str(db),
         "--model", str(tiny_bundle), "--device", "cpu", "--workers", "1"],
        env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Captioned 3, reused 0, skipped 0, failed 0")
    assert len(rows(db)) == 3


def test_annotate_starts_the_decoders_before_the_model_loads(monkeypatch, photos: Path, db: Path):
    # Their interpreters boot while the sessions are built, not after (images.start_decoders).
    import multiprocessing

    running_at_load = []

    def load_captioner(*args, **kwargs):
        running_at_load.append(len(multiprocessing.active_children()))
        return FakeCaptioner()

    monkeypatch.setattr(commands, "load_captioner", load_captioner)
    result = run("annotate", photos, "--db", db, "--workers", "2")
    assert result.exit_code == 0, result.output
    assert running_at_load == [2]
    assert sqlite3.connect(db).execute("SELECT count(*) FROM images WHERE status = 'ok'").fetchone() == (3,)
    assert multiprocessing.active_children() == []
    assert run("annotate", photos, "--db", db, "--workers", "0", "--force").exit_code == 0
