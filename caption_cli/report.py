"""Static HTML gallery of a caption database: what the model said and where it looked.

The report is a folder that opens from disk with no network: pages with inline CSS,
JS and data, thumbnails in thumbs/ (made once, keyed by path+size+mtime so re-runs
reuse them) and a small search-index.js for searching across pages. Every string
from the database (captions, paths, errors) is untrusted and is escaped.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image, ImageOps

from caption_cli.confidence import passes
from caption_cli.images import register_heif_for

DEFAULT_PAGE_SIZE = 200
DEFAULT_THUMB_SIZE = 320  # longest side, px; sharp on a 2x screen at the 160 px card width
THUMB_DIR = "thumbs"
_THUMB_NAME = re.compile(r"^[0-9a-f]{24}\.jpg$")
_PAGE_NAME = re.compile(r"^page-(\d+)\.html$")


class ReportSource(Protocol):
    """What the report reads; caption_cli.store.Store provides it."""

    def iter_images(self, status: str | None = None) -> Iterator[dict[str, Any]]: ...

    def alternatives(self, image_id: int) -> list[dict[str, Any]]: ...

    def attention(self, image_id: int) -> list[tuple[str, np.ndarray]]: ...


@dataclass
class ReportSummary:
    """What build_report wrote."""

    out_dir: Path
    pages: int
    photos: int
    failed: int
    thumbs_made: int
    thumbs_reused: int
    thumb_errors: list[str]
    doubtful: int = 0  # captions below --min-confidence, marked on their cards

    @property
    def index(self) -> Path:
        return self.out_dir / "index.html"


# ---------------------------------------------------------------- thumbnails


def thumb_name(path: str, size: int | None, mtime: float | None, thumb_size: int) -> str:
    """File name of a photo's thumbnail; changes when the photo (size, mtime) or the thumb size does."""
    key = f"{path}\0{size}\0{mtime!r}\0{thumb_size}".encode("utf-8", "surrogateescape")
    return hashlib.sha256(key).hexdigest()[:24] + ".jpg"


def make_thumbnail(photo: Path, out: Path, thumb_size: int) -> tuple[int, int]:
    """Write an upright JPEG thumbnail (longest side thumb_size) and return its size.

    Written to a temporary name and renamed, so an interrupted run never leaves a
    truncated thumbnail that later runs would reuse.
    """
    register_heif_for(photo)
    with Image.open(photo) as image:
        image.draft("RGB", (thumb_size, thumb_size))  # JPEG DCT scaling: decode at 1/2..1/8 size
        image = ImageOps.exif_transpose(image)
        image = image.convert("RGB")
        image.thumbnail((thumb_size, thumb_size), Image.Resampling.LANCZOS)
        partial = out.with_name(out.name + ".part")
        image.save(partial, "JPEG", quality=82, optimize=True)
        os.replace(partial, out)
        return image.size


def _thumb_size_of(path: Path) -> tuple[int, int] | None:
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, ValueError):
        return None


def ensure_thumbnails(
    rows: list[dict[str, Any]],
    thumbs_dir: Path,
    thumb_size: int,
    workers: int = 4,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, tuple[str, int, int] | str], int, int]:
    """Thumbnail of each captioned photo: ({path: (name, w, h) or error}, made, reused).

    Pillow releases the GIL while decoding and resizing, so threads are enough.
    """
    thumbs_dir.mkdir(parents=True, exist_ok=True)
    todo = [row for row in rows if row.get("status") == "ok"]
    results: dict[str, tuple[str, int, int] | str] = {}
    made = reused = 0

    def one(row: dict[str, Any]) -> tuple[str, tuple[str, int, int] | str, bool]:
        """(path, (thumb name, w, h) or error, whether it was reused)."""
        name = thumb_name(row["path"], row.get("size"), row.get("mtime"), thumb_size)
        target = thumbs_dir / name
        existing = _thumb_size_of(target) if target.exists() else None
        if existing:
            return row["path"], (name, *existing), True
        try:
            width, height = make_thumbnail(Path(row["path"]), target, thumb_size)
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            return row["path"], f"no preview: {_one_line(error)}", False
        return row["path"], (name, width, height), False

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for done, (path, result, was_reused) in enumerate(pool.map(one, todo), start=1):
            results[path] = result
            if isinstance(result, tuple):
                reused += was_reused
                made += not was_reused
            if on_progress:
                on_progress(done, len(todo))
    return results, made, reused


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


