"""The HTML gallery: escaping, attention payload, pagination, thumbnail cache, the command."""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from caption_cli.cli import app
from caption_cli.report import (
    THUMB_DIR,
    attention_payload,
    build_report,
    make_thumbnail,
    render_card,
    thumb_name,
)
from caption_cli.results import Alternative, Caption, CaptionResult
from caption_cli.store import Store

GRID = (7, 7)
EVIL = '<script>alert("x")</script> & <b>'


def hot_grid(row: int, col: int) -> np.ndarray:
    """An attention map that looked at one cell only."""
    grid = np.full(GRID, 0.002, dtype=np.float32)
    grid[row, col] = 0.9
    return grid


def ok_result(
    path: Path, text: str, hot: list[tuple[int, int]], alternatives: list[str] | None = None,
    confidence: float | None = 0.9,
) -> CaptionResult:
    words = text.split()
    attention = np.stack([hot_grid(*hot[i % len(hot)]) for i in range(len(words))])
    ranked = [Alternative(text, -0.25)] + [
        Alternative(alt, -0.5 - i) for i, alt in enumerate(alternatives or [])
    ]
    stat = path.stat()
    caption = Caption(text=text, score=-0.25, words=words, attention=attention, alternatives=ranked,
                      confidence=confidence)
    return CaptionResult(
        path=path,
        size=stat.st_size,
        mtime=stat.st_mtime,
        status="ok",
        width=64,
        height=48,
        caption=caption,
    )


def make_library(root: Path, extra: int = 0) -> Path:
    """Photos on disk and a caption database describing them; returns the database path.

    dog.jpg looks top-left for "dog", car.jpg bottom-right for "car"; broken.jpg failed;
    evil.png has a caption and a file name that try to inject HTML.
    """
    photos = root / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (400, 300), (40, 140, 60)).save(photos / "dog.jpg")
    Image.new("RGB", (300, 400), (200, 40, 30)).save(photos / "car.jpg")
    evil = photos / 'evil"<img src=x onerror=alert(1)>.png'
    Image.new("RGB", (50, 50), (0, 0, 200)).save(evil)
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    results = [
        ok_result(
            photos / "dog.jpg",
            "a dog runs on the grass",
            [(0, 0), (0, 0), (3, 3), (5, 5), (6, 6), (6, 0)],
            ["a dog on grass", "a brown dog"],
        ),
        ok_result(photos / "car.jpg", "a red car parked on a street", [(6, 6)], ["a car"], confidence=0.2),
        ok_result(evil, EVIL, [(2, 2)]),
        CaptionResult(
            path=photos / "broken.jpg",
            size=10,
            mtime=1.0,
            status="error",
            error="cannot identify image file <broken.jpg>",
        ),
    ]
    for number in range(extra):
        path = photos / f"extra-{number:03d}.jpg"
        Image.new("RGB", (32, 24), (number * 7 % 255, 90, 90)).save(path)
        results.append(ok_result(path, f"a photo number {number}", [(1, 1)]))
    db = root / "captions.db"
    with Store(db) as store:
        run = store.start_run("tiny@000000000000", "cpu", ["annotate", str(photos)])
        store.write_batch(results, "tiny@000000000000", run)
    return db


@pytest.fixture()
def library(tmp_path: Path) -> Path:
    return make_library(tmp_path)


def test_attention_payload_scales_each_word_to_its_peak() -> None:
    payload = attention_payload([("dog", hot_grid(0, 0)), ("flat", np.zeros(GRID, np.float32))])
    assert payload["words"] == ["dog", "flat"]
    assert payload["grid"] == [7, 7]
    dog = np.frombuffer(base64.b64decode(payload["maps"][0]), np.uint8).reshape(GRID)
    assert dog[0, 0] == 255 and dog[6, 6] == 1  # 0.002 / 0.9 * 255 rounds to 1
    assert not np.frombuffer(base64.b64decode(payload["maps"][1]), np.uint8).any()
    assert attention_payload([]) == {"words": [], "grid": [0, 0], "maps": []}


def test_card_escapes_every_untrusted_string() -> None:
    row = {"id": 1, "path": '/p/a"<b>.jpg', "status": "ok", "caption": EVIL, "model_id": "m<x>"}
    card = render_card(0, row, [{"caption": EVIL, "score": -1.5}], ["<w>"], ("t.jpg", 10, 10))
    assert "<script>" not in card and "<b>" not in card and "<w>" not in card and "m<x>" not in card
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;b&gt;" in card
    assert 'title="/p/a&quot;&lt;b&gt;.jpg"' in card
    assert (
        '<span class="score" title="length-normalised log-probability; higher is better">-1.500</span>'
        in card
    )


def test_report_is_self_contained_and_escaped(library: Path, tmp_path: Path) -> None:
    with Store(library) as store:
        summary = build_report(store, tmp_path / "report", min_confidence=0.5)
    page = (tmp_path / "report" / "index.html").read_text(encoding="utf-8")
    assert (summary.pages, summary.photos, summary.failed, summary.thumbs_made) == (1, 4, 1, 3)
    assert summary.thumb_errors == []
    # Nothing is fetched from the network: no remote src/href, no external CSS.
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    assert "<link" not in page and "@import" not in page
    # Untrusted text appears only escaped, including inside the embedded JSON.
    assert "<script>alert" not in page and "onerror=alert(1)>" not in page
    assert (
        page.count("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;") >= 2
    )  # caption + ranked list
    assert page.count("</script>") == 2  # the JSON block and the gallery script, nothing injected
    assert "a dog runs on the grass" in page and "a red car parked on a street" in page
    assert "cannot identify image file &lt;broken.jpg&gt;" in page
    assert (
        '<button type="button" class="word" data-word="1" aria-pressed="false">dog</button>' in page
    )
    assert "a brown dog" in page and "-1.500" in page  # alternatives with scores
    # confidence on every card; the doubtful car caption is shown, marked, and kept out of alt=
    assert summary.doubtful == 1
    assert '<p class="confidence" title="calibrated probability that the caption is acceptable">confidence 0.90</p>' in page
    assert "confidence 0.20 · low: may be wrong, not used as alt text" in page
    assert 'alt="a dog runs on the grass"' in page and 'alt="a red car parked on a street"' not in page


