"""Fill missing alt text in HTML pages and Markdown files from photo captions.

Only the alt attribute (HTML) or the bracketed alt text (Markdown) of an image is
rewritten; every other byte of the file stays as it was, so the result diffs cleanly
and hand-written markup survives. A real parser decides what is an image: html.parser
for HTML (start-tag positions), markdown-it-py for Markdown. Existing non-empty alt
text is never touched: a person wrote it, and it is better than a model's guess.
"""

from __future__ import annotations

import codecs
import html
import os
import re
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

from caption_cli.confidence import held_back_message, passes

DEFAULT_LIMIT = 125  # screen-reader guidance: keep alt text short (WebAIM, W3C WAI tips)

# "A photo of a dog" tells a screen-reader user nothing the role "image" did not.
_REDUNDANT_PREFIX = re.compile(
    r"^\s*(?:(?:this|it)\s+is\s+)?(?:(?:a|an|the)\s+)?(?:close[- ]?up\s+)?"
    r"(?:image|picture|photo|photograph|snapshot)\s+(?:of|showing|shows|depicting)\s+",
    re.IGNORECASE,
)
_SPECIAL_TOKEN = re.compile(r"<(?:unk|pad|start|end)>", re.IGNORECASE)
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,;:!?])")
# Words a cut caption should not end on ("a dog with a." reads broken).
_DANGLING = {
    "a",
    "an",
    "the",
    "and",
    "or",
    "of",
    "with",
    "in",
    "on",
    "at",
    "to",
    "by",
    "for",
    "from",
    "while",
    "near",
}


def alt_text_from_caption(caption: str, limit: int = DEFAULT_LIMIT) -> str:
    """Accessible alt text for a model caption ("" when nothing usable is left).

    Drops <unk> and other special tokens, the redundant "image of" style prefix,
    puts the caption in sentence case with a final period and cuts it at a word
    boundary to at most `limit` characters (period included).
    """
    if limit < 2:
        raise ValueError(f"alt text limit must be at least 2 characters, got {limit}")
    text = _SPECIAL_TOKEN.sub(" ", caption)
    text = " ".join(text.split())
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    previous = None
    while previous != text:  # "a photo of an image of a cat"
        previous = text
        text = _REDUNDANT_PREFIX.sub("", text)
    text = _drop_dangling(text.strip(" ,;:-"))
    if not text.strip(".!?"):
        return ""
    if not text.endswith((".", "!", "?")):
        text += "."
    if len(text) > limit:
        text = _cut_at_word(text, limit - 1) + "."
    return text[0].upper() + text[1:]


def _drop_dangling(text: str) -> str:
    """Without trailing "a", "the", "with"...: a caption stopped at max_length ends mid-phrase."""
    words = text.split(" ")
    while len(words) > 1 and words[-1].lower().strip(",;:.!?") in _DANGLING:
        words.pop()
    return " ".join(words).rstrip(" ,;:-")


def _cut_at_word(text: str, width: int) -> str:
    """At most `width` characters of text, ending at a whole word that can end a sentence."""
    cut = text[: width + 1]
    if cut[-1] != " " and " " in cut:  # the last word is cut in the middle: drop it
        cut = cut[: cut.rfind(" ")]
    return _drop_dangling(cut[:width].strip()).rstrip(" ,;:.!?-") or text[:width]


# ---------------------------------------------------------------- finding images


@dataclass
class ImageSlot:
    """One image in a page and where its alt text goes.

    `start:end` is the span of the page text replaced by `render(alt)`: the alt
    attribute (or the insertion point after src) in HTML, the inside of the brackets
    in Markdown. `alt` is the current alt text, None when the attribute is absent.
    """

    src: str
    alt: str | None
    line: int
    start: int
    end: int
    render: Callable[[str], str]
    decorative: bool = False  # role="presentation"/"none" or aria-hidden="true": alt="" is intended
    problem: str | None = None  # set when the image was found but cannot be edited safely


class _ImgTagParser(HTMLParser):
    """Collects <img> start tags with their raw text and (line, column) position."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[int, int, str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            line, column = self.getpos()
            raw = self.get_starttag_text() or ""
            self.tags.append(
                (line, column, raw, dict(reversed(attrs)))
            )  # first occurrence wins, as in browsers

    handle_startendtag = handle_starttag


# Attribute tokens inside a start tag, following the WHATWG tokenizer states
# (name up to whitespace / = >; value quoted or unquoted). Used only to find the
# spans of attributes html.parser has already recognised.
_ATTRIBUTE = re.compile(
    r"""(?P<name>[^\s/>][^\s/>=]*)
        (?:\s*=\s*(?P<value>"[^"]*"|'[^']*'|[^\s>]+))?""",
    re.VERBOSE,
)