# ---------------------------------------------------------------- page data


def attention_payload(words: list[tuple[str, np.ndarray]]) -> dict[str, Any]:
    """Per-word attention grids for the page's JS: words, grid [h, w], base64 uint8 maps.

    Each map is scaled to its own maximum: the question a reader asks is "where did
    it look for this word", not how peaked one step was compared with another.
    """
    if not words:
        return {"words": [], "grid": [0, 0], "maps": []}
    grid = [int(n) for n in np.asarray(words[0][1]).shape[:2]]
    maps = []
    for _, weights in words:
        weights = np.nan_to_num(np.asarray(weights, dtype=np.float32).reshape(grid), nan=0.0).clip(
            0, None
        )
        peak = float(weights.max())
        scaled = np.zeros_like(weights) if peak <= 0 else weights / peak
        maps.append(
            base64.b64encode(np.round(scaled * 255).astype(np.uint8).tobytes()).decode("ascii")
        )
    return {"words": [word for word, _ in words], "grid": grid, "maps": maps}


def _script_json(value: Any) -> str:
    """JSON that is safe inside a <script> element (no "</script>", no "<!--")."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return (
        text.replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


def _page_file(number: int) -> str:
    return "index.html" if number == 1 else f"page-{number}.html"


def _search_text(row: dict[str, Any], alternatives: list[dict[str, Any]]) -> str:
    parts = [row.get("caption") or "", row.get("error") or "", Path(row["path"]).name]
    parts += [alternative.get("caption") or "" for alternative in alternatives]
    return " ".join(" ".join(parts).lower().split())


# ---------------------------------------------------------------- rendering

e = html.escape


def render_card(
    index: int,
    row: dict[str, Any],
    alternatives: list[dict[str, Any]],
    words: list[str],
    thumb: tuple[str, int, int] | str | None,
    min_confidence: float = 0.0,
) -> str:
    """One photo's card: thumbnail + heat-map canvas, caption, confidence, words, alternatives, path.

    A caption below min_confidence (the shared confidence.passes rule) is still shown,
    marked as doubtful, but is not used as the thumbnail's alt text.
    """
    path = row["path"]
    status = "ok" if row.get("status") == "ok" else "error"
    caption = row.get("caption") or ""
    confidence = row.get("confidence")
    doubtful = status == "ok" and not passes(confidence, min_confidence)
    name = Path(path).name
    try:
        link = Path(path).as_uri()
    except ValueError:  # a relative path stored by hand: no link rather than a wrong one
        link = ""
    parts = [
        f'<article class="card {status}{" doubtful" if doubtful else ""}" data-status="{status}" data-index="{index}" data-text="{e(_search_text(row, alternatives))}">'
    ]
    if isinstance(thumb, tuple):
        file, width, height = thumb
        alt = "" if doubtful else caption
        image = f'<img src="{THUMB_DIR}/{e(file)}" width="{width}" height="{height}" alt="{e(alt)}" loading="lazy">'
        if link:
            image = f'<a href="{e(link)}">{image}</a>'
        parts.append(
            f'<div class="frame">{image}<canvas class="heat" hidden aria-hidden="true"></canvas></div>'
        )
    else:
        note = (
            thumb
            if isinstance(thumb, str)
            else ("no preview" if status == "ok" else "not captioned")
        )
        parts.append(
            f'<div class="frame missing" role="img" aria-label="{e(note)}"><span>{e(note)}</span></div>'
        )
    if status == "ok":
        parts.append(f'<p class="caption">{e(caption)}</p>')
        parts.append(_confidence_html(confidence, doubtful))
        if words and isinstance(thumb, tuple):
            buttons = "".join(
                f'<button type="button" class="word" data-word="{position}" aria-pressed="false">{e(word)}</button>'
                for position, word in enumerate(words)
            )
            parts.append(
                f'<p class="words" aria-label="Show where the model looked for each word">{buttons}</p>'
            )
        if alternatives:
            items = "".join(
                f'<li><span class="alt">{e(alt.get("caption") or "")}</span> '
                f'<span class="score" title="length-normalised log-probability; higher is better">{float(alt.get("score") or 0):.3f}</span>'
                + (f' <span class="score" title="calibrated confidence">p {float(alt["confidence"]):.2f}</span>'
                   if alt.get("confidence") is not None else "")
                + "</li>"
                for alt in alternatives
            )
            label = (
                "1 caption" if len(alternatives) == 1 else f"{len(alternatives)} captions, ranked"
            )
            parts.append(f"<details><summary>{label}</summary><ol>{items}</ol></details>")
    else:
        parts.append(f'<p class="error">{e(row.get("error") or "failed")}</p>')
    model = f" · {e(row['model_id'])}" if row.get("model_id") else ""
    path_html = f'<a href="{e(link)}">{e(name)}</a>' if link else e(name)
    parts.append(f'<p class="path" title="{e(path)}">{path_html}{model}</p></article>')
    return "".join(parts)


def _confidence_html(confidence: float | None, doubtful: bool) -> str:
    """The confidence line of a card; a doubtful caption says so in words, not only in colour."""
    shown = "unknown" if confidence is None else f"{float(confidence):.2f}"
    note = " · low: may be wrong, not used as alt text" if doubtful else ""
    title = "calibrated probability that the caption is acceptable"
    return f'<p class="confidence" title="{title}">confidence {shown}{note}</p>'


def render_page(
    number: int,
    pages: int,
    cards: list[str],
    attention: dict[str, Any],
    totals: dict[str, int],
    generated: str,
) -> str:
    """A full, self-contained page of the gallery."""
    nav = _render_nav(number, pages)
    stats = f"{totals['photos']} photos · {totals['ok']} captioned · {totals['error']} failed · generated {e(generated)}"
    title = "Captions" + (f" — page {number} of {pages}" if pages > 1 else "")
    body = (
        "\n".join(cards)
        if cards
        else '<p class="empty">No photos in the database yet. Run <code>caption-cli annotate DIR</code> first.</p>'
    )
    index_script = '<script src="search-index.js"></script>' if pages > 1 else ""
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="caption-cli">
<title>{title}</title>
<style>{_CSS}</style>
</head>
<body data-page="{number}" data-pages="{pages}">
<header>
<h1>{title}</h1>
<p class="stats">{stats}</p>
<form id="filters" role="search" onsubmit="return false">
<input type="search" id="q" placeholder="Search captions and file names" aria-label="Search captions and file names" autocomplete="off">
<select id="status" aria-label="Status"><option value="">All photos</option><option value="ok">Captioned</option><option value="error">Failed</option></select>
<output id="count" aria-live="polite"></output>
</form>
{nav}
</header>
<main id="gallery">
{body}
</main>
<p id="elsewhere" hidden></p>
<footer>{nav}<p class="hint">Hover or click a word to see where the model looked for it.</p></footer>
<script type="application/json" id="attention-data">{_script_json(attention)}</script>
{index_script}
<script>{_JS}</script>
</body>
</html>
"""


