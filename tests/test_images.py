"""caption_cli.images: walking folders and decoding every kind of photo (synthetic files only)."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from caption_cli import images
from caption_cli.errors import CaptionCliError
from caption_cli.images import decode, decode_many, walk
from caption_cli.preprocess import model_pixels
from tests.conftest import sigint_as_in_a_terminal

S = 32  # model image size used in these tests

# Four flat, very different quadrants (plus a stripe) so any wrong rotation shows.
UPRIGHT = np.zeros((48, 64, 3), np.uint8)  # H=48, W=64
UPRIGHT[:24, :32] = (230, 20, 20)
UPRIGHT[:24, 32:] = (20, 230, 20)
UPRIGHT[24:, :32] = (20, 20, 230)
UPRIGHT[24:, 32:] = (230, 230, 20)
UPRIGHT[:8, :16] = (255, 255, 255)


def save(path: Path, image: Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def photo(path: Path, color=(200, 100, 50), size=(40, 30), **kwargs) -> Path:
    return save(path, Image.new("RGB", size, color), **kwargs)


# ---------------------------------------------------------------------------- walk


def names(paths, root: Path) -> list[str]:
    return [p.relative_to(root).as_posix() for p in paths]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    photo(root / "b.jpg")
    photo(root / "A.PNG")
    photo(root / "c.JpEg", format="JPEG")
    (root / "notes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "notes.txt").write_text("not a photo")
    photo(root / "sub" / "deep" / "x.webp")
    photo(root / "sub" / "y.tif")
    photo(root / ".hidden" / "h.jpg")
    photo(root / ".dot.jpg")
    photo(root / "sub" / ".also.png")
    os.symlink(root, root / "sub" / "loop")  # a symlink loop back to the top
    return root


def test_walk_sorted_recursive_skips_hidden_and_loops(tree: Path):
    assert names(walk([tree]), tree) == [
        "A.PNG",
        "b.jpg",
        "c.JpEg",
        "sub/deep/x.webp",
        "sub/y.tif",
    ]


def test_walk_include_hidden(tree: Path):
    assert names(walk([tree], include_hidden=True), tree) == [
        ".dot.jpg",
        ".hidden/h.jpg",
        "A.PNG",
        "b.jpg",
        "c.JpEg",
        "sub/.also.png",
        "sub/deep/x.webp",
        "sub/y.tif",
    ]


def test_walk_not_recursive(tree: Path):
    assert names(walk([tree], recursive=False), tree) == ["A.PNG", "b.jpg", "c.JpEg"]


def test_walk_follows_symlinked_folder_once(tmp_path: Path):
    elsewhere = tmp_path / "elsewhere"
    photo(elsewhere / "e.jpg")
    root = tmp_path / "root"
    photo(root / "r.jpg")
    os.symlink(elsewhere, root / "linked")
    os.symlink(elsewhere / "e.jpg", root / "single.jpg")
    # The linked folder is walked; a second root that overlaps is not walked again.
    # Paths are real paths: the file reached three ways is one path, yielded once.
    assert names(walk([root, elsewhere, root]), tmp_path) == [
        "elsewhere/e.jpg",
        "root/r.jpg",
    ]
    assert names(walk([root / "single.jpg", root]), tmp_path) == ["elsewhere/e.jpg", "root/r.jpg"]


def test_walk_yields_real_paths_under_a_symlinked_root(tmp_path: Path):
    photo(tmp_path / "real" / "a.jpg")
    photo(tmp_path / "real" / "sub" / "b.jpg")
    os.symlink(tmp_path / "real", tmp_path / "alias")
    expected = [tmp_path / "real" / "a.jpg", tmp_path / "real" / "sub" / "b.jpg"]
    assert list(walk([tmp_path / "alias"])) == expected
    assert list(walk([tmp_path / "alias", tmp_path / "real"])) == expected
    assert list(walk([tmp_path / "alias" / "a.jpg"])) == expected[:1]


def test_walk_explicit_files_absolute_and_deduplicated(tmp_path: Path, monkeypatch):
    photo(tmp_path / "one.jpg")
    (tmp_path / "readme.md").write_text("x")
    monkeypatch.chdir(tmp_path)
    found = list(walk(["one.jpg", Path("one.jpg"), "readme.md"]))
    # A file named on the command line is kept whatever its extension: decode judges it.
    assert found == [tmp_path / "one.jpg", tmp_path / "readme.md"]
    assert all(p.is_absolute() for p in found)


def test_walk_never_yields_a_file_twice_when_roots_overlap(tmp_path: Path):
    one = photo(tmp_path / "one.jpg")
    photo(tmp_path / "two.jpg")
    assert list(walk([one, tmp_path])) == [one, tmp_path / "two.jpg"]
    assert list(walk([tmp_path, one])) == [one, tmp_path / "two.jpg"]
    assert list(walk([tmp_path / "sub-that-is-not-there" / "..", tmp_path])) == [one, tmp_path / "two.jpg"]


def test_walk_dot_dot_after_a_symlink_goes_to_the_parent_of_its_target(tmp_path: Path):
    photo(tmp_path / "real" / "sibling.jpg")
    photo(tmp_path / "real" / "inner" / "in.jpg")
    photo(tmp_path / "other" / "decoy.jpg")  # what abspath's textual `link/..` would walk
    link = tmp_path / "other" / "link"
    os.symlink(tmp_path / "real" / "inner", link)
    assert list(walk([link / ".."], recursive=False)) == [tmp_path / "real" / "sibling.jpg"]
    assert list(walk([link / ".." / "inner"])) == [tmp_path / "real" / "inner" / "in.jpg"]
    # What is walked is the real folder, so the paths are real paths.
    (tmp_path / "real" / "inner" / "sub").mkdir()
    assert list(walk([link / "sub" / ".."])) == [tmp_path / "real" / "inner" / "in.jpg"]
    assert list(walk([link])) == [tmp_path / "real" / "inner" / "in.jpg"]


def test_walk_yields_dangling_symlink_so_it_becomes_an_error_row(tmp_path: Path):
    os.symlink(tmp_path / "gone.jpg", tmp_path / "dangling.jpg")
    found = list(walk([tmp_path]))
    assert found == [tmp_path / "dangling.jpg"]
    result = decode(found[0], S)
    assert result.pixels is None and result.error == "No such file or directory"


def test_walk_reports_unreadable_folder(tmp_path: Path, monkeypatch):
    photo(tmp_path / "ok.jpg")
    locked = tmp_path / "locked"
    photo(locked / "secret.jpg")
    real_scandir = os.scandir

    def scandir(path):
        if Path(path) == locked:  # chmod 0 would not stop root, so fail it here
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    errors = []
    found = list(walk([tmp_path], on_error=lambda p, m: errors.append((p, m))))
    assert found == [tmp_path / "ok.jpg"]
    assert errors == [(locked, "cannot list folder: Permission denied")]


# -------------------------------------------------------------- decode: orientation

# For each EXIF orientation, the stored (raw) pixels whose upright view is UPRIGHT.
RAW_FOR_ORIENTATION = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored horizontally
    3: lambda a: a[::-1, ::-1],  # rotated 180
    4: lambda a: a[::-1, :],  # mirrored vertically
    5: lambda a: a.transpose(1, 0, 2),  # transposed
    6: lambda a: np.rot90(a, 1),  # shown rotated 90 clockwise, so stored counter-clockwise
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # transversed
    8: lambda a: np.rot90(a, -1),
}


@pytest.mark.parametrize("orientation", sorted(RAW_FOR_ORIENTATION))
@pytest.mark.parametrize("ext", ["jpg", "png"])
def test_decode_applies_exif_orientation(tmp_path: Path, orientation: int, ext: str):
    raw = np.ascontiguousarray(RAW_FOR_ORIENTATION[orientation](UPRIGHT))
    exif = Image.Exif()
    exif[0x0112] = orientation
    options = {"quality": 95} if ext == "jpg" else {}
    path = save(tmp_path / f"o{orientation}.{ext}", Image.fromarray(raw), exif=exif, **options)

    result = decode(path, S)

    assert result.error is None
    assert (result.width, result.height) == (64, 48)  # upright size, not the stored one
    expected = model_pixels(Image.fromarray(UPRIGHT), S).astype(int)
    difference = np.abs(result.pixels.astype(int) - expected)
    assert difference.mean() < 4  # JPEG noise only; a wrong turn would be ~100


# ------------------------------------------------------------------ decode: formats


def test_decode_large_jpeg_uses_dct_scaling_but_keeps_enough_pixels(tmp_path: Path, monkeypatch):
    big = Image.fromarray(np.kron(UPRIGHT, np.ones((40, 40, 1), np.uint8)))  # 2560x1920
    path = save(tmp_path / "big.jpg", big, quality=90)
    seen = []

    def spy(image, size):
        seen.append(image.size)
        return model_pixels(image, size)

    monkeypatch.setattr(images, "model_pixels", spy)
    result = decode(path, S * 7)  # 224: the draft may shrink 8x here but not 16x
    assert result.error is None and (result.width, result.height) == (2560, 1920)
    assert seen == [(320, 240)]  # JPEG decoded at 1/8 scale, both sides still >= 224
    expected = model_pixels(big, S * 7).astype(int)
    assert np.abs(result.pixels.astype(int) - expected).mean() < 4


def test_decode_heic(tmp_path: Path):
    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.register_heif_opener()
    path = save(tmp_path / "phone.HEIC", Image.fromarray(UPRIGHT), quality=95)
    result = decode(path, S)
    assert result.error is None and (result.width, result.height) == (64, 48)
    expected = model_pixels(Image.fromarray(UPRIGHT), S).astype(int)
    assert np.abs(result.pixels.astype(int) - expected).mean() < 8


def test_heif_support_loads_only_when_a_heif_file_comes(tmp_path: Path):
    """A folder of JPEGs never pays pillow-heif's import; the first HEIC loads it, by content."""
    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.register_heif_opener()
    save(tmp_path / "phone.heic", Image.fromarray(UPRIGHT), quality=95)
    (tmp_path / "phone.heic").rename(tmp_path / "misnamed.jpg")  # the content decides, not the name
    save(tmp_path / "plain.jpg", Image.fromarray(UPRIGHT), quality=95)
    script = f"""
import sys
from pathlib import Path
from caption_cli.images import decode
plain = decode(Path({str(tmp_path / "plain.jpg")!r}), 32)
print(plain.error, "pillow_heif" in sys.modules)
heif = decode(Path({str(tmp_path / "misnamed.jpg")!r}), 32)
print(heif.error, "pillow_heif" in sys.modules, heif.width, heif.height)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["None False", "None True 64 48"]


def test_a_fresh_process_reports_a_non_image_before_any_heif_was_seen(tmp_path: Path):
    """A worker (or Ray task) that has not loaded pillow-heif still names the cause, not KeyError('HEIF')."""
    (tmp_path / "notes.png").write_bytes(b"these are not the pixels you are looking for" * 4)
    save(tmp_path / "plain.webp", Image.fromarray(UPRIGHT), quality=95)
    script = f"""
