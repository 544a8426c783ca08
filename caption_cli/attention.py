"""Attention heat-maps: where the model looked for each word, as one PNG.

Pillow and numpy only. The grid [h, w] covers the whole photo (the model sees the whole
photo squashed to a square), so each word's map is stretched over the full photo and
upsampled bicubically, which gives the smooth blobs of the Show, Attend and Tell paper.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

from caption_cli.errors import ImageError
from caption_cli.images import register_heif_for

PANEL = 224  # longer side of each panel, px
COLUMNS = 4
GAP = 8  # px between panels
LABEL = 22  # px under each panel for its word
OPACITY = 0.6  # of the heat colours over the photo
# inferno-like colour ramp: dark where the model did not look, bright yellow where it did
_RAMP_AT = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_RAMP_RGB = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32)


def heatmap_png(photo_path: Path | str, words: Sequence[str], attention: np.ndarray, out_png: Path | str,
                *, panel: int = PANEL, columns: int = COLUMNS) -> Path:
    """Write a grid of panels: the photo, then one per word with its attention [T, h, w] over it.

    Raises ImageError when the photo cannot be read, ValueError when words and attention disagree.
    """
    attention = np.asarray(attention, dtype=np.float32)
    if attention.ndim != 3 or attention.shape[0] != len(words):
        raise ValueError(f"attention must be [T, h, w] with T = {len(words)} words, got shape {attention.shape}")
    photo = _open_photo(Path(photo_path), panel)
    font = _font(14)
    panels = [(photo, "photo")] + [(_overlay(photo, weights), word) for word, weights in zip(words, attention)]

    cols = max(1, min(columns, len(panels)))
    rows = math.ceil(len(panels) / cols)
    title = LABEL + GAP
    canvas = Image.new("RGB", (GAP + cols * (panel + GAP), title + GAP + rows * (panel + LABEL + GAP)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((GAP, GAP), _fit(draw, " ".join(words), font, canvas.width - 2 * GAP), fill="black", font=font)
    for index, (image, label) in enumerate(panels):
        row, col = divmod(index, cols)
        x = GAP + col * (panel + GAP)
        y = title + GAP + row * (panel + LABEL + GAP)
        canvas.paste(image, (x + (panel - image.width) // 2, y + (panel - image.height) // 2))
        text = _fit(draw, label, font, panel)
        width = draw.textlength(text, font=font)
        draw.text((x + (panel - width) / 2, y + panel + 3), text, fill="black", font=font)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, format="PNG")
    return out


def _open_photo(path: Path, panel: int) -> Image.Image:
    """The upright photo, fitted inside panel x panel."""
    register_heif_for(path)
    try:
        with Image.open(path) as image:
            image.draft("RGB", (panel, panel))  # JPEG: decode at a reduced scale, much faster
            image = ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError) as exc:
        raise ImageError(f"{path}: cannot be read ({exc})") from None
    image.thumbnail((panel, panel), Image.Resampling.LANCZOS)
    return image


def _overlay(photo: Image.Image, weights: np.ndarray) -> Image.Image:
    """The photo under one word's attention [h, w], stretched smoothly over it."""
    grid = Image.fromarray(np.ascontiguousarray(weights, dtype=np.float32))  # mode F
    smooth = np.asarray(grid.resize(photo.size, Image.Resampling.BICUBIC), dtype=np.float32)  # [H, W]
    smooth = np.clip(smooth, 0.0, None)  # bicubic overshoots below zero at edges
    peak = float(smooth.max())
    level = smooth / peak if peak > 0 else smooth  # [H, W] in [0, 1]: each word on its own scale
    heat = np.stack([np.interp(level, _RAMP_AT, _RAMP_RGB[:, c]) for c in range(3)], axis=-1)  # [H, W, 3]
    mixed = (1.0 - OPACITY) * np.asarray(photo, dtype=np.float32) + OPACITY * heat
    return Image.fromarray(np.clip(mixed + 0.5, 0, 255).astype(np.uint8))


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # scalable when Pillow has FreeType
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: float) -> str:
    """text, shortened with an ellipsis until it fits in width px."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."
