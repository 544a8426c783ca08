"""Find photos on disk and turn each into model pixels, never stopping for a bad file.

`walk` lists candidate files (by extension, in a stable order, following symlinks
without looping); `decode` reads one file whatever shape it is in (EXIF rotation,
CMYK, 16-bit, alpha, HEIC, animations) and reports a bad one as a value instead of
raising; `decode_many` runs `decode` in worker processes with bounded look-ahead so
memory stays flat however many photos there are.
"""

from __future__ import annotations

import multiprocessing
import os
import stat
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from caption_cli.errors import ImageError
from caption_cli.preprocess import model_pixels

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".heic", ".heif", ".tif", ".tiff", ".bmp", ".gif"}
)
# What Image.open may sniff the content as: the extension is only a hint, so a PSD or
# an ICO renamed to .jpg is refused like a text file would be. (The multi-picture
# JPEGs many cameras write open through "JPEG" and come back as format "MPO".)
PILLOW_FORMATS = ("JPEG", "PNG", "WEBP", "HEIF", "TIFF", "BMP", "GIF")
_ROTATED_ORIENTATIONS = frozenset({5, 6, 7, 8})  # EXIF orientations that swap width and height
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})

WalkErrorHandler = Callable[[Path, str], None]


@dataclass
class DecodedImage:
    """One file after decoding: model pixels, or the reason there are none."""

    path: Path
    pixels: np.ndarray | None  # uint8 [S, S, 3], None when error is set
    width: int | None  # upright size of the original photo
    height: int | None
    error: str | None = None


# ---------------------------------------------------------------------------- walk


def is_image_name(path: Path | str) -> bool:
    """Whether the extension is one we try to decode (case-insensitive)."""
    return os.path.splitext(str(path))[1].lower() in IMAGE_EXTENSIONS


def walk(
    roots: Iterable[Path | str],
    recursive: bool = True,
    include_hidden: bool = False,
    on_error: WalkErrorHandler | None = None,
) -> Iterator[Path]:
    """Yield absolute image paths under each root, sorted by name, each folder once.

    A root that is a file is yielded as is (its content is checked by decode, not its
    name). Symlinked folders are followed, but a folder reached again (a loop, or two
    overlapping roots) is not walked twice: the set of visited (device, inode) pairs
    is small however many files there are. A folder that cannot be listed, or a name
    that is not valid UTF-8 (the database cannot store it), is reported through
    on_error and skipped.
    """
    visited: set[tuple[int, int]] = set()
    given_files: set[Path] = set()  # files named as roots: few, so a set is fine
    report = on_error or (lambda path, message: None)
    for root in roots:
        root = Path(os.path.abspath(root))
        if root.is_dir():
            for path in _walk_folder(root, recursive, include_hidden, visited, report):
                if path not in given_files:
                    yield path
        elif root not in given_files and not _already_walked(root, include_hidden, visited):
            given_files.add(root)
            if _valid_name(root, report):
                yield root


def _already_walked(path: Path, include_hidden: bool, visited: set[tuple[int, int]]) -> bool:
    """Whether a folder walked earlier in this call has yielded this file already."""
    if not is_image_name(path) or (not include_hidden and path.name.startswith(".")):
        return False
    try:
        info = os.stat(path.parent)
    except OSError:
        return False
    return (info.st_dev, info.st_ino) in visited


def _walk_folder(
    top: Path,
    recursive: bool,
    include_hidden: bool,
    visited: set[tuple[int, int]],
    report: WalkErrorHandler,
) -> Iterator[Path]:
    """Depth-first, name-sorted walk with an explicit stack (no recursion limit)."""
    stack: list[Iterator[os.DirEntry]] = []
    entries = _list_folder(top, visited, report)
    if entries is not None:
        stack.append(entries)
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            continue
        if not include_hidden and _is_hidden(entry):
            continue
        path = Path(entry.path)
        if _is_dir(entry):
            if recursive:
                entries = _list_folder(path, visited, report)
                if entries is not None:
                    stack.append(entries)
        elif is_image_name(entry.name) and (_is_file(entry) or entry.is_symlink()):
            # A dangling symlink is yielded too, so it becomes a row with its cause.
            if _valid_name(path, report):
                yield path


def _list_folder(
    folder: Path, visited: set[tuple[int, int]], report: WalkErrorHandler
) -> Iterator[os.DirEntry] | None:
    """Sorted entries of a folder not seen before, or None (seen, or unreadable)."""
    try:
        info = os.stat(folder)  # follows symlinks: a loop lands on a visited inode
        key = (info.st_dev, info.st_ino)
        if key in visited:
            return None
        visited.add(key)
        with os.scandir(folder) as scan:
            entries = sorted(scan, key=lambda e: e.name)
    except OSError as exc:
        report(folder, f"cannot list folder: {exc.strerror or exc}")
        return None
    return iter(entries)