def _render_nav(number: int, pages: int) -> str:
    if pages <= 1:
        return ""
    links = []
    if number > 1:
        links.append(
            f'<a class="page-link" rel="prev" href="{_page_file(number - 1)}">← Previous</a>'
        )
    for page in range(1, pages + 1):
        if page == number:
            links.append(f'<span aria-current="page">{page}</span>')
        elif page in (1, pages) or abs(page - number) <= 3:
            links.append(f'<a class="page-link" href="{_page_file(page)}">{page}</a>')
        elif links[-1] != "…":
            links.append("…")
    if number < pages:
        links.append(f'<a class="page-link" rel="next" href="{_page_file(number + 1)}">Next →</a>')
    return f'<nav class="pages" aria-label="Pages">{" ".join(links)}</nav>'


# ---------------------------------------------------------------- the report


def build_report(
    source: ReportSource,
    out_dir: Path,
    page_size: int = DEFAULT_PAGE_SIZE,
    thumb_size: int = DEFAULT_THUMB_SIZE,
    workers: int = 4,
    on_progress: Callable[[int, int], None] | None = None,
    min_confidence: float = 0.0,
) -> ReportSummary:
    """Write the gallery for every photo in the source to out_dir (index.html, page-N.html, thumbs/).

    Rows are read once (light: no attention); alternatives and attention are read page
    by page, so memory grows with the number of photos, not with their attention maps.
    """
    if page_size < 1:
        raise ValueError(f"page size must be at least 1, got {page_size}")
    if thumb_size < 16:
        raise ValueError(f"thumbnail size must be at least 16 px, got {thumb_size}")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = sorted(source.iter_images(), key=lambda row: row["path"])
    thumbs, made, reused = ensure_thumbnails(
        rows, out_dir / THUMB_DIR, thumb_size, workers, on_progress
    )
    totals = {"photos": len(rows), "ok": sum(row.get("status") == "ok" for row in rows)}
    totals["error"] = totals["photos"] - totals["ok"]
    pages = max(1, -(-len(rows) // page_size))
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    index_entries = []

    for number in range(1, pages + 1):
        cards, attention = [], {}
        for index, row in enumerate(rows[(number - 1) * page_size : number * page_size]):
            ok = row.get("status") == "ok"
            alternatives = source.alternatives(row["id"]) if ok else []
            words = source.attention(row["id"]) if ok else []
            payload = attention_payload(words)
            if payload["words"]:
                attention[str(index)] = payload
            cards.append(
                render_card(index, row, alternatives, payload["words"], thumbs.get(row["path"]), min_confidence)
            )
            index_entries.append(
                [number, index, _search_text(row, alternatives), "ok" if ok else "error"]
            )
        _write_text(
            out_dir / _page_file(number),
            render_page(number, pages, cards, attention, totals, generated),
        )

    _write_text(
        out_dir / "search-index.js", f"window.CAPTION_INDEX = {_script_json(index_entries)};\n"
    )
    _prune(out_dir, pages, {entry[0] for entry in thumbs.values() if isinstance(entry, tuple)})
    errors = [f"{path}: {entry}" for path, entry in thumbs.items() if isinstance(entry, str)]
    doubtful = sum(row.get("status") == "ok" and not passes(row.get("confidence"), min_confidence) for row in rows)
    return ReportSummary(out_dir, pages, totals["photos"], totals["error"], made, reused, errors, doubtful)


def _write_text(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".part")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def _prune(out_dir: Path, pages: int, used_thumbs: set[str]) -> None:
    """Remove pages and thumbnails an earlier, larger run left behind (only names this module writes)."""
    for page in out_dir.glob("page-*.html"):
        match = _PAGE_NAME.match(page.name)
        if match and int(match.group(1)) > pages:
            page.unlink()
    for thumb in (out_dir / THUMB_DIR).iterdir():
        if _THUMB_NAME.match(thumb.name) and thumb.name not in used_thumbs:
            thumb.unlink()


# ---------------------------------------------------------------- inline assets

_CSS = """
:root { color-scheme: light dark; --bg: #f6f6f4; --fg: #1d1d1b; --muted: #66665f; --card: #fff; --line: #deded8; --accent: #b3470f; }
@media (prefers-color-scheme: dark) { :root { --bg: #161615; --fg: #ececea; --muted: #a3a39b; --card: #222220; --line: #3a3a36; --accent: #ff9a5c; } }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; background: var(--bg); color: var(--fg); }
header, footer { padding: 1rem 1.5rem; }
h1 { margin: 0 0 .25rem; font-size: 1.4rem; }
.stats, .hint, .path, .score, .confidence { color: var(--muted); }
.doubtful .caption { font-style: italic; opacity: .7; }
#filters { display: flex; gap: .5rem; flex-wrap: wrap; align-items: center; margin: .75rem 0; }
#q { flex: 1 1 18rem; max-width: 32rem; padding: .45rem .6rem; font: inherit; }
select { padding: .4rem; font: inherit; }
nav.pages { display: flex; gap: .4rem; flex-wrap: wrap; }
nav.pages a, nav.pages span { padding: .15rem .45rem; }
nav.pages [aria-current] { font-weight: 700; border-bottom: 2px solid var(--accent); }
#gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(17rem, 1fr)); gap: 1rem; padding: 0 1.5rem 1rem; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: .75rem; min-width: 0; }
.card[hidden] { display: none; }
.card.error { border-color: var(--accent); }
.frame { position: relative; display: block; width: fit-content; max-width: 100%; margin: 0 auto .5rem; }
.frame img { display: block; max-width: 100%; max-height: 16rem; width: auto; height: auto; border-radius: 4px; }
.frame canvas.heat { position: absolute; inset: 0; width: 100%; height: 100%; pointer-events: none; border-radius: 4px; mix-blend-mode: normal; }
.frame.missing { width: 100%; aspect-ratio: 4 / 3; display: grid; place-items: center; background: var(--line); border-radius: 4px; color: var(--muted); padding: .5rem; text-align: center; font-size: .85rem; }
.caption { margin: .25rem 0; font-size: 1.05rem; }
.words { display: flex; flex-wrap: wrap; gap: .25rem; margin: .35rem 0; }
.word { font: inherit; font-size: .85rem; padding: .1rem .4rem; border: 1px solid var(--line); border-radius: 999px; background: transparent; color: inherit; cursor: pointer; }
.word:hover, .word:focus-visible, .word[aria-pressed="true"] { border-color: var(--accent); color: var(--accent); }
.word[aria-pressed="true"] { font-weight: 700; }
details { margin: .35rem 0; font-size: .9rem; }
details ol { margin: .35rem 0; padding-left: 1.4rem; }
details li:first-child .alt { font-weight: 600; }
.error { color: var(--accent); overflow-wrap: anywhere; }
.path { margin: .35rem 0 0; font-size: .8rem; overflow-wrap: anywhere; }
.path a { color: inherit; }
#elsewhere { padding: 0 1.5rem; }
.empty { padding: 2rem 0; }
"""

_JS = r"""
(() => {
  "use strict";
  const attention = JSON.parse(document.getElementById("attention-data").textContent);
  const cards = Array.from(document.querySelectorAll("#gallery .card"));
  const q = document.getElementById("q");
  const status = document.getElementById("status");
  const count = document.getElementById("count");
  const elsewhere = document.getElementById("elsewhere");
  const page = Number(document.body.dataset.page);
  // Perceptual ramp (dark purple -> orange -> pale yellow), alpha grows with the weight.
  const stops = [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]];

  function colour(v) {
    const x = Math.min(Math.max(v, 0), 1) * (stops.length - 1);
    const i = Math.min(Math.floor(x), stops.length - 2), f = x - i;
    return stops[i].map((c, k) => Math.round(c + (stops[i + 1][k] - c) * f));
  }

  function showWord(card, position) {
    const data = attention[card.dataset.index];
    const canvas = card.querySelector("canvas.heat");
    if (!data || !canvas) return;
    const [h, w] = data.grid;
    const bytes = atob(data.maps[position]);
    const small = document.createElement("canvas");
    small.width = w; small.height = h;
    const sctx = small.getContext("2d");
    const pixels = sctx.createImageData(w, h);
    for (let k = 0; k < w * h; k++) {
      const v = bytes.charCodeAt(k) / 255, [r, g, b] = colour(v);
      pixels.data.set([r, g, b, Math.round(70 + 150 * v)], k * 4);
    }
    sctx.putImageData(pixels, 0, 0);
    canvas.width = w * 32; canvas.height = h * 32;
    const ctx = canvas.getContext("2d");
    ctx.imageSmoothingEnabled = true; ctx.imageSmoothingQuality = "high";
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    ctx.drawImage(small, 0, 0, canvas.width, canvas.height);
    canvas.hidden = false;
    canvas.dataset.word = String(position);
  }

  function hide(card) {
    const canvas = card.querySelector("canvas.heat");
    if (canvas) { canvas.hidden = true; delete canvas.dataset.word; }
  }

  function pinned(card) { return card.querySelector('.word[aria-pressed="true"]'); }

  for (const card of cards) {
    for (const button of card.querySelectorAll(".word")) {
      const position = Number(button.dataset.word);
      button.addEventListener("mouseenter", () => showWord(card, position));
      button.addEventListener("focus", () => showWord(card, position));
      const restore = () => { const p = pinned(card); p ? showWord(card, Number(p.dataset.word)) : hide(card); };
      button.addEventListener("mouseleave", restore);
      button.addEventListener("blur", restore);
      button.addEventListener("click", () => {
        const wasPinned = button.getAttribute("aria-pressed") === "true";
        for (const other of card.querySelectorAll(".word")) other.setAttribute("aria-pressed", "false");
        if (wasPinned) { hide(card); } else { button.setAttribute("aria-pressed", "true"); showWord(card, position); }
      });
    }
  }

  function terms() { return q.value.toLowerCase().split(/\s+/).filter(Boolean); }
  function matches(text, st, words) { return (!status.value || st === status.value) && words.every((t) => text.includes(t)); }

  function applyFilters() {
    const words = terms();
    let shown = 0;
    for (const card of cards) {
      const ok = matches(card.dataset.text, card.dataset.status, words);
      card.hidden = !ok;
      if (ok) shown++;
    }
    count.value = (words.length || status.value) ? `${shown} of ${cards.length} on this page` : "";
    const hash = new URLSearchParams();
    if (q.value) hash.set("q", q.value);
    if (status.value) hash.set("status", status.value);
    const suffix = hash.toString() ? "#" + hash.toString() : "";
    try { history.replaceState(null, "", location.pathname + location.search + suffix); } catch (error) { /* some browsers refuse on file: URLs */ }
    for (const link of document.querySelectorAll("a.page-link")) link.hash = suffix;
    showElsewhere(words, suffix);
  }

  function showElsewhere(words, suffix) {
    const index = window.CAPTION_INDEX;
    if (!index || !(words.length || status.value)) { elsewhere.hidden = true; return; }
    const perPage = new Map();
    for (const [p, , text, st] of index) {
      if (p !== page && matches(text, st, words)) perPage.set(p, (perPage.get(p) || 0) + 1);
    }
    elsewhere.replaceChildren();
    if (!perPage.size) { elsewhere.hidden = true; return; }
    elsewhere.append("Also on other pages: ");
    [...perPage.entries()].sort((a, b) => a[0] - b[0]).forEach(([p, n], i) => {
      if (i) elsewhere.append(", ");
      const link = document.createElement("a");
      link.href = (p === 1 ? "index.html" : `page-${p}.html`) + suffix;
      link.textContent = `page ${p} (${n})`;
      elsewhere.append(link);
    });
    elsewhere.hidden = false;
  }

  const initial = new URLSearchParams(location.hash.slice(1));
  q.value = initial.get("q") || "";
  status.value = initial.get("status") || "";
  q.addEventListener("input", applyFilters);
  status.addEventListener("change", applyFilters);
  applyFilters();
  document.body.dataset.ready = "true";
})();
"""
