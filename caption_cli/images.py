"""Find photos on disk and turn each into model pixels, never stopping for a bad file.

`walk` lists candidate files (by extension, in a stable order, following symlinks
without looping); `decode` reads one file whatever shape it is in (EXIF rotation,
CMYK, 16-bit, alpha, HEIC, animations) and reports a bad one as a value instead of
raising; `decode_many` runs `decode` in worker processes with bounded look-ahead so
memory stays flat however many photos there are, and a worker that dies (out of memory,
a codec crash) costs only the file it was reading, unless workers cannot run at all
(DecoderError then ends the run instead of failing every file).
"""

from __future__ import annotations

import ctypes
import functools
import io
import multiprocessing
import os
import pickle
import signal
import stat
import sys
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import (
    BrokenExecutor,
    CancelledError,
    Future,
    ProcessPoolExecutor,
)
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash
from PIL import ExifTags, Image, ImageOps, JpegImagePlugin, UnidentifiedImageError

from caption_cli.errors import CaptionCliError, ImageError
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
_JPEG_MAGIC = b"\xff\xd8\xff"  # what Pillow's JPEG plugin accepts

WalkErrorHandler = Callable[[Path, str], None]


@dataclass
class DecodedImage:
    """One file after decoding: model pixels, or the reason there are none."""

    path: Path
    pixels: np.ndarray | None  # uint8 [S, S, 3], None when error is set
    width: int | None  # upright size of the original photo
    height: int | None
    error: str | None = None
    content_hash: str | None = None  # of the file's bytes (None: they could not be read)
    reusable: bool = False  # not decoded: the store already has a caption for these bytes


def content_hash(data: bytes) -> str:
    """The digest the store matches copies and moved files by: XXH3-128 in hex.

    A fast non-cryptographic hash is enough (the threat is chance, not an attacker
    forging a photo to steal another's caption), and it costs ~0.1 ms for a 4 MB JPEG
    where BLAKE2b costs ~4 ms, which would be most of a re-run over copied folders.
    """
    return xxhash.xxh3_128_hexdigest(data)


