"""Rows of photos that are gone: marked missing by the next run over their folder, removed by prune.

Nothing here touches a photo; only database rows are marked or deleted. A file is
"gone" only when the system says it does not exist (ENOENT, ENOTDIR): a folder that
cannot be read, or a network mount that is away, is not evidence of deletion.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


class MissingStore(Protocol):
    """The store methods pruning uses (caption_cli.store.Store, DryRunStore)."""

    def paths_under(self, folder: Path | str, chunk: int = 1000) -> Iterable[list[tuple]]: ...
    def set_missing(self, missing: Sequence[int], found_again: Sequence[int]) -> None: ...


def is_gone(path: str | Path) -> bool:
    """Whether the file is known not to exist (a dangling symlink still exists as a link)."""
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:  # permission, I/O error, a mount that is away: not proof it is gone
        return False
    return False


def outermost(folders: Iterable[Path]) -> list[Path]:
    """The folders that are not inside another one of them, so no row is visited twice."""
    unique = sorted(set(folders), key=lambda folder: (len(folder.parts), str(folder)))
    kept: list[Path] = []
    for folder in unique:
        if not any(folder.is_relative_to(outer) for outer in kept):
            kept.append(folder)
    return sorted(kept)


def mark_missing(store: MissingStore, folders: Iterable[Path]) -> int:
    """Mark the rows inside folders whose files are gone; unmark those that came back.

    Returns how many rows inside the folders are missing now. One lstat per stored
    row, in chunks, so memory stays flat for any size of library.
    """
    missing_now = 0
    for folder in outermost(folders):
        for rows in store.paths_under(folder):
            gone, back = [], []
            for image_id, path, missing_since in rows:
                if is_gone(path):
                    gone.append(image_id)
                elif missing_since is not None:
                    back.append(image_id)
            missing_now += len(gone)
            store.set_missing(gone, back)
    return missing_now


@dataclass
class PruneResult:
    removed: list[str] = field(default_factory=list)  # paths whose rows were (or would be) deleted
    back: list[str] = field(default_factory=list)  # marked missing, but the file exists again: kept


def prune(store, dry_run: bool = False) -> PruneResult:
    """Delete the rows marked missing whose files are still gone (checked again now)."""
    result = PruneResult()
    gone_ids, back_ids = [], []
    for row in store.missing_rows():
        if is_gone(row["path"]):
            gone_ids.append(row["id"])
            result.removed.append(row["path"])
        else:
            back_ids.append(row["id"])
            result.back.append(row["path"])
    if not dry_run:
        store.set_missing([], back_ids)
        store.delete_rows(gone_ids)
    return result