def _attribute_spans(tag_text: str) -> dict[str, tuple[int, int, str | None]]:
    """(start, end, value) of each attribute (first occurrence) in a raw start tag, by lower-cased name."""
    spans: dict[str, tuple[int, int, str | None]] = {}
    name_end = re.match(r"<[^\s/>]+", tag_text)
    position = name_end.end() if name_end else 1
    while True:
        while position < len(tag_text) and (
            tag_text[position].isspace() or tag_text[position] == "/"
        ):
            position += 1
        if position >= len(tag_text) or tag_text[position] == ">":
            return spans
        match = _ATTRIBUTE.match(tag_text, position)
        if match is None:  # cannot happen for text html.parser accepted; be safe
            return spans
        value = match.group("value")
        if value is not None:
            value = html.unescape(value[1:-1] if value[0] in "\"'" else value)
        spans.setdefault(match.group("name").lower(), (*match.span(), value))
        position = match.end()


def find_html_images(text: str) -> list[ImageSlot]:
    """Every <img> with a src in an HTML document, in document order.

    Images inside comments, <script> and <style> are not images, and html.parser
    knows that; positions come from the parser, attribute spans from the raw tag.
    """
    parser = _ImgTagParser()
    parser.feed(text)
    parser.close()
    line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
    slots = []
    for line, column, raw, attrs in parser.tags:
        src = attrs.get("src")
        if src is None:
            continue
        tag_start = line_starts[line - 1] + column
        slot = ImageSlot(
            src=src.strip(), alt=attrs.get("alt"), line=line, start=0, end=0, render=_html_alt
        )
        role = (attrs.get("role") or "").strip().lower()
        slot.decorative = (
            role in {"presentation", "none"}
            or (attrs.get("aria-hidden") or "").strip().lower() == "true"
        )
        spans = _attribute_spans(raw)
        # Edit only where this scan and the parser agree on the tag and its src/alt values.
        agreed = text[tag_start : tag_start + len(raw)] == raw and all(
            (spans[name][2] if name in spans else None) == attrs.get(name)
            for name in ("src", "alt")
        )
        if not agreed:
            slot.problem = "could not locate the tag in the source"
        elif "alt" in spans:
            slot.start, slot.end = tag_start + spans["alt"][0], tag_start + spans["alt"][1]
        else:  # insert right after src, where a reader looks for it
            slot.start = slot.end = tag_start + spans["src"][1]
            slot.render = lambda alt: " " + _html_alt(alt)
        slots.append(slot)
    return slots


def _html_alt(alt: str) -> str:
    return f'alt="{html.escape(alt, quote=True)}"'


_MD_BLANK_ALT = re.compile(r"!\[([ \t]*(?:\r?\n[ \t]*)?)\](?=[(\[])")
_MD_ESCAPE = re.compile(r"([\\`*_\[\]<>&!])")


def find_markdown_images(text: str) -> list[ImageSlot]:
    """Every image in a Markdown document, in document order (CommonMark + tables).

    markdown-it-py decides what is an image but reports only line ranges, so the
    position of each blank alt comes from a scan restricted to `![ ](` / `![ ][`
    whose hits are confirmed by the parser: each hit gets a unique marker as alt
    text, the marked copy is parsed, and only markers that come back as an image's
    alt are real images (not code spans, escapes or HTML). Markers change no
    structure: they only make a blank alt non-blank. Images with text in their alt
    need no position; a blank alt the scan missed is reported, never guessed at.
    """
    md = _markdown_parser()
    salt = secrets.token_hex(4)
    while salt in text:
        salt = secrets.token_hex(4)
    candidates = list(_MD_BLANK_ALT.finditer(text))
    marked, cursor = [], 0
    for number, match in enumerate(candidates):
        marked += [text[cursor : match.start(1)], f"CCALT{salt}N{number}X"]
        cursor = match.end(1)
    marked.append(text[cursor:])
    by_marker = {f"CCALT{salt}N{n}X": match for n, match in enumerate(candidates)}

    slots = []
    for src, alt, line in _md_images(md, "".join(marked)):
        match = by_marker.get(alt.strip())
        if match is not None:
            slots.append(
                ImageSlot(
                    src, "", text.count("\n", 0, match.start()) + 1, *match.span(1), _markdown_alt
                )
            )
        elif alt.strip():
            slots.append(ImageSlot(src, alt, line, 0, 0, _markdown_alt))
        else:  # blank alt in a layout the scan does not match (e.g. split inside a block quote)
            problem = "image with blank alt text the scan could not locate; add it by hand"
            slots.append(ImageSlot(src, "", line, 0, 0, _markdown_alt, problem=problem))
    return slots


def _markdown_parser():  # noqa: ANN202 - markdown_it is imported lazily, only for .md files
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark").enable("table")