KnownHash = Callable[[str], bool]  # whether the store already has a caption for a content hash


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

    Paths are real paths (os.path.realpath): one file is one row, however it is
    reached (a symlinked root or folder, a symlink to a file). A dangling symlink
    keeps its own path, so its row names the link that is broken.
    """
    visited: set[tuple[int, int]] = set()
    # Real paths reached through a file symlink or named as roots: few, so a set is
    # fine; a regular file inside a folder is unique already (each folder walked once).
    linked: set[Path] = set()
    report = on_error or (lambda path, message: None)
    for root in roots:
        root = _absolute(root)
        if root.is_dir():
            for path, through_link in _walk_folder(_real(root), recursive, include_hidden, visited, report):
                if path in linked:
                    continue
                if through_link:
                    if _already_walked(path, include_hidden, visited):
                        continue  # its folder yields (or yielded) it under this same name
                    linked.add(path)
                yield path
        else:
            real = _real(root)
            if real not in linked and not _already_walked(real, include_hidden, visited):
                linked.add(real)
                if _valid_name(real, report):
                    yield real


def resolve_root(root: Path | str) -> Path:
    """The real, absolute path walk reads a root as (what stored paths under it start with)."""
    return _real(_absolute(root))


def _real(path: Path) -> Path:
    """The real path of an existing file or folder; a dangling link stays as it is."""
    try:
        return Path(os.path.realpath(path, strict=True))
    except OSError:
        return path


def _absolute(root: Path | str) -> Path:
    """The root as an absolute path, with each `..` meaning what the kernel makes of it.

    os.path.abspath drops `link/..` as text, which names the folder holding the link,
    but the kernel (and `ls link/..`) goes to the parent of the link's *target*. So a
    `..` that follows a symlink resolves that link first. Every other part stays as
    typed here; walk then takes the real path of what this names.
    """
    path = Path(os.path.join(os.getcwd(), root))  # an absolute root stays as is
    if ".." not in path.parts:
        return Path(os.path.abspath(path))
    resolved = Path(path.anchor)
    for part in path.parts[1:]:
        if part != "..":
            resolved = resolved / part
            continue
        if os.path.islink(resolved):  # otherwise (a folder, or missing) `..` is text
            resolved = Path(os.path.realpath(resolved))
        resolved = resolved.parent
    return resolved


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
) -> Iterator[tuple[Path, bool]]:
    """Depth-first, name-sorted walk with an explicit stack (no recursion limit).

    Yields (real path, whether it was reached through a file symlink). top is a real
    path and each sub-folder is listed by its real path, so only file symlinks need
    resolving.
    """
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
                entries = _list_folder(_real(path) if entry.is_symlink() else path, visited, report)
                if entries is not None:
                    stack.append(entries)
        elif is_image_name(entry.name) and (_is_file(entry) or entry.is_symlink()):
            # A dangling symlink is yielded too, so it becomes a row with its cause.
            through_link = False
            if entry.is_symlink():
                real = _real(path)
                through_link = real != path  # a dangling link stays itself
                path = real
            if _valid_name(path, report):
                yield path, through_link


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

def looks_like_heif(head: bytes) -> bool:
    """Whether a file's first bytes are an ISO-BMFF container (HEIC, HEIF, AVIF): 'ftyp' at offset 4.

    pillow-heif costs about 0.3 s to import (its native library), in every decode
    worker; loading it only when such a file comes keeps a folder of JPEGs from paying.
    """
    return head[4:8] == b"ftyp"


@functools.cache
def register_heif() -> None:
    """Teach Pillow HEIC/HEIF, once per process (workers are fresh processes)."""
    try:
        from pillow_heif import register_heif_opener
    except ImportError:  # without pillow-heif, HEIC files become error rows
        return
    register_heif_opener()


def register_heif_for(path: Path) -> None:
    """register_heif() when the file at path is HEIC/HEIF (for callers that open by path)."""
    try:
        with open(path, "rb") as file:
            head = file.read(12)
    except OSError:
        return  # opening it will fail again, with the error the caller reports
    if looks_like_heif(head):
        register_heif()


def decode(path: Path, size: int, known: KnownHash | None = None) -> DecodedImage:
    """Model pixels [size, size, 3] for one file; a bad file gives error, never raises.

    The file is read once: the same bytes are hashed (DecodedImage.content_hash, which
    the store matches moved and copied files by) and decoded. When known says the
    store already has a caption for that hash, decoding is skipped (reusable=True):
    a copied folder then costs a read and a hash per photo, not a decode.
    """
    path = Path(path)
    digest = None
    try:
        data = _read(path)
        digest = content_hash(data)
        if known is not None and known(digest):
            return DecodedImage(path, None, None, None, None, digest, reusable=True)
        with warnings.catch_warnings():
            # Corrupt-EXIF and large-image warnings would print from every worker;
            # what matters is whether the pixels decode, which errors below report.
            warnings.simplefilter("ignore")
            decoded = _decode(path, data, size)
    except Exception as exc:  # noqa: BLE001 - one bad file must never end the run
        return DecodedImage(path, None, None, None, describe_error(exc, path), digest)
    decoded.content_hash = digest
    return decoded


def _read(path: Path) -> bytes:
    """All of a regular file's bytes (a FIFO or a device named .jpg is refused, never read)."""
    with open(path, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ImageError("not a regular file")
        data = file.read()
    if not data:
        raise ImageError("empty file (0 bytes)")
    return data


def _decode(path: Path, data: bytes, size: int) -> DecodedImage:
    if looks_like_heif(data):
        register_heif()
    with _open(data) as image:
        width, height = image.size
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
        if orientation in _ROTATED_ORIENTATIONS:
            width, height = height, width
        if image.format in ("JPEG", "MPO"):
            # DCT scaling: decode at 1/2, 1/4 or 1/8 while both sides stay >= size,
            # so a 24 MP photo costs a fraction of a full decode and loses nothing.
            image.draft("RGB", (size, size))
        _check_decoded_size(image, width * height)  # before any pixel is decoded
        image.load()  # first frame of an animation or a multi-page TIFF
        upright = ImageOps.exif_transpose(image)
        pixels = model_pixels(to_rgb(upright), size)
    return DecodedImage(path, pixels, width, height)


def _open(data: bytes) -> Image.Image:
    """Image.open, except that a JPEG too big for Pillow's decompression-bomb guard
    still opens: the guard judges the header size, but draft() decodes a JPEG at up
    to 1/8 per side, so a 200 MP panorama costs about 3 MP. _check_decoded_size then
    judges the size draft() leaves. Every other format decodes at full size and keeps
    Pillow's guard as is (WebP, say, allocates its canvas while opening).

    Nothing global changes (a relaxed Image.MAX_IMAGE_PIXELS would relax it for
    every thread of a process that decodes with workers=0): Image.open applies the
    guard after the format plugin has read the header, and the JPEG plugin itself
    does not, so opening the file through the plugin reads the header unchecked.
    """
    try:
        return Image.open(io.BytesIO(data), formats=_openable_formats())
    except Image.DecompressionBombError:
        if not data.startswith(_JPEG_MAGIC):
            raise
    # The first frame only, as for any JPEG: an MPO's first picture is this one too.
    return JpegImagePlugin.JpegImageFile(io.BytesIO(data))


def _openable_formats() -> tuple[str, ...]:
    """PILLOW_FORMATS this process has a plugin for: HEIF only once register_heif() ran.

    Image.open raises KeyError('HEIF') for an unknown format name instead of trying the
    next one, so a fresh worker that meets a non-image file before any HEIC must not ask
    for HEIF; the file then gets the usual 'not a supported image' row.
    """
    Image.preinit()  # JPEG, PNG, BMP, GIF
    from PIL import TiffImagePlugin, WebPImagePlugin  # noqa: F401 - registers TIFF, WEBP

    return tuple(name for name in PILLOW_FORMATS if name in Image.OPEN)


def _check_decoded_size(image: Image.Image, header_pixels: int) -> None:
    """Pillow's decompression-bomb limit, applied to what will really be decoded.

    For every image but a huge JPEG (see _open), Image.open has checked the same
    size already; a JPEG is refused when even its draft() size is over the limit
    (no DCT scaling possible, or the file is more than 64 times the limit).
    """
    limit = Image.MAX_IMAGE_PIXELS
    decoded = image.width * image.height
    if limit is not None and decoded > 2 * limit:
        raise Image.DecompressionBombError(
            f"Image size ({header_pixels} pixels, {decoded} when decoded at the smallest "
            f"JPEG scale that fits the model) exceeds limit of {2 * limit} pixels, "
            "could be decompression bomb DOS attack."
        )


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

DecodeFn = Callable[[Path, int], DecodedImage]

WORKER_DIED = (
    "the decoder process died while reading this file, also when retried alone "
    "(killed or crashed: out of memory, or a fault in the image codec)"
)
# Files in a row that kill a fresh worker even alone, none decoded in between, before
# decode_many gives up: by then the workers themselves cannot run (see DecoderError).
WORKER_DEATHS_IN_A_ROW = 8
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class DecoderError(CaptionCliError):
    """The decoder processes die whatever file they read, so the run stops.

    Each file a dying worker loses costs two process starts before it is marked
    WORKER_DIED; when workers cannot start or run at all (an import error in the
    spawned interpreter, a sandbox that kills every child) a large run would crawl
    for hours producing only errors. Files handed out before keep their results.
    """


def start_decoders(workers: int) -> ProcessPoolExecutor | None:
    """Decode workers started now, before the model loads, to hand to decode_many later.

    A spawned worker needs ~0.1-0.15 s to boot an interpreter and import Pillow and numpy;
    started first, that happens while the parent builds its onnxruntime sessions instead
    of before the first file decodes (the start of every `caption-cli annotate`). Each
    worker gets one empty task, because ProcessPoolExecutor starts processes only as
    tasks arrive. None for workers <= 0 (decoding in this process). The caller owns the
    pool until it gives it to decode_many, and shuts it down if it never does.
    """
    if workers <= 0:
        return None
    pool = _spawn_pool(workers)
    with _sigint_blocked():  # as in _OrderedDecoders._submit
        for _ in range(workers):
            pool.submit(_ready)
    return pool


def _ready() -> None:
    """The empty task that makes a worker start (its import of this module is the work)."""


def decode_many(
    paths: Iterable[Path],
    size: int,
    workers: int,
    prefetch: int | None = None,
    decode_fn: DecodeFn = decode,
    pool: ProcessPoolExecutor | None = None,
) -> Iterator[DecodedImage]:
    """decode() every path in worker processes; results come back in input order.

    At most `prefetch` (default 4 per worker) files are in flight, so the paths can
    be an endless generator and memory stays flat. workers <= 0 decodes in this
    process (small runs, debugging). A worker that dies (killed for memory, a codec
    crash) costs at most the file it was reading, never the run: see _OrderedDecoders.
    decode_fn must be a top-level function, because workers import it by name (tests
    pass one that crashes on purpose). The generator must be consumed by a thread that
    outlives it: workers are tied to the thread that started them (see _init_worker).
    pool, from start_decoders(workers) in the same thread, is used (and shut down) instead
    of a new one.
    """
    if workers <= 0:
        if pool is not None:
            pool.shutdown(wait=False)
        for path in paths:
            yield decode_fn(path, size)
        return
    limit = max(1, prefetch or 4 * workers)
    decoders = _OrderedDecoders(workers, size, decode_fn, pool)
    try:
        for path in paths:
            decoders.put(path)
            if len(decoders) >= limit:
                yield decoders.get()
        while len(decoders):
            yield decoders.get()
    finally:
        decoders.close()


class _OrderedDecoders:
    """A process pool that hands results back in input order and outlives a dead worker.

    When one worker dies, ProcessPoolExecutor fails every file in flight, although
    only one of them was being read by that worker. So the broken pool is replaced
    and each lost file is retried alone: a file that kills its worker again is the
    culprit and gets WORKER_DIED; the innocent ones decode as usual. A file is tried
    at most twice, so a poison file cannot loop, nor take other files with it.
    When WORKER_DEATHS_IN_A_ROW files in a row kill their worker alone, and no worker
    has finished a file in between, the workers are what is broken: DecoderError.
    """

    def __init__(
        self, workers: int, size: int, decode_fn: DecodeFn, pool: ProcessPoolExecutor | None = None
    ) -> None:
        try:  # a lambda would fail once per file, in the workers: say so once, here
            pickle.dumps(decode_fn)
        except (pickle.PicklingError, AttributeError, TypeError) as exc:
            raise TypeError(f"decode_fn must be a top-level function ({exc})") from None
        self._workers = workers
        self._size = size
        self._decode_fn = decode_fn
        # Oldest first; a retried file holds its result instead of a future.
        self._pending: deque[tuple[Path, Future[DecodedImage] | DecodedImage]] = deque()
        self._deaths_in_a_row = 0  # files that killed a worker alone since one decoded
        self._pool = pool or _spawn_pool(workers)

    def __len__(self) -> int:
        return len(self._pending)

    def put(self, path: Path) -> None:
        try:
            future = self._submit(path)
        except BrokenExecutor:  # a worker died since the last result
            self._recover()
            future = self._submit(path)
        self._pending.append((path, future))

    def get(self) -> DecodedImage:
        """The oldest file's result, waiting for it."""
        path, outcome = self._pending[0]
        if isinstance(outcome, Future):
            if _lost(outcome):
                self._recover()
            else:  # a worker finished it (a decode error is still a worker's result)
                self._deaths_in_a_row = 0
        path, outcome = self._pending.popleft()
        return outcome if isinstance(outcome, DecodedImage) else _result(path, outcome)

    def close(self) -> None:
        # Running decodes finish (workers ignore Ctrl-C); queued ones are dropped.
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _recover(self) -> None:
        """Swap the broken pool for a fresh one, then retry alone each file it lost."""
        self._replace_pool()
        lost = []
        for index in range(len(self._pending)):
            path, outcome = self._pending[index]
            if not isinstance(outcome, Future):
                continue
            if _lost(outcome):
                lost.append(index)
            else:  # finished before any retry below: a worker ran, whatever came after
                self._pending[index] = (path, _result(path, outcome))
                self._deaths_in_a_row = 0
        for index in lost:
            path, _ = self._pending[index]
            self._pending[index] = (path, self._retry_alone(path))

    def _retry_alone(self, path: Path) -> DecodedImage:
        """Decode one file with nothing else in flight, so a crash can only be its own."""
        future = self._submit(path)
        if not _lost(future):
            self._deaths_in_a_row = 0
            return _result(path, future)
        self._replace_pool()
        self._deaths_in_a_row += 1
        if self._deaths_in_a_row >= WORKER_DEATHS_IN_A_ROW:
            raise DecoderError(
                f"the decoder processes keep dying: {self._deaths_in_a_row} files in a row "
                "killed the process reading them, also when retried alone, and no file "
                f"decoded in between (the last: {path}); worker processes seem unable to "
                "run here (a broken Python environment, a sandbox that kills child "
                "processes, or too little memory); try --workers 0 to decode in the main process"
            )
        return DecodedImage(path, None, None, None, WORKER_DIED)

    def _submit(self, path: Path) -> Future[DecodedImage]:
        # Workers are spawned inside submit. Started with SIGINT blocked, they hold a
        # Ctrl-C that comes while they boot until _init_worker has ignored it
        # (multiprocessing's resource tracker starts the same way).
        with _sigint_blocked():
            return self._pool.submit(self._decode_fn, path, self._size)

    def _replace_pool(self) -> None:
        # shutdown(wait) joins the broken pool's manager thread, which has failed
        # or finished every one of its futures by then.
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = _spawn_pool(self._workers)


def _spawn_pool(workers: int) -> ProcessPoolExecutor:
    # Spawned, not forked: the parent may already hold onnxruntime threads, which
    # a fork would copy mid-flight. Workers start on demand, as submits need them.
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(os.getpid(),),
    )


