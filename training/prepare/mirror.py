"""Read files out of a fetched bare git mirror without checking it out.

A snapshot from the search tool's `fetch` is a bare git directory with no work tree;
its big files are absent and LFS files are 130-byte pointers. These helpers list the
tree with sizes and stream many blobs through one `git cat-file --batch` process
(one process per call, not one per file: a data set has 100k+ images).

Repositories often commit a data folder and delete it later: `history_files` lists every
file of every commit the snapshot holds (newest commit first), so such images are found too.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from dataclasses import dataclass
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


@dataclass(frozen=True)
class HistoryFile:
    """One path as found in the newest commit (of any ref) that holds it."""

    path: str
    commit: str
    blob: str  # object id: read it with read_objects
    size: int


def _tree_entries(git_dir: Path, rev: str, under: str = "") -> Iterator[tuple[str, str, bytes]]:
    """(path, blob id, size field) of every blob in `rev` below `under`; size is b"BAD" for an absent blob."""
    args = ["ls-tree", "-r", "-l", "-z", "--full-tree", rev]
    if under:
        args += ["--", under.strip("/") + "/"]
    for entry in _git(Path(git_dir), *args).split(b"\0"):
        if not entry:
            continue
        meta, path = entry.split(b"\t", 1)
        _mode, kind, sha, size = meta.split()
        if kind == b"blob":  # submodule entries ("commit") are skipped
            yield path.decode("utf-8", errors="surrogateescape"), sha.decode(), size


def list_files(
    git_dir: Path, under: str = "", rev: str = "HEAD", include_absent: bool = False
) -> list[tuple[str, int]]:
    """(path, size in bytes) of every blob in `rev` below folder `under`, in git's order.

    Paths are "/"-separated and relative to the repository root. Submodule entries are skipped.
    Blobs the snapshot left out (files of 4 MiB and more) are skipped, or listed with size -1
    when `include_absent` is true, so a caller can say what it could not get.
    """
    files = []
    for path, _sha, size in _tree_entries(git_dir, rev, under):
        if size == b"BAD" and not include_absent:  # git prints BAD for a missing object
            continue
        files.append((path, -1 if size == b"BAD" else int(size)))
    return files


def history_files(git_dir: Path, max_commits: int = 5000) -> list[HistoryFile]:
    """Every path in any commit the mirror holds, each once, from the newest commit (HEAD first) that has it.

    Commits whose tree was already listed are skipped, and at most `max_commits` trees are
    read (a data repository's history is short; this bounds a huge one). Blobs the snapshot
    left out are skipped.
    """
    git_dir = Path(git_dir)
    head = head_commit(git_dir)
    lines = _git(git_dir, "rev-list", "--all", "--date-order", "--format=%H %T").decode().split("\n")
    commits = [line.split() for line in lines if line and not line.startswith("commit ")]
    commits.sort(key=lambda pair: pair[0] != head)  # stable: HEAD first, then newest first
    seen_trees: set[str] = set()
    found: dict[str, HistoryFile] = {}
    for commit, tree in commits:
        if tree in seen_trees:
            continue
        if len(seen_trees) >= max_commits:
            break
        seen_trees.add(tree)
        for path, sha, size in _tree_entries(git_dir, commit):
            if size != b"BAD" and path not in found:
                found[path] = HistoryFile(path, commit, sha, int(size))
    return list(found.values())


def read_blobs(git_dir: Path, paths: Iterable[str], rev: str = "HEAD") -> Iterator[tuple[str, bytes | None]]:
    """(path, content) for each path, in order, through one `git cat-file --batch` process.

    A path that is not in `rev` yields (path, None) instead of raising, so a caller can
    name it in a one-line message and go on.
    """
    paths = list(paths)
    yield from zip(paths, read_objects(git_dir, (f"{rev}:{path}" for path in paths)))


def read_objects(git_dir: Path, specs: Iterable[str]) -> Iterator[bytes | None]:
    """Content of each object name (`rev:path` or a blob id), in order, via one `git cat-file --batch`.

    A missing object yields None.
    """
    process = subprocess.Popen(
        ["git", f"--git-dir={git_dir}", "cat-file", "--batch"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0,
    )
    assert process.stdin is not None and process.stdout is not None
    out = process.stdout
    try:
        for spec in specs:
            process.stdin.write(f"{spec}\n".encode("utf-8", errors="surrogateescape"))
            process.stdin.flush()
            header = out.readline().split()
            if not header or header[-1] in (b"missing", b"ambiguous"):  # "<spec> missing"
                yield None
                continue
            size = int(header[2])  # "<object id> <type> <size>"
            data = _read_exactly(out, size)
            out.read(1)  # the newline after each object
            yield data
    finally:
        process.stdin.close()
        process.wait()


def read_blob(git_dir: Path, path: str, rev: str = "HEAD") -> bytes | None:
    """One file's content, or None if `path` is not in `rev`."""
    return next(read_blobs(git_dir, [path], rev))[1]


def read_blob_in_history(git_dir: Path, path: str) -> tuple[bytes, str] | None:
    """(content, commit) of `path` from HEAD, else from the newest commit that holds it; None if none does.

    Caption files get committed and deleted later just as image folders do, so a caption
    source is not lost when a repository drops it; the commit is returned for the provenance.
    """
    git_dir = Path(git_dir)
    if (data := read_blob(git_dir, path)) is not None:
        return data, head_commit(git_dir)
    for item in history_files(git_dir):
        if item.path == path:
            data = next(read_objects(git_dir, [item.blob]))
            return (data, item.commit) if data is not None else None
    return None


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
