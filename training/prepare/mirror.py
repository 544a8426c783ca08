"""Read files out of a fetched bare git mirror without checking it out.

A snapshot from the search tool's `fetch` is a bare git directory with no work tree;
its big files are absent and LFS files are 130-byte pointers. These helpers list the
tree with sizes and stream many blobs through one `git cat-file --batch` process
(one process per call, not one per file: a data set has 100k+ images).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Iterable, Iterator

JPEG_MAGIC = b"\xff\xd8\xff"
LFS_POINTER = b"version https://git-lfs.github.com/spec/"


class MirrorError(RuntimeError):
    """A git command on a mirror failed; the message names the mirror and the cause."""


def _git(git_dir: Path, *args: str) -> bytes:
    result = subprocess.run(["git", f"--git-dir={git_dir}", *args], capture_output=True)
    if result.returncode != 0:
        raise MirrorError(f"{git_dir}: git {' '.join(args)}: {result.stderr.decode(errors='replace').strip()}")
    return result.stdout


def head_commit(git_dir: Path, rev: str = "HEAD") -> str:
    """The commit id `rev` names (recorded as provenance)."""
    return _git(Path(git_dir), "rev-parse", rev).decode().strip()


def list_files(
    git_dir: Path, under: str = "", rev: str = "HEAD", include_absent: bool = False
) -> list[tuple[str, int]]:
    """(path, size in bytes) of every blob in `rev` below folder `under`, in git's order.

    Paths are "/"-separated and relative to the repository root. Submodule entries are skipped.
    Blobs the snapshot left out (files of 4 MiB and more) are skipped, or listed with size -1
    when `include_absent` is true, so a caller can say what it could not get.
    """
    args = ["ls-tree", "-r", "-l", "-z", "--full-tree", rev]
    if under:
        args += ["--", under.strip("/") + "/"]
    files = []
    for entry in _git(Path(git_dir), *args).split(b"\0"):
        if not entry:
            continue
        meta, path = entry.split(b"\t", 1)
        _mode, kind, _sha, size = meta.split()
        if kind != b"blob" or (size == b"BAD" and not include_absent):  # git prints BAD for a missing object
            continue
        files.append((path.decode("utf-8", errors="surrogateescape"), -1 if size == b"BAD" else int(size)))
    return files


def read_blobs(git_dir: Path, paths: Iterable[str], rev: str = "HEAD") -> Iterator[tuple[str, bytes | None]]:
    """(path, content) for each path, in order, through one `git cat-file --batch` process.

    A path that is not in `rev` yields (path, None) instead of raising, so a caller can
    name it in a one-line message and go on.
    """
    process = subprocess.Popen(
        ["git", f"--git-dir={git_dir}", "cat-file", "--batch"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0,
    )
    assert process.stdin is not None and process.stdout is not None
    out = process.stdout
    try:
        for path in paths:
            process.stdin.write(f"{rev}:{path}\n".encode("utf-8", errors="surrogateescape"))
            process.stdin.flush()
            header = out.readline().split()
            if len(header) != 3:  # "<object> missing" (or ambiguous)
                yield path, None
                continue
            size = int(header[2])
            data = _read_exactly(out, size)
            out.read(1)  # the newline after each object
            yield path, data
    finally:
        process.stdin.close()
        process.wait()


def read_blob(git_dir: Path, path: str, rev: str = "HEAD") -> bytes | None:
    """One file's content, or None if `path` is not in `rev`."""
    return next(read_blobs(git_dir, [path], rev))[1]


def _read_exactly(stream, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = stream.read(min(left, 1 << 20))
        if not chunk:
            raise MirrorError(f"git cat-file ended {left} bytes early")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def is_lfs_pointer(data: bytes) -> bool:
    """True for a Git LFS pointer file (the real content is not in the mirror)."""
    return data.startswith(LFS_POINTER)


def is_jpeg(data: bytes) -> bool:
    """True when the bytes start like a JPEG (SOI followed by a marker).

    An LFS pointer or an HTML error page fails this; a truncated JPEG is left to the decoder.
    """
    return data.startswith(JPEG_MAGIC)
