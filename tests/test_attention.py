"""Attention heat-map PNGs: layout, where the heat lands, smoothness, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from caption_cli.attention import GAP, LABEL, PANEL, heatmap_png
from caption_cli.errors import ImageError


def grey_photo(path: Path, size=(300, 200), orientation: int | None = None) -> Path:
    image = Image.new("RGB", size, (128, 128, 128))
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    image.save(path, "JPEG", quality=95, exif=exif)
    return path


def panel_box(index: int, columns: int, photo_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the photo inside panel `index` (layout of heatmap_png)."""
    row, col = divmod(index, columns)
    x = GAP + col * (PANEL + GAP)
    y = LABEL + GAP + GAP + row * (PANEL + LABEL + GAP)
    w, h = photo_size
    left, top = x + (PANEL - w) // 2, y + (PANEL - h) // 2
    return left, top, left + w, top + h


def test_grid_of_panels(tmp_path: Path):
    photo = grey_photo(tmp_path / "p.jpg")
    words = ["a", "dog", "runs", "on", "grass"]
    attention = np.random.default_rng(0).random((5, 2, 3)).astype(np.float32)
    out = heatmap_png(photo, words, attention, tmp_path / "out" / "heat.png")
    assert out == tmp_path / "out" / "heat.png"
    with Image.open(out) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        # photo + 5 words = 6 panels, 4 per row -> 2 rows
        assert image.size == (GAP + 4 * (PANEL + GAP), LABEL + GAP + GAP + 2 * (PANEL + LABEL + GAP))


def test_heat_lands_where_the_model_looked(tmp_path: Path):
    photo = grey_photo(tmp_path / "p.jpg", size=(300, 200))
    attention = np.zeros((2, 2, 3), np.float32)
    attention[0, 0, 0] = 1.0  # word 0: top-left cell
    attention[1, 1, 2] = 1.0  # word 1: bottom-right cell
    out = heatmap_png(photo, ["left", "right"], attention, tmp_path / "heat.png")
    pixels = np.asarray(Image.open(out).convert("RGB"), dtype=np.float32)
    photo_size = (224, 149)  # 300x200 fitted into 224x224
    for index, hot_corner in ((1, "top-left"), (2, "bottom-right")):
        left, top, right, bottom = panel_box(index, 3, photo_size)
        panel = pixels[top:bottom, left:right].mean(axis=2)  # brightness [h, w]
        h, w = panel.shape
        top_left = panel[: h // 4, : w // 4].mean()
        bottom_right = panel[-h // 4:, -w // 4:].mean()
        if hot_corner == "top-left":
            assert top_left > bottom_right + 60
        else:
            assert bottom_right > top_left + 60
        # smooth: bicubic upsampling, no nearest-neighbour steps between grid cells
        assert np.abs(np.diff(panel[h // 2], axis=0)).max() < 12
        assert np.abs(np.diff(panel[:, w // 6], axis=0)).max() < 12
    # the first panel is the photo itself, a little darkened by nothing: still grey
    left, top, right, bottom = panel_box(0, 3, photo_size)
    assert abs(pixels[top:bottom, left:right].mean() - 128) < 3


def test_exif_orientation_is_applied(tmp_path: Path):
    photo = grey_photo(tmp_path / "p.jpg", size=(300, 200), orientation=6)  # stored landscape, shown portrait
    attention = np.zeros((1, 2, 2), np.float32)
    attention[0, 0, :] = 1.0  # top row of the upright photo
    out = heatmap_png(photo, ["sky"], attention, tmp_path / "heat.png")
    pixels = np.asarray(Image.open(out).convert("RGB"), dtype=np.float32).mean(axis=2)
    left, top, right, bottom = panel_box(1, 2, (149, 224))  # portrait once upright
    panel = pixels[top:bottom, left:right]
    assert panel[:20].mean() > panel[-20:].mean() + 60
    # outside the portrait photo, the panel is white background
    assert pixels[top + 100, left - 10] == 255


def test_no_words_gives_the_photo_alone(tmp_path: Path):
    out = heatmap_png(grey_photo(tmp_path / "p.jpg"), [], np.zeros((0, 7, 7), np.float32), tmp_path / "h.png")
    assert Image.open(out).size == (GAP + PANEL + GAP, LABEL + GAP + GAP + PANEL + LABEL + GAP)


def test_long_words_and_uniform_attention(tmp_path: Path):
    words = ["a" * 80, "grass"]
    attention = np.full((2, 7, 7), 1 / 49, np.float32)
    out = heatmap_png(grey_photo(tmp_path / "p.jpg"), words, attention, tmp_path / "h.png")
    assert Image.open(out).size[0] == GAP + 3 * (PANEL + GAP)


def test_unreadable_photo(tmp_path: Path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ImageError, match=rf"^{bad}: cannot be read"):
        heatmap_png(bad, ["a"], np.ones((1, 2, 2), np.float32), tmp_path / "h.png")
    with pytest.raises(ImageError, match="cannot be read"):
        heatmap_png(tmp_path / "missing.jpg", ["a"], np.ones((1, 2, 2), np.float32), tmp_path / "h.png")


def test_words_and_attention_must_agree(tmp_path: Path):
    with pytest.raises(ValueError, match=r"attention must be \[T, h, w\] with T = 2 words, got shape \(3, 2, 2\)"):
        heatmap_png(grey_photo(tmp_path / "p.jpg"), ["a", "b"], np.ones((3, 2, 2)), tmp_path / "h.png")