def _md_images(md, text: str) -> Iterable[tuple[str, str, int]]:  # noqa: ANN001
    """(src, alt source text, first line of the block) of each image, in order."""
    for block in md.parse(text):
        if block.type != "inline" or not block.children:
            continue
        line = block.map[0] + 1 if block.map else 0
        for token in block.children:
            if token.type == "image":
                yield str(token.attrs.get("src", "")), token.content, line


def _markdown_alt(alt: str) -> str:
    return _MD_ESCAPE.sub(r"\\\1", " ".join(alt.split()))


# ---------------------------------------------------------------- filling


@dataclass
class AltOutcome:
    """What happened to one image: filled, kept (has alt or is decorative), skipped (remote/data/no src),
    low-confidence (a caption below --min-confidence was held back) or failed."""

    line: int
    src: str
    status: str
    alt: str | None = None
    message: str | None = None


@dataclass
class AltTextResult:
    """The rewritten file and one outcome per image."""

    data: bytes
    outcomes: list[AltOutcome] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for outcome in self.outcomes if outcome.status == status)


class HeldBack(Exception):
    """A caption exists but is below --min-confidence; the message says by how much."""


# Looks up captions for local image files: path -> caption, or an Exception for a file
# that could not be captioned (HeldBack for one too doubtful to use). Called once per
# page with every path that needs one.
CaptionLookup = Callable[[list[Path]], dict[Path, "str | Exception"]]


def local_image_path(src: str, page_dir: Path, site_root: Path | None = None) -> Path | None:
    """The file a src points to, or None when it is not a local file (http, data:, mailto...)."""
    parts = urlsplit(src)
    if parts.scheme == "file":
        return Path(unquote(parts.path))
    if parts.scheme or parts.netloc or not parts.path:  # http:, data:, //cdn..., "#x"
        return None
    path = unquote(parts.path)
    if path.startswith("/"):
        return (site_root or page_dir) / path.lstrip("/")
    return page_dir / path


def fill_alt_text(
    page: Path,
    lookup: CaptionLookup,
    limit: int = DEFAULT_LIMIT,
    keep_empty: bool = False,
    site_root: Path | None = None,
) -> AltTextResult:
    """Alt text for every local image of an HTML or Markdown page that lacks it.

    Markdown when the suffix is .md/.markdown, HTML otherwise. `keep_empty` leaves
    alt="" alone (the standard marker for decorative images); images marked
    decorative with role or aria-hidden are always kept. Raises OSError/ValueError
    only for the page itself; each image's problem becomes its outcome.
    """
    markdown = page.suffix.lower() in {".md", ".markdown"}
    raw = page.read_bytes()
    bom, codec = _sniff_encoding(raw, markdown)
    body = raw[len(bom) :]
    text = body.decode(codec, errors="surrogateescape")
    if text.encode(codec, errors="surrogateescape") != body:
        raise ValueError(
            f"{page}: its {codec} text does not survive a round trip; refusing to rewrite it"
        )

    slots = find_markdown_images(text) if markdown else find_html_images(text)
    page_dir = page.parent
    outcomes: list[AltOutcome | None] = []
    wanted: dict[int, Path] = {}
    for index, slot in enumerate(slots):
        outcome = _triage(slot, keep_empty)
        if outcome is None:
            target = local_image_path(slot.src, page_dir, site_root)
            if target is None:
                outcome = AltOutcome(slot.line, slot.src, "skipped", message="not a local file")
            elif not target.is_file():
                outcome = AltOutcome(
                    slot.line, slot.src, "failed", message=f"file not found: {target}"
                )
            else:
                wanted[index] = target.resolve()
        outcomes.append(outcome)

    captions = lookup(sorted(set(wanted.values()))) if wanted else {}
    edits: list[tuple[int, int, str]] = []
    for index, target in wanted.items():
        slot = slots[index]
        caption = captions.get(target, Exception("no caption"))
        if isinstance(caption, HeldBack):  # no alt text is better than wrong alt text
            outcomes[index] = AltOutcome(slot.line, slot.src, "low-confidence", message=str(caption))
            continue
        if isinstance(caption, Exception):
            outcomes[index] = AltOutcome(
                slot.line, slot.src, "failed", message=str(caption) or type(caption).__name__
            )
            continue
        alt = alt_text_from_caption(caption, limit)
        if not alt:
            outcomes[index] = AltOutcome(
                slot.line,
                slot.src,
                "failed",
                message=f"the caption {caption!r} has no usable words",
            )
            continue
        rendered = slot.render(alt)
        if not markdown and codec.replace("_", "-").lower() not in {
            "utf-8",
            "utf-16-le",
            "utf-16-be",
        }:
            rendered = rendered.encode(codec, errors="xmlcharrefreplace").decode(codec)
        edits.append((slot.start, slot.end, rendered))
        outcomes[index] = AltOutcome(slot.line, slot.src, "filled", alt=alt)

    pieces, cursor = [], 0
    for start, end, replacement in sorted(edits):
        pieces += [text[cursor:start], replacement]
        cursor = end
    pieces.append(text[cursor:])
    data = bom + "".join(pieces).encode(codec, errors="surrogateescape")
    return AltTextResult(data, [outcome for outcome in outcomes if outcome is not None])