def _is_hidden(entry: os.DirEntry) -> bool:
    if entry.name.startswith("."):
        return True
    if os.name != "nt":  # only Windows has a hidden attribute; skip the extra stat
        return False
    try:
        attributes = getattr(entry.stat(follow_symlinks=False), "st_file_attributes", 0)
    except OSError:
        return False
    return bool(attributes & getattr(stat, "FILE_ATTRIBUTE_HIDDEN", 0))


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()
    except OSError:
        return False


def _valid_name(path: Path, report: WalkErrorHandler) -> bool:
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        report(path, "file name is not valid UTF-8; rename the file to caption it")
        return False
    return True


# -------------------------------------------------------------------------- decode

_heif_registered = False


def _register_heif() -> None:
    """Teach Pillow HEIC/HEIF once per process (workers are fresh processes)."""
    global _heif_registered
    if not _heif_registered:
        try:
            from pillow_heif import register_heif_opener
        except ImportError:  # without pillow-heif, HEIC files become error rows
            pass
        else:
            register_heif_opener()
        _heif_registered = True


def decode(path: Path, size: int) -> DecodedImage:
    """Model pixels [size, size, 3] for one file; a bad file gives error, never raises."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            # Corrupt-EXIF and large-image warnings would print from every worker;
            # what matters is whether the pixels decode, which errors below report.
            warnings.simplefilter("ignore")
            return _decode(path, size)
    except Exception as exc:  # noqa: BLE001 - one bad file must never end the run
        return DecodedImage(path, None, None, None, describe_error(exc, path))


def _decode(path: Path, size: int) -> DecodedImage:
    if path.stat().st_size == 0:
        raise ImageError("empty file (0 bytes)")
    _register_heif()
    with Image.open(path, formats=PILLOW_FORMATS) as image:
        width, height = image.size
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
        if orientation in _ROTATED_ORIENTATIONS:
            width, height = height, width
        if image.format in ("JPEG", "MPO"):
            # DCT scaling: decode at 1/2, 1/4 or 1/8 while both sides stay >= size,
            # so a 24 MP photo costs a fraction of a full decode and loses nothing.
            image.draft("RGB", (size, size))
        image.load()  # first frame of an animation or a multi-page TIFF
        upright = ImageOps.exif_transpose(image)
        pixels = model_pixels(to_rgb(upright), size)
    return DecodedImage(path, pixels, width, height)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any Pillow mode; transparency is composited on white."""
    mode = image.mode
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(image), mode), "L").convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Scale a 16/32-bit or float grey image to 0..255 (Pillow's convert clips instead)."""
    values = values.astype(np.float64)
    if mode == "F":
        scale = 255.0 if values.max(initial=0.0) <= 1.0 else 1.0
    elif mode.startswith("I;16") or values.max(initial=0.0) > 255:
        scale = 255.0 / 65535.0
    else:
        scale = 1.0
    return np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)


def describe_error(exc: BaseException, path: Path) -> str:
    """One line saying why a file failed, without repeating the file's name."""
    if isinstance(exc, UnidentifiedImageError):
        return "not a supported image (content is not " + "/".join(PILLOW_FORMATS) + ")"
    if isinstance(exc, Image.DecompressionBombError):
        return f"refused as a possible decompression bomb ({exc})"
    if isinstance(exc, OSError) and exc.strerror:
        message = exc.strerror
    else:
        message = str(exc) or type(exc).__name__
    if "truncat" in message.lower():  # the JPEG and PNG decoders word it differently
        return "image file is truncated"
    message = message.replace(f"'{path}'", "").replace(str(path), "").strip(" :")
    return " ".join(message.split()) or type(exc).__name__


# --------------------------------------------------------------------- decode_many


def decode_many(
    paths: Iterable[Path], size: int, workers: int, prefetch: int | None = None
) -> Iterator[DecodedImage]:
    """decode() every path in worker processes; results come back in input order.

    At most `prefetch` (default 4 per worker) files are in flight, so the paths can
    be an endless generator and memory stays flat. workers <= 0 decodes in this
    process (small runs, debugging). Workers are spawned, not forked: the parent
    may already hold onnxruntime threads, which a fork would copy mid-flight.
    """
    if workers <= 0:
        for path in paths:
            yield decode(path, size)
        return
    limit = max(1, prefetch or 4 * workers)
    context = multiprocessing.get_context("spawn")
    pending: deque[Future[DecodedImage]] = deque()
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context)
    try:
        for path in paths:
            pending.append(pool.submit(decode, path, size))
            if len(pending) >= limit:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