def test_thumbnails_are_cached_and_upright(library: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    with Store(library) as store:
        build_report(store, out, thumb_size=64)
        dog = store.get_image(str(tmp_path / "photos" / "dog.jpg"))
    thumb = out / THUMB_DIR / thumb_name(dog["path"], dog["size"], dog["mtime"], 64)
    with Image.open(thumb) as image:
        assert image.size == (64, 48)  # longest side 64, aspect kept
    before = {p.name: p.stat().st_mtime_ns for p in (out / THUMB_DIR).iterdir()}
    with Store(library) as store:
        again = build_report(store, out, thumb_size=64)
    assert (again.thumbs_made, again.thumbs_reused) == (0, 3)
    assert {p.name: p.stat().st_mtime_ns for p in (out / THUMB_DIR).iterdir()} == before

    # The photo changes (new mtime, as annotate records it): a new thumbnail replaces the old one.
    photo = Path(dog["path"])
    os.utime(photo, (dog["mtime"] + 10, dog["mtime"] + 10))
    with Store(library) as store:
        store.write_batch(
            [ok_result(photo, "a dog runs on the grass", [(0, 0)])], "tiny@000000000000", 1
        )
        third = build_report(store, out, thumb_size=64)
    assert (third.thumbs_made, third.thumbs_reused) == (1, 2)
    assert not thumb.exists() and len(list((out / THUMB_DIR).iterdir())) == 3


def test_thumbnail_follows_exif_orientation(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees: portrait
    Image.new("RGB", (400, 300), (9, 9, 9)).save(tmp_path / "rotated.jpg", exif=exif)
    assert make_thumbnail(tmp_path / "rotated.jpg", tmp_path / "t.jpg", 64) == (48, 64)
    with Image.open(tmp_path / "t.jpg") as thumb:
        assert thumb.size == (48, 64)


def test_missing_photo_gets_a_card_with_the_reason(library: Path, tmp_path: Path) -> None:
    (tmp_path / "photos" / "car.jpg").unlink()
    with Store(library) as store:
        summary = build_report(store, tmp_path / "report")
    assert len(summary.thumb_errors) == 1 and "car.jpg: no preview:" in summary.thumb_errors[0]
    page = (tmp_path / "report" / "index.html").read_text(encoding="utf-8")
    assert "a red car parked on a street" in page and "no preview: " in page


def test_large_libraries_paginate_and_old_pages_go(tmp_path: Path) -> None:
    db = make_library(tmp_path, extra=7)  # 11 photos
    out = tmp_path / "report"
    with Store(db) as store:
        summary = build_report(store, out, page_size=4)
    assert summary.pages == 3
    assert sorted(p.name for p in out.glob("*.html")) == [
        "index.html",
        "page-2.html",
        "page-3.html",
    ]
    middle = (out / "page-2.html").read_text(encoding="utf-8")
    assert middle.count('<article class="card') == 4
    assert 'rel="prev" href="index.html"' in middle and 'rel="next" href="page-3.html"' in middle
    assert '<span aria-current="page">2</span>' in middle
    assert (out / "page-3.html").read_text(encoding="utf-8").count('<article class="card') == 3
    index = (out / "search-index.js").read_text(encoding="utf-8")
    assert index.startswith("window.CAPTION_INDEX = [[1,0,") and "a photo number 6" in index

    with Store(db) as store:
        assert build_report(store, out, page_size=6).pages == 2
    assert not (out / "page-3.html").exists()


def test_empty_database_says_what_to_do(tmp_path: Path) -> None:
    with Store(tmp_path / "empty.db") as store:
        summary = build_report(store, tmp_path / "report")
    assert (summary.pages, summary.photos) == (1, 0)
    assert "caption-cli annotate DIR" in (tmp_path / "report" / "index.html").read_text(
        encoding="utf-8"
    )


@pytest.mark.parametrize("option", [["--page-size", "0"], ["--thumb-size", "8"]])
def test_bad_options_are_usage_errors(library: Path, tmp_path: Path, option: list[str]) -> None:
    result = CliRunner().invoke(
        app, ["report", "--db", str(library), "--out", str(tmp_path / "r"), *option]
    )
    assert result.exit_code == 2


def test_report_command(library: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["report", "--db", str(library), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (
        f"Wrote {out / 'index.html'}: 4 photos on 1 page (1 failed, 1 marked low confidence, below 0.50); "
        "thumbnails: 3 made, 0 reused"
        in " ".join(result.output.split())
    )
    assert (out / "index.html").is_file()


def test_report_command_refuses_a_missing_database(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["report", "--db", str(tmp_path / "nope.db"), "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 2
    assert "nope.db" in result.output and not (tmp_path / "nope.db").exists()