def _triage(slot: ImageSlot, keep_empty: bool) -> AltOutcome | None:
    """The outcome of an image that needs no caption, or None when it needs one."""
    if slot.problem:
        return AltOutcome(slot.line, slot.src, "failed", message=slot.problem)
    if slot.alt is not None and slot.alt.strip():
        return AltOutcome(slot.line, slot.src, "kept", alt=slot.alt)
    if slot.decorative or (keep_empty and slot.alt is not None):
        return AltOutcome(
            slot.line, slot.src, "kept", alt=slot.alt, message="decorative (empty alt kept)"
        )
    return None


_BOMS = [
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
]
_META_CHARSET = re.compile(
    rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.IGNORECASE
)


def _sniff_encoding(raw: bytes, markdown: bool) -> tuple[bytes, str]:
    """(byte-order mark, codec) as a browser would pick them: BOM, then <meta charset>, then UTF-8."""
    for bom, codec in _BOMS:
        if raw.startswith(bom):
            return bom, codec
    if not markdown:
        match = _META_CHARSET.search(raw[:1024])
        if match:
            try:
                name = codecs.lookup(match.group(1).decode("ascii")).name
            except LookupError:
                name = "utf-8"
            return b"", "utf-8" if name in {
                "utf-16",
                "utf-16-le",
                "utf-16-be",
            } else name  # a <meta> in ASCII is not UTF-16
    return b"", "utf-8"


# ---------------------------------------------------------------- caption sources


class StoreThenModel:
    """Caption lookup: the database first (photos already annotated), the model for the rest.

    The model is loaded only when a photo is missing from the database, so filling a
    page of already annotated photos never touches onnxruntime.
    """

    def __init__(
        self,
        store: object | None,
        model_dir: Path | None,
        device: str = "auto",
        batch_size: int = 16,
        min_confidence: float = 0.0,
    ) -> None:
        self.store = store
        self.min_confidence = min_confidence
        self.model_dir = model_dir
        self.device = device
        self.batch_size = batch_size
        self.from_store = 0
        self.from_model = 0
        self._captioner = None
        self._bundle = None

    def __call__(self, paths: list[Path]) -> dict[Path, str | Exception]:
        found: dict[Path, str | Exception] = {}
        missing = []
        for path in paths:
            row = None
            if self.store is not None:  # stored paths are real paths; older rows may be as typed
                row = self.store.get_image(os.path.realpath(path)) or self.store.get_image(str(path))
            if row and row.get("status") == "ok" and row.get("caption") and _same_file(row, path):
                found[path] = self._checked(row["caption"], row.get("confidence"))
                self.from_store += 1
            else:
                missing.append(path)
        for first in range(0, len(missing), self.batch_size):
            found.update(self._caption(missing[first : first + self.batch_size]))
        return found

    def _caption(self, paths: list[Path]) -> dict[Path, str | Exception]:
        import numpy as np

        from caption_cli import images
        from caption_cli.errors import ImageError

        captioner = self._load()
        out: dict[Path, str | Exception] = {}
        decoded = []
        for path in paths:
            image = images.decode(path, self._bundle.image_size)
            if image.error or image.pixels is None:
                out[path] = ImageError(image.error or "could not decode")
            else:
                decoded.append((path, image.pixels))
        if decoded:
            captions = captioner.caption(np.stack([pixels for _, pixels in decoded]))
            for (path, _), caption in zip(decoded, captions, strict=True):
                out[path] = self._checked(caption.text, caption.confidence)
                self.from_model += 1
        return out

    def _checked(self, caption: str, confidence: float | None) -> str | HeldBack:
        """The caption, or HeldBack when the shared --min-confidence rule says no."""
        if passes(confidence, self.min_confidence):
            return caption
        return HeldBack(held_back_message(confidence, self.min_confidence))

    def _load(self):  # noqa: ANN202 - the Captioner type is imported lazily
        if self._captioner is None:
            from caption_cli.bundle import load_bundle
            from caption_cli.captioner import Captioner

            self._bundle = load_bundle(self.model_dir)
            self._captioner = Captioner(self._bundle, device=self.device)
        return self._captioner


def _same_file(row: dict, path: Path) -> bool:
    """The stored caption is for this version of the file (same size and mtime)."""
    try:
        stat = path.stat()
    except OSError:
        return False
    size, mtime = row.get("size"), row.get("mtime")
    return (size is None or size == stat.st_size) and (
        mtime is None or abs(float(mtime) - stat.st_mtime) < 1e-3
    )