def _lost(future: Future[DecodedImage]) -> bool:
    """Wait for a future; whether it failed because its pool broke (a worker died)."""
    try:
        return isinstance(future.exception(), BrokenExecutor)
    except CancelledError:  # cancelled when its broken pool was shut down
        return True


def _result(path: Path, future: Future[DecodedImage]) -> DecodedImage:
    """The future's result; a decode_fn that raised (decode never does) is an error too."""
    try:
        return future.result()
    except Exception as exc:  # noqa: BLE001 - one bad file must never end the run
        return DecodedImage(path, None, None, None, describe_error(exc, path))


@contextmanager
def _sigint_blocked() -> Iterator[None]:
    """Block SIGINT in this thread; one that arrives meanwhile is delivered after."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _init_worker(parent_pid: int) -> None:
    """Tie a decode worker's life to its parent and leave Ctrl-C to the parent.

    A worker whose parent is SIGKILLed would wait for work forever (it holds the
    write end of its own task queue, so it never sees end-of-file), and so would
    multiprocessing's resource tracker, which waits for the workers. On Linux the
    parent-death signal ends the worker, and the tracker follows. The kernel sends it
    when the *thread* that started the worker ends, hence decode_many's rule about
    threads. Ctrl-C reaches the whole process group; ignoring it here spares a
    KeyboardInterrupt traceback per worker, and the parent shuts the pool down.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # drops one held since _submit
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    if sys.platform.startswith("linux"):
        try:
            prctl = ctypes.CDLL(None, use_errno=True).prctl
            prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
            prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):  # no libc or no prctl: live without it
            pass
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(0)
