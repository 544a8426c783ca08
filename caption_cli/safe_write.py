"""Replace a file without ever half-writing it: a hidden temporary copy in the same
folder, fsynced, given the original's owner, permissions and extended attributes, then
swapped in with os.replace (atomic on one filesystem). A kill at any point leaves the
original whole; remove_stale_temps() clears copies a killed run left behind.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import stat
import time
import warnings
from pathlib import Path

from caption_cli.errors import MetadataError

STALE_TEMP_AGE_S = 3600.0  # a temp copy whose writer may live on another host

_TEMP_MARK = ".caption-cli-"
_TEMP_NAME = re.compile(r"^\..*\.caption-cli-(\d+)-[0-9a-f]{8}\.(?:tmp|xmp)$", re.S)


def _temp_prefix(target: Path) -> str:
    name = target.name
    if len(os.fsencode(name)) > 120:  # keep the temp name under NAME_MAX
        name = hashlib.sha1(os.fsencode(name)).hexdigest()[:16]
    return f".{name}{_TEMP_MARK}"


def temp_path(target: Path, suffix: str) -> Path:
    """A hidden, unique, recognisable name in target's folder (same filesystem, so the
    final os.replace is atomic; hidden, so annotate's walk never captions it)."""
    return target.with_name(f"{_temp_prefix(target)}{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete temporary copies that a killed caption-cli left in folder."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if not match or not entry.is_file(follow_symlinks=False):
            continue
        try:
            age = time.time() - entry.stat(follow_symlinks=False).st_mtime
            if age > STALE_TEMP_AGE_S or not _pid_alive(int(match.group(1))):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue
    return removed


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) is not a probe on Windows: rely on age
        return True
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_writable_file(path: Path, info: os.stat_result) -> None:
    # Mode bits as well as access(): root may write anything, but a 0444 photo says
    # "do not change me" and os.replace would ignore it.
    if not info.st_mode & 0o222 or not os.access(path, os.W_OK):
        raise MetadataError("read-only file; left unchanged")


def check_writable_folder(folder: Path) -> None:
    if not os.access(folder, os.W_OK | os.X_OK):
        raise MetadataError(f"folder {folder} is not writable (the safe write puts a temporary copy there)")


def copy_attributes(source: Path, info: os.stat_result, target: Path) -> None:
    """Give target the source's owner, permissions and extended attributes."""
    if hasattr(os, "geteuid") and (info.st_uid, info.st_gid) != (os.geteuid(), os.getegid()):
        try:
            os.chown(target, info.st_uid, info.st_gid)
        except OSError:
            pass  # not root: the file becomes ours, as any editor's save would
    os.chmod(target, stat.S_IMODE(info.st_mode))
    if hasattr(os, "listxattr"):  # e.g. KDE/GNOME tags and ratings
        try:
            names = os.listxattr(source)
        except OSError:
            names = []
        for name in names:
            try:
                os.setxattr(target, name, os.getxattr(source, name))
            except OSError:
                pass


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # Windows cannot open folders; NTFS journals the rename
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_untouched(path: Path, info: os.stat_result | None) -> None:
    """Nobody changed (or created) path while we worked on the copy."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        now = None
    if (info is None) != (now is None) or (
        now is not None and (now.st_size, now.st_mtime_ns, now.st_ino) != (info.st_size, info.st_mtime_ns, info.st_ino)
    ):
        raise MetadataError("changed by another program while writing; left unchanged")


def swap(temp: Path, target: Path) -> None:
    _fsync(temp)
    os.replace(temp, target)
    _fsync_folder(target.parent)


def unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def pixel_fingerprint(path: Path) -> tuple:
    """Decoded pixels of every frame, hashed: equal iff the image data is identical."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            digest = hashlib.sha256()
            frames = getattr(image, "n_frames", 1)
            for index in range(frames):
                image.seek(index)
                digest.update(f"{image.size}{image.mode}".encode())
                digest.update(image.tobytes())
            return image.format, frames, digest.hexdigest()
