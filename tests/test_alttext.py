"""Alt text: the quality rules, HTML and Markdown filling byte for byte, the command."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from caption_cli.alttext import (
    StoreThenModel,
    alt_text_from_caption,
    fill_alt_text,
    find_html_images,
    find_markdown_images,
    local_image_path,
)
from caption_cli.cli import app
from caption_cli.results import Alternative, Caption, CaptionResult
from caption_cli.store import Store


@pytest.mark.parametrize(
    ("caption", "alt"),
    [
        ("a dog runs on the grass", "A dog runs on the grass."),
        ("a photo of a dog on the beach", "A dog on the beach."),
        ("An image of a picture of two cats .", "Two cats."),
        ("picture showing a red car", "A red car."),
        ("this is a photograph of a bridge", "A bridge."),
        ("a man <unk> a <unk> on the street", "A man a on the street."),
        ("<unk> riding a bike <unk>", "Riding a bike."),
        ("<unk> <unk>", ""),
        ("   ", ""),
        ("A boy jumps!", "A boy jumps!"),
        ("two dogs , one ball", "Two dogs, one ball."),
        ("a photographer takes a picture", "A photographer takes a picture."),  # not a prefix
        ("a dog runs on the grass with a", "A dog runs on the grass."),  # stopped at max_length
        ("a", "A."),
        ("a man holding a .", "A man holding."),
    ],
)
def test_alt_text_rules(caption: str, alt: str) -> None:
    assert alt_text_from_caption(caption) == alt


def test_alt_text_is_cut_at_a_word_within_the_limit() -> None:
    caption = "a man in a red shirt is climbing a rock wall with a rope while another man watches"
    assert alt_text_from_caption(caption, limit=40) == "A man in a red shirt is climbing a rock."
    assert (
        alt_text_from_caption(caption, limit=50) == "A man in a red shirt is climbing a rock wall."
    )  # not "... wall with."
    assert len(alt_text_from_caption(caption * 5)) <= 125
    assert alt_text_from_caption("x" * 300, limit=20) == "X" + "x" * 18 + "."
    with pytest.raises(ValueError, match="at least 2"):
        alt_text_from_caption("a dog", limit=1)


@pytest.mark.parametrize(
    ("src", "expected"),
    [
        ("img/a%20b.jpg?v=2#top", "site/img/a b.jpg"),
        ("../up.png", "site/../up.png"),
        ("/root.png", "root/root.png"),
        ("http://example.com/a.jpg", None),
        ("https://example.com/a.jpg", None),
        ("//cdn.example.com/a.jpg", None),
        ("data:image/png;base64,AAAA", None),
        ("", None),
    ],
)
def test_local_image_path(src: str, expected: str | None) -> None:
    found = local_image_path(src, Path("site"), site_root=Path("root"))
    assert (str(found) if found else None) == expected


def photo(path: Path, colour: tuple[int, int, int] = (10, 120, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), colour).save(path)
    return path


class FakeLookup:
    """Captions by file name; records every call so tests can see what was asked."""

    def __init__(self, captions: dict[str, str | Exception]) -> None:
        self.captions = captions
        self.calls: list[list[Path]] = []

    def __call__(self, paths: list[Path]) -> dict[Path, str | Exception]:
        self.calls.append(paths)
        return {path: self.captions[path.name] for path in paths if path.name in self.captions}


HTML_PAGE = (
    '<!DOCTYPE html>\r\n<html><head><meta charset="utf-8"><title>Caf\u00e9 \u2014 trip</title></head>\r\n'
    "<body>\r\n"
    "<p>Na\u00efve   spacing\tkept</p>\r\n"
    '<img src="img/dog.jpg">\r\n'
    "<IMG  SRC = 'img/cat.jpg'  ALT=\"\"  width=10 />\r\n"
    "<img src=img/dog.jpg alt>\r\n"
    '<img alt="A hand-written description" src="img/cat.jpg">\r\n'
    '<img src="https://example.com/remote.jpg">\r\n'
    '<img src="data:image/gif;base64,R0lGOD">\r\n'
    '<img src="img/missing.jpg" class="x">\r\n'
    '<img src="img/spacer.png" alt="" role="presentation">\r\n'
    '<!-- <img src="img/dog.jpg"> -->\r\n'
    "<script>document.write('<img src=\"img/dog.jpg\">')</script>\r\n"
    '<img\r\n  data-x="1"\r\n  src="img/a%20b.jpg"\r\n>\r\n'
    "</body></html>\r\n"
)


@pytest.fixture()
def site(tmp_path: Path) -> Path:
    for name in ("dog.jpg", "cat.jpg", "spacer.png", "a b.jpg"):
        photo(tmp_path / "site" / "img" / name)
    return tmp_path / "site"


def test_html_fills_only_missing_alt_and_keeps_every_other_byte(site: Path) -> None:
    page = site / "index.html"
    page.write_bytes(HTML_PAGE.encode("utf-8"))
    lookup = FakeLookup(
        {
            "dog.jpg": "a photo of a dog <unk> on the grass",
            "cat.jpg": "a cat",
            "a b.jpg": 'two <b>bold</b> & "quoted" words',
        }
    )
    result = fill_alt_text(page, lookup)

    expected = (
        HTML_PAGE.replace(
            '<img src="img/dog.jpg">\r\n',
            '<img src="img/dog.jpg" alt="A dog on the grass.">\r\n',
            1,
        )
        .replace('ALT=""  width=10', 'alt="A cat."  width=10')
        .replace("<img src=img/dog.jpg alt>", '<img src=img/dog.jpg alt="A dog on the grass.">')
        .replace(
            'src="img/a%20b.jpg"\r\n>',
            'src="img/a%20b.jpg" alt="Two &lt;b&gt;bold&lt;/b&gt; &amp; &quot;quoted&quot; words."\r\n>',
        )
    )
    assert result.data == expected.encode("utf-8")
    assert [(o.line, o.status) for o in result.outcomes] == [
        (5, "filled"),
        (6, "filled"),
        (7, "filled"),
        (8, "kept"),
        (9, "skipped"),
        (10, "skipped"),
        (11, "failed"),
        (12, "kept"),
        (15, "filled"),
    ]
    missing = result.outcomes[6]
    assert (
        missing.src == "img/missing.jpg"
        and missing.message == f"file not found: {site / 'img' / 'missing.jpg'}"
    )
    assert result.outcomes[3].alt == "A hand-written description"
    # Each local photo is asked for once, whatever the number of <img> using it.
    assert lookup.calls == [
        sorted({(site / "img" / n).resolve() for n in ("dog.jpg", "cat.jpg", "a b.jpg")})
    ]


@pytest.mark.parametrize(
    ("tag", "src", "replaced"),
    [
        (
            '<img src="a&amp;b.jpg"alt="">',
            "a&b.jpg",
            'alt=""',
        ),  # entity in src, no space before alt
        (
            "<img title=\"x alt=''\" src=c.jpg>",
            "c.jpg",
            "",
        ),  # 'alt' inside another value is no attribute
        (
            '<img src=\'d.jpg\' ALT = "" alt="second">',
            "d.jpg",
            'ALT = ""',
        ),  # the first alt counts, as in browsers
        ("<img src=e.jpg alt/>", "e.jpg", "alt"),
    ],
)
def test_html_attribute_spans(tag: str, src: str, replaced: str) -> None:
    (slot,) = find_html_images(f"<p>{tag}</p>")
    assert slot.src == src and slot.problem is None
    assert f"<p>{tag}</p>"[slot.start : slot.end] == replaced


def test_html_keep_empty_leaves_decorative_images(site: Path) -> None:
    page = site / "p.html"
    page.write_text('<img src="img/dog.jpg" alt=""><img src="img/cat.jpg">', encoding="utf-8")
    result = fill_alt_text(
        page, FakeLookup({"cat.jpg": "a cat", "dog.jpg": "a dog"}), keep_empty=True
    )
    assert result.data == b'<img src="img/dog.jpg" alt=""><img src="img/cat.jpg" alt="A cat.">'


def test_html_in_a_legacy_encoding_stays_in_it(site: Path) -> None:
    page = site / "latin.html"
    original = '<meta charset="windows-1252"><p>d\u00e9j\u00e0 vu \u2013 \u00a9</p>\n<img src="img/cat.jpg">\n'.encode(
        "cp1252"
    )
    page.write_bytes(original)
    result = fill_alt_text(page, FakeLookup({"cat.jpg": "caf\u00e9 \u2713 table"}))
    assert result.data == original.replace(b'cat.jpg">', b'cat.jpg" alt="Caf\xe9 &#10003; table.">')


def test_failed_caption_is_reported_not_written(site: Path) -> None:
    page = site / "p.html"
    page.write_text('<img src="img/dog.jpg"><img src="img/cat.jpg">', encoding="utf-8")
    result = fill_alt_text(
        page, FakeLookup({"dog.jpg": OSError("cannot identify image file"), "cat.jpg": "<unk>"})
    )
    assert result.data == page.read_bytes()
    assert [o.status for o in result.outcomes] == ["failed", "failed"]
    assert result.outcomes[0].message == "cannot identify image file"
    assert "has no usable words" in result.outcomes[1].message


MARKDOWN_PAGE = (
    "# Holiday\r\n\r\n"
    "Intro with *emphasis* and a [link](img/dog.jpg).\r\n\r\n"
    '![](img/dog.jpg)  ![  ](img/cat.jpg "Title kept") ![A kept alt](img/dog.jpg)\r\n\r\n'
    "`![](img/dog.jpg)` in code stays, and so does \\![](img/dog.jpg).\r\n\r\n"
    "    ![](img/dog.jpg)\r\n\r\n"
    "```\r\n![](img/cat.jpg)\r\n```\r\n\r\n"
    "[![](img/cat.jpg)](https://example.com)\r\n\r\n"
    "| photo | note |\r\n|---|---|\r\n| ![](<img/a b.jpg>) | spaced |\r\n\r\n"
    "![][ref] ![](https://example.com/x.png) ![](img/gone.png)\r\n\r\n"
    "[ref]: img/dog.jpg\r\n"
)


def test_markdown_fills_image_syntax_only(site: Path) -> None:
    page = site / "notes.md"
    page.write_bytes(MARKDOWN_PAGE.encode("utf-8"))
    lookup = FakeLookup(
        {
            "dog.jpg": "an image of a dog",
            "cat.jpg": "a cat [sleeping] *on* a_mat",
            "a b.jpg": "a space",
        }
    )
    result = fill_alt_text(page, lookup)
    cat = r"A cat \[sleeping\] \*on\* a\_mat."
    expected = (
        MARKDOWN_PAGE.replace(
            "![](img/dog.jpg)  ![  ](img/cat.jpg", f"![A dog.](img/dog.jpg)  ![{cat}](img/cat.jpg"
        )
        .replace("[![](img/cat.jpg)]", f"[![{cat}](img/cat.jpg)]")
        .replace("![](<img/a b.jpg>)", "![A space.](<img/a b.jpg>)")
        .replace("![][ref]", "![A dog.][ref]")
    )
    assert result.data.decode("utf-8") == expected
    assert [(o.line, o.status) for o in result.outcomes] == [
        (5, "filled"),
        (5, "filled"),
        (5, "kept"),
        (15, "filled"),
        (19, "filled"),
        (21, "filled"),
        (21, "skipped"),
        (21, "failed"),
    ]
    # The parser reads back exactly the alt text that was written.
    from markdown_it import MarkdownIt

    inline = [t for t in MarkdownIt("commonmark").parse(expected) if t.type == "inline"]
    alts = [c.content for t in inline for c in t.children or [] if c.type == "image"]
    assert "A cat \\[sleeping\\] \\*on\\* a\\_mat." in alts  # the source form ...
    rendered = MarkdownIt("commonmark").render(expected)
    assert (
        'alt="A cat [sleeping] on a_mat."' not in rendered
        and 'alt="A cat [sleeping] *on* a_mat."' in rendered
    )  # ... renders literally


def test_markdown_blank_alt_the_scan_cannot_place_is_reported_not_guessed() -> None:
    # Brackets across a blank line are no image at all; one line break inside them is.
    slots = find_markdown_images("![ \n \n](a.jpg)\n\npara ![  \n   ](b.jpg)\n")
    assert [(s.src, s.alt, s.line, s.problem) for s in slots] == [("b.jpg", "", 5, None)]
    # Inside a block quote the line break carries a "> ": a blank alt the narrow scan does not match.
    slots = find_markdown_images("> ![\n> ](a.jpg)\n\n![](c.jpg)\n")
    assert [(s.src, s.line, s.problem) for s in slots] == [
        ("a.jpg", 1, "image with blank alt text the scan could not locate; add it by hand"),
        ("c.jpg", 4, None),
    ]


# ---------------------------------------------------------------- store and model


def annotate(db: Path, path: Path, text: str, confidence: float | None = 0.9) -> None:
    stat = path.stat()
    words = text.split()
    attention = np.zeros((len(words), 2, 2), np.float32)
    caption = Caption(
        text=text,
        score=-0.3,
        words=words,
        attention=attention,
        alternatives=[Alternative(text, -0.3, confidence)],
        confidence=confidence,
    )
    with Store(db) as store:
        store.write_batch(
            [
                CaptionResult(
                    path=path.resolve(),
                    size=stat.st_size,
                    mtime=stat.st_mtime,
                    status="ok",
                    caption=caption,
                )
            ],
            "m@1",
            1,
        )


def test_store_captions_are_used_without_loading_a_model(site: Path, tmp_path: Path) -> None:
    db = tmp_path / "captions.db"
    annotate(db, site / "img" / "dog.jpg", "a dog <unk> in the park")
    with Store(db) as store:
        lookup = StoreThenModel(store, model_dir=tmp_path / "no-such-bundle")
        found = lookup([(site / "img" / "dog.jpg").resolve()])
    assert found == {(site / "img" / "dog.jpg").resolve(): "a dog <unk> in the park"}
    assert (lookup.from_store, lookup.from_model) == (1, 0)


def test_a_photo_changed_since_annotate_is_captioned_again(site: Path, tmp_path: Path) -> None:
    from caption_cli.errors import BundleError

    db = tmp_path / "captions.db"
    dog = (site / "img" / "dog.jpg").resolve()
    annotate(db, dog, "an old caption")
    os.utime(dog, (dog.stat().st_mtime + 60, dog.stat().st_mtime + 60))
    with (
        Store(db) as store,
        pytest.raises(BundleError),
    ):  # it went for the model: the stored caption is stale
        StoreThenModel(store, model_dir=tmp_path / "no-such-bundle")([dog])


def test_cli_alt_text_in_place_from_the_database(site: Path, tmp_path: Path) -> None:
    db = tmp_path / "captions.db"
    annotate(db, site / "img" / "dog.jpg", "a dog in the park")
    page = site / "p.html"
    page.write_text(
        '<p>x</p>\n<img src="img/dog.jpg">\n<img src="https://x.org/y.png">\n<img src="img/cat.jpg" alt="Mine">\n',
        encoding="utf-8",
    )
    page.chmod(0o640)
    result = CliRunner().invoke(app, ["alt-text", str(page), "--in-place", "--db", str(db)])
    assert result.exit_code == 0, result.output
    assert (
        page.read_text(encoding="utf-8")
        == '<p>x</p>\n<img src="img/dog.jpg" alt="A dog in the park.">\n<img src="https://x.org/y.png">\n<img src="img/cat.jpg" alt="Mine">\n'
    )
    assert page.stat().st_mode & 0o777 == 0o640
    assert (
        f"{page}: 1 filled (1 from the database, 0 from the model), 1 kept, 1 skipped (not local), "
        "0 held back (confidence below 0.50), 0 failed" in " ".join(result.output.split())
    )


@pytest.mark.parametrize(
    ("confidence", "minimum", "filled"),
    [(0.49, None, False), (0.5, None, True), (None, None, False), (0.2, "0.1", True), (None, "0", True),
     (0.95, "0.96", False)],
)
def test_cli_alt_text_holds_back_doubtful_captions(site: Path, tmp_path: Path, confidence, minimum,
                                                   filled: bool) -> None:
    db = tmp_path / "captions.db"
    annotate(db, site / "img" / "dog.jpg", "a dog in the park", confidence=confidence)
    page = site / "p.html"
    page.write_text('<img src="img/dog.jpg">\n', encoding="utf-8")
    extra = ["--min-confidence", minimum] if minimum is not None else []
    result = CliRunner().invoke(app, ["alt-text", str(page), "--in-place", "--db", str(db), *extra])
    assert result.exit_code == 0, result.output  # held back is not a failure
    expected = '<img src="img/dog.jpg" alt="A dog in the park.">\n' if filled else '<img src="img/dog.jpg">\n'
    assert page.read_text(encoding="utf-8") == expected
    shown = minimum or "0.5"
    assert (f"{int(filled)} filled" in result.output
            and f"{int(not filled)} held back (confidence below {float(shown):.2f})" in " ".join(result.output.split()))


def test_cli_alt_text_out_and_json_and_failures(site: Path, tmp_path: Path) -> None:
    db = tmp_path / "captions.db"
    annotate(db, site / "img" / "dog.jpg", "a dog")
    page = site / "p.md"
    page.write_text("![](img/dog.jpg)\n![](img/missing.jpg)\n", encoding="utf-8")
    out = tmp_path / "out.md"
    result = CliRunner().invoke(
        app, ["alt-text", str(page), "--out", str(out), "--db", str(db), "--json"]
    )
    assert result.exit_code == 1
    assert out.read_text(encoding="utf-8") == "![A dog.](img/dog.jpg)\n![](img/missing.jpg)\n"
    assert page.read_text(encoding="utf-8") == "![](img/dog.jpg)\n![](img/missing.jpg)\n"
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [(r["status"], r["line"], r["alt"]) for r in records] == [
        ("filled", 1, "A dog."),
        ("failed", 2, None),
    ]


@pytest.mark.parametrize(
    "args",
    [
        ["--in-place", "--out", "x.html"],
        ["--json"],
        ["--device", "tpu"],
        ["--model", "."],
        ["--limit", "5"],
    ],
)
def test_cli_alt_text_usage_errors(site: Path, args: list[str]) -> None:
    page = site / "p.html"
    page.write_text('<img src="img/dog.jpg">', encoding="utf-8")
    result = CliRunner().invoke(app, ["alt-text", str(page), *args])
    assert result.exit_code == 2, result.output
    assert page.read_text(encoding="utf-8") == '<img src="img/dog.jpg">'


def test_markdown_image_the_scan_cannot_place_is_left_alone(tmp_path: Path) -> None:
    page = tmp_path / "q.md"
    photo(tmp_path / "a.jpg")
    page.write_text("> ![\n> ](a.jpg)\n", encoding="utf-8")
    result = fill_alt_text(page, FakeLookup({"a.jpg": "a dog"}))
    assert result.data == page.read_bytes()
    assert [(o.status, o.src) for o in result.outcomes] == [("failed", "a.jpg")]


def test_photos_missing_from_the_database_are_captioned_by_the_model(
    site: Path, tmp_path: Path, tiny_bundle: Path
) -> None:
    from caption_cli import images
    from caption_cli.bundle import load_bundle
    from caption_cli.captioner import Captioner

    db = tmp_path / "captions.db"
    annotate(db, site / "img" / "dog.jpg", "a dog from the database")
    photo(site / "img" / "new.png", (200, 200, 20))
    page = site / "p.html"
    page.write_text(
        '<img src="img/dog.jpg"><img src="img/new.png"><img src="img/cat.jpg">', encoding="utf-8"
    )

    bundle = load_bundle(tiny_bundle)
    pixels = np.stack(
        [
            images.decode(site / "img" / name, bundle.image_size).pixels
            for name in ("cat.jpg", "new.png")
        ]
    )
    expected = [
        alt_text_from_caption(c.text) for c in Captioner(bundle, device="cpu").caption(pixels)
    ]

    with Store(db) as store:
        lookup = StoreThenModel(store, tiny_bundle, device="cpu")
        result = fill_alt_text(page, lookup)
    assert (lookup.from_store, lookup.from_model) == (1, 2)
    assert (result.outcomes[0].status, result.outcomes[0].alt) == (
        "filled",
        "A dog from the database.",
    )
    # A random tiny model may say only "<unk>": that photo fails with a reason instead of getting empty alt text.
    for outcome, alt in zip(result.outcomes[1:], [expected[1], expected[0]], strict=True):
        assert (outcome.status, outcome.alt) == (("filled", alt) if alt else ("failed", None))
        assert alt or "has no usable words" in outcome.message
        assert "<unk>" not in result.data.decode()