import sys
from pathlib import Path
from caption_cli.images import decode
print(decode(Path({str(tmp_path / "notes.png")!r}), 32).error)
print(decode(Path({str(tmp_path / "plain.webp")!r}), 32).error, "pillow_heif" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["not a supported image (content is not JPEG/PNG/WEBP/HEIF/TIFF/BMP/GIF)",
                                "None False"]


def grey16(tmp_path: Path) -> Path:
    ramp = np.tile(np.linspace(0, 65535, 40).astype(np.uint16), (30, 1))
    return save(tmp_path / "sixteen.png", Image.fromarray(ramp))


def cmyk_jpeg(tmp_path: Path) -> Path:
    return save(tmp_path / "print.jpg", Image.new("CMYK", (40, 30), (0, 255, 255, 0)), quality=95)


def cmyk_tiff(tmp_path: Path) -> Path:
    return save(tmp_path / "print.tiff", Image.new("CMYK", (40, 30), (0, 255, 255, 0)))


def palette_gif(tmp_path: Path) -> Path:
    return save(tmp_path / "pal.gif", Image.new("RGB", (40, 30), (255, 0, 0)).convert("P"))


def rgba_png(tmp_path: Path) -> Path:
    image = Image.new("RGBA", (40, 30), (255, 0, 0, 255))
    image.paste((0, 0, 255, 0), (20, 0, 40, 30))  # right half fully transparent
    return save(tmp_path / "alpha.png", image)


def la_png(tmp_path: Path) -> Path:
    image = Image.new("LA", (40, 30), (0, 255))
    image.paste((0, 0), (20, 0, 40, 30))
    return save(tmp_path / "la.png", image)


def transparent_palette_png(tmp_path: Path) -> Path:
    image = Image.new("P", (40, 30), 1)
    image.putpalette([0, 0, 0, 255, 0, 0])
    image.paste(0, (20, 0, 40, 30))
    return save(tmp_path / "ptrans.png", image, transparency=0)


def bilevel_bmp(tmp_path: Path) -> Path:
    return save(tmp_path / "bw.bmp", Image.new("1", (40, 30), 0))


@pytest.mark.parametrize(
    "make, left, right",
    [
        (cmyk_jpeg, (255, 0, 0), (255, 0, 0)),
        (cmyk_tiff, (255, 0, 0), (255, 0, 0)),
        (palette_gif, (255, 0, 0), (255, 0, 0)),
        (rgba_png, (255, 0, 0), (255, 255, 255)),  # transparent -> white, not black
        (la_png, (0, 0, 0), (255, 255, 255)),
        (transparent_palette_png, (255, 0, 0), (255, 255, 255)),
        (bilevel_bmp, (0, 0, 0), (0, 0, 0)),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
def test_decode_converts_modes_to_rgb(tmp_path: Path, make, left, right):
    result = decode(make(tmp_path), S)
    assert result.error is None
    assert result.pixels.shape == (S, S, 3) and result.pixels.dtype == np.uint8
    np.testing.assert_allclose(result.pixels[S // 2, 2], left, atol=6)
    np.testing.assert_allclose(result.pixels[S // 2, S - 3], right, atol=6)


def test_decode_16_bit_grey_is_scaled_not_clipped(tmp_path: Path):
    result = decode(grey16(tmp_path), S)
    assert result.error is None
    row = result.pixels[S // 2, :, 0].astype(int)
    assert row[0] <= 5 and row[-1] >= 250
    assert 100 < row[S // 2] < 155  # mid-grey: a clipping convert would give 255
    assert np.all(np.diff(row) >= -1)  # still a ramp


def test_decode_animation_and_multipage_tiff_use_first_frame(tmp_path: Path):
    frames = [Image.new("RGB", (40, 30), c) for c in [(0, 200, 0), (200, 0, 0), (0, 0, 200)]]
    gif = tmp_path / "anim.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=50, loop=0)
    tiff = tmp_path / "pages.tif"
    frames[0].save(tiff, save_all=True, append_images=frames[1:])
    for path in (gif, tiff):
        result = decode(path, S)
        assert result.error is None
        np.testing.assert_allclose(result.pixels[5, 5], (0, 200, 0), atol=6)


# ---------------------------------------------------------------- decode: bad files


def truncated_jpeg(tmp_path: Path) -> Path:
    path = save(tmp_path / "cut.jpg", Image.fromarray(UPRIGHT), quality=95)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def truncated_png(tmp_path: Path) -> Path:
    noise = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    path = save(tmp_path / "cut.png", Image.fromarray(noise))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def text_as_jpeg(tmp_path: Path) -> Path:
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a photo\n")
    return path


def empty_file(tmp_path: Path) -> Path:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    return path


def unsupported_format(tmp_path: Path) -> Path:
    # A real image Pillow could read (PPM), but not a photo format we accept.
    return save(tmp_path / "disguised.jpg", Image.new("RGB", (8, 8)), format="PPM")


@pytest.mark.parametrize(
    "make, message",
    [
        (empty_file, "empty file (0 bytes)"),
        (text_as_jpeg, "not a supported image (content is not JPEG/PNG/WEBP/HEIF/TIFF/BMP/GIF)"),
        (unsupported_format, "not a supported image (content is not JPEG/PNG/WEBP/HEIF/TIFF/BMP/GIF)"),
        (truncated_jpeg, "image file is truncated"),
        (truncated_png, "image file is truncated"),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
def test_decode_bad_file_is_an_error_value(tmp_path: Path, make, message):
    path = make(tmp_path)
    result = decode(path, S)
    assert result.pixels is None and result.width is None
    assert result.error.startswith(message)
    assert "\n" not in result.error and str(path) not in result.error


def test_decode_decompression_bomb_guard(tmp_path: Path, monkeypatch):
    path = photo(tmp_path / "bomb.png", size=(100, 100))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10000 px > 2 x limit
    result = decode(path, S)
    assert result.pixels is None
    assert result.error.startswith("refused as a possible decompression bomb")


PANORAMA = np.kron(UPRIGHT, np.ones((8, 8, 1), np.uint8))  # 512x384 upright: 196608 px


def panorama(path: Path, **options) -> Path:
    """PANORAMA stored turned (EXIF orientation 6), so a wrong turn would show."""
    exif = Image.Exif()
    exif[0x0112] = 6
    raw = np.ascontiguousarray(np.rot90(PANORAMA, 1))
    return save(path, Image.fromarray(raw), exif=exif, **options)


def test_decode_huge_jpeg_is_judged_by_the_size_draft_decodes(tmp_path: Path, monkeypatch):
    path = panorama(tmp_path / "pano.jpg", quality=95)
    # 196608 px is far over 2 x 4000, but draft() decodes it at 1/8: 48x64 = 3072 px.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)  # what Pillow's guard alone does with it
    result = decode(path, S)
    assert result.error is None and (result.width, result.height) == (512, 384)
    expected = model_pixels(Image.fromarray(PANORAMA), S).astype(int)
    assert np.abs(result.pixels.astype(int) - expected).mean() < 4  # upright


@pytest.mark.parametrize("name, options", [("pano.png", {}), ("png-content.jpg", {"format": "PNG"})])
def test_decode_huge_image_without_dct_scaling_is_still_refused(
    tmp_path: Path, monkeypatch, name: str, options: dict
):
    path = panorama(tmp_path / name, **options)  # a PNG decodes at full size, whatever its name
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)
    result = decode(path, S)
    assert result.pixels is None
    refused = "refused as a possible decompression bomb (Image size (196608 pixels) exceeds limit of 8000"
    assert result.error.startswith(refused)


def test_decode_jpeg_too_big_even_at_one_eighth_is_refused(tmp_path: Path, monkeypatch):
    path = panorama(tmp_path / "pano.jpg", quality=95)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 3072 px at 1/8 > 2 x 1000
    result = decode(path, S)
    assert result.pixels is None and "\n" not in result.error
    assert result.error == (
        "refused as a possible decompression bomb (Image size (196608 pixels, 3072 when decoded "
        "at the smallest JPEG scale that fits the model) exceeds limit of 2000 pixels, "
        "could be decompression bomb DOS attack.)"
    )


# --------------------------------------------------------------------- decode_many


def test_decode_many_in_workers_keeps_order_and_bounds_look_ahead(tmp_path: Path):
    paths = []
    for i in range(12):
        if i % 5 == 3:
            paths.append(tmp_path / f"bad{i}.jpg")
            paths[-1].write_text("not an image")
        else:
            paths.append(photo(tmp_path / f"p{i:02d}.png", color=(i * 20, 0, 0)))
    pulled = []

    def source():
        for path in paths:
            pulled.append(path)
            yield path

    stream = decode_many(source(), S, workers=2, prefetch=3)
    first = next(stream)
    assert len(pulled) == 3  # bounded: never reads far ahead of the consumer
    results = [first, *stream]
    assert [r.path for r in results] == paths
    for i, result in enumerate(results):
        if i % 5 == 3:
            assert result.error is not None
        else:
            assert result.error is None and result.pixels[0, 0, 0] == i * 20


def test_start_decoders_boots_workers_that_decode_many_then_uses_and_ends(tmp_path: Path):
    import multiprocessing

    from caption_cli.images import start_decoders

    before = set(multiprocessing.active_children())
    pool = start_decoders(2)
    started = set(multiprocessing.active_children()) - before
    assert len(started) == 2  # running before any file is given
    paths = [photo(tmp_path / f"p{i}.png", color=(i * 40, 0, 0)) for i in range(5)]
    results = list(decode_many(iter(paths), S, workers=2, pool=pool))
    assert [r.pixels[0, 0, 0] for r in results] == [i * 40 for i in range(5)]
    assert set(multiprocessing.active_children()) - before == set()  # shut down with the stream
    assert start_decoders(0) is None


def test_decode_many_without_workers(tmp_path: Path):
    paths = [photo(tmp_path / "a.png"), empty_file(tmp_path)]
    results = list(decode_many(iter(paths), S, workers=0))
    assert [r.path for r in results] == paths
    assert results[0].error is None and results[1].error == "empty file (0 bytes)"


# ----------------------------------------------------------- decode_many: processes


def decode_or_die(path: Path, size: int) -> images.DecodedImage:
    """decode, but a worker reading `poison*` is SIGKILLed (as the OOM killer would),
    and one reading `flaky*` crashes the first time only (a marker file remembers)."""
    if path.name.startswith("poison"):
        os.kill(os.getpid(), signal.SIGKILL)
    if path.name.startswith("flaky") and not path.with_suffix(".crashed").exists():
        path.with_suffix(".crashed").touch()
        os._exit(3)
    return decode(path, size)


def test_decode_many_survives_workers_that_die(tmp_path: Path):
    names = ["p0", "p1", "flaky", "p3", "p4", "p5", "poison", "p7", "p8", "p9"]
    paths = [photo(tmp_path / f"{n}.png", color=(i * 20, 0, 0)) for i, n in enumerate(names)]

    # One worker, so a crash also fails the files queued behind it (p3 at least).
    results = list(decode_many(iter(paths), S, workers=1, prefetch=4, decode_fn=decode_or_die))

    assert [r.path for r in results] == paths
    for i, result in enumerate(results):
        if names[i] == "poison":  # killed its worker twice, the second time alone
            assert result.pixels is None and result.error == images.WORKER_DIED
        else:  # in flight beside a crash, or crashed once: retried, decoded
            assert result.error is None and result.pixels[0, 0, 0] == i * 20
    assert (tmp_path / "flaky.crashed").exists()


def test_decode_many_stops_when_every_worker_dies(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(images, "WORKER_DEATHS_IN_A_ROW", 3)  # read in this process
    paths = [photo(tmp_path / f"p{i}.png", color=(i * 20, 0, 0)) for i in range(2)]
    paths += [photo(tmp_path / f"poison{i:02d}.png") for i in range(30)]  # workers that cannot run
    pulled = []

    def source():
        for path in paths:
            pulled.append(path)
            yield path

    results = []
    expected = r"^the decoder processes keep dying: 3 files in a row"
    with pytest.raises(images.DecoderError, match=expected) as caught:
        for result in decode_many(source(), S, workers=1, prefetch=2, decode_fn=decode_or_die):
            results.append(result)
    message = str(caught.value)
    assert isinstance(caught.value, CaptionCliError) and "\n" not in message
    assert "try --workers 0 to decode in the main process" in message
    # Results handed out before the guard fired stay as they were.
    assert [(r.path, r.error, r.pixels[0, 0, 0]) for r in results[:2]] == [
        (paths[0], None, 0),
        (paths[1], None, 20),
    ]
    # The first two deaths are handed out as errors; the third ends the run, so it
    # stops after a few files, not after 30 errors that each cost two process starts.
    assert [r.error for r in results[2:]] == [images.WORKER_DIED] * 2
    assert len(pulled) <= 2 + 3 + 2  # plus at most the look-ahead


def test_decode_many_poison_between_good_files_is_no_false_alarm(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(images, "WORKER_DEATHS_IN_A_ROW", 2)
    names = ["poison0", "p1", "poison2", "p3", "poison4"]  # more deaths than 2, never in a row
    paths = [photo(tmp_path / f"{n}.png", color=(i * 20, 0, 0)) for i, n in enumerate(names)]

    results = list(decode_many(iter(paths), S, workers=1, prefetch=4, decode_fn=decode_or_die))

    assert [r.path for r in results] == paths
    for i, result in enumerate(results):
        if i % 2 == 0:
            assert result.error == images.WORKER_DIED
        else:
            assert result.error is None and result.pixels[0, 0, 0] == i * 20


def test_decode_many_refuses_a_decode_fn_workers_cannot_import(tmp_path: Path):
    paths = iter([photo(tmp_path / "a.png")])
    stream = decode_many(paths, S, workers=1, decode_fn=lambda path, size: decode(path, size))
    with pytest.raises(TypeError, match="^decode_fn must be a top-level function .*lambda"):
        next(stream)


# A parent that decodes with two workers, then waits to be killed ("wait"); or whose
# process group gets a Ctrl-C while both workers are still starting up ("ctrl-c").
PARENT = """
import os, signal, sys, time
from pathlib import Path
from caption_cli.images import decode_many

mode, names = sys.argv[1], sys.argv[2:]
booting = Path(names[0]).parent / "booting"

if __name__ == "__mp_main__" and mode == "ctrl-c":  # a worker starting up imports this
    (booting / str(os.getpid())).touch()  # first: stay here, as if importing, until the
    deadline = time.monotonic() + 30  # Ctrl-C has come (raised here, or held pending)
    while signal.SIGINT not in signal.sigpending() and time.monotonic() < deadline:
        time.sleep(0.01)


def paths():
    for i, name in enumerate(names):
        if i == 2 and mode == "ctrl-c":  # the first two submits spawned the workers
            deadline = time.monotonic() + 60
            while len(list(booting.iterdir())) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            os.killpg(0, signal.SIGINT)
        yield Path(name)


if __name__ == "__main__":
    booting.mkdir()
    try:
        stream = decode_many(paths(), 32, workers=2, prefetch=4)
        next(stream)
        print("decoding", flush=True)
        time.sleep(60)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
"""


def start_parent(tmp_path: Path, mode: str) -> subprocess.Popen:
    """The PARENT script as a file: spawned workers import it first, so its hook runs."""
    paths = [str(photo(tmp_path / f"p{i}.png")) for i in range(4)]
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    repo = str(Path(images.__file__).parents[1])  # the caption_cli under test
    python_path = os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))
    return subprocess.Popen(
        [sys.executable, str(script), mode, *paths],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": python_path},
        start_new_session=True,  # its own process group, as a shell job has
        preexec_fn=sigint_as_in_a_terminal,
    )


def kill_group(pgid: int) -> None:
    """Never leave orphans behind, even when a test fails."""
    for pid in group(pgid):
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def group(pgid: int) -> list[int]:
    """Live processes of a process group, from /proc (orphans keep their group)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat_line = (entry / "stat").read_text() if entry.name.isdigit() else ""
        except OSError:  # exited meanwhile
            continue
        fields = stat_line.rpartition(")")[2].split()  # the name in (...) may hold spaces
        if fields and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def wait_group_gone(pgid: int, seconds: float = 10) -> list[int]:
    """Poll until the group has no live process; those still there at the deadline."""
    deadline = time.monotonic() + seconds
    while (left := group(pgid)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return left


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


@linux_only
def test_decode_many_workers_exit_when_the_parent_is_killed(tmp_path: Path):
    parent = start_parent(tmp_path, "wait")
    try:
        ready, _, _ = select.select([parent.stdout], [], [], 60)
        if not ready or parent.stdout.readline() != "decoding\n":
            parent.kill()
            pytest.fail(f"the parent did not start decoding: {parent.communicate()[1]}")
        assert len(group(parent.pid)) >= 3  # the parent, two workers, the resource tracker
        parent.kill()  # as the OOM killer would: no cleanup runs in the parent
        parent.wait()
        assert wait_group_gone(parent.pid) == []
    finally:
        kill_group(parent.pid)


@linux_only
def test_decode_many_ctrl_c_is_one_interrupt_in_the_parent_not_one_per_worker(tmp_path: Path):
    parent = start_parent(tmp_path, "ctrl-c")
    try:
        out, err = parent.communicate(timeout=60)
        assert (out, parent.returncode) == ("interrupted\n", 0)
        assert "KeyboardInterrupt" not in err and "Traceback" not in err, err
        assert wait_group_gone(parent.pid) == []  # the pool was shut down
    finally:
        kill_group(parent.pid)
