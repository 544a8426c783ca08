"""Keep a library captioned while it changes: filesystem events in, annotate batches out.

watch never captions on its own: it turns events (or periodic rescans) into lists of
paths and hands each list to pipeline.annotate, so skipping, reuse by content, error
rows, metadata and the store behave exactly as in `caption-cli annotate`.

- Debounced: a file is captioned once its size and mtime have held still for
  `settle` seconds, so a photo being copied is read once, after it is complete. (A
  copy that stalls for longer is read early; its next change brings it back, and
  resume sees the new size.)
- A full rescan at start (what arrived while nobody watched; the watcher is already
  running, so nothing that arrives during it is missed) and every `rescan` seconds:
  events are not delivered on many network mounts, and a rescan is cheap because
  annotate skips what is stored. --poll makes the watcher poll instead.
- A burst (10,000 files dropped at once) is held as one dict of pending paths and
  captioned in batches of at most `max_batch` files.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from itertools import chain
from pathlib import Path
from typing import Any

import watchfiles
from watchfiles import Change

from caption_cli.images import is_image_name, resolve_root
from caption_cli.pipeline import AnnotateOptions, CaptionerLike, StoreLike, Summary, annotate
from caption_cli.prune import is_gone

SMALL_BATCH = 32  # fewer files than this are decoded in this process: no worker start-up per batch


@dataclass
class WatchOptions:
    settle: float = 2.0  # seconds a file's size and mtime must hold still before it is captioned
    rescan: float = 900.0  # seconds between full rescans (0: only the one at start)
    poll: bool = False  # poll the folders instead of waiting for events (network mounts)
    tick: float = 0.25  # how often pending files are looked at
    max_batch: int = 1000  # files per annotate call, so a burst reports progress as it goes


@dataclass
class WatchTotals:
    """What a watch session did, added up over its annotate calls."""

    batches: int = 0
    rescans: int = 0
    captioned: int = 0
    reused: int = 0
    skipped: int = 0
    failed: int = 0
    missing: int = 0  # rows marked missing: by the last full scan, plus deletions seen since
    metadata_failed: int = 0
    last: Summary | None = None

    def add(self, summary: Summary, full: bool) -> None:
        self.batches += 1
        self.rescans += full
        self.captioned += summary.captioned
        self.reused += summary.reused
        self.skipped += summary.skipped
        self.failed += summary.failed
        if full:
            self.missing = summary.missing  # a full scan counts every missing row under the roots
        self.metadata_failed += summary.metadata_failed
        self.last = summary

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.metadata_failed == 0


StatKey = tuple[int, int] | None  # (size, mtime_ns); None: not there (now)


def _stat_key(path: Path) -> StatKey:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_size, info.st_mtime_ns


@dataclass
class Settler:
    """Paths seen changing, released once they have held still for `settle` seconds."""

    settle: float
    clock: Callable[[], float] = time.monotonic
    _pending: dict[Path, tuple[StatKey, float]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self._pending)

    def saw(self, path: Path) -> None:
        """An event for path: (re)start its quiet period."""
        self._pending[path] = (_stat_key(path), self.clock())

    def ready(self, limit: int) -> list[Path]:
        """At most limit paths that have not changed for `settle` seconds (oldest first)."""
        now = self.clock()
        out: list[Path] = []
        for path, (key, since) in list(self._pending.items()):
            current = _stat_key(path)
            if current is None:
                del self._pending[path]  # gone again (a temporary file, a move): nothing to caption
            elif current != key:
                self._pending[path] = (current, now)  # still being written
            elif now - since >= self.settle and len(out) < limit:
                del self._pending[path]
                out.append(path)
        return out


def _photo_filter(roots: Sequence[Path], include_hidden: bool) -> Callable[[Any, str], bool]:
    """Events worth a look: photos and folders (a folder moved in brings its photos),
    never hidden ones unless asked, never the database, sidecars or temporary files."""

    def accept(change: Any, raw: str) -> bool:
        path = Path(raw)
        if not include_hidden and _hidden_below(path, roots):
            return False
        if is_image_name(path):
            return True
        # A folder that appears (created, moved in) is walked; one that is merely
        # modified (a file inside changed, which has its own event) is not.
        return change == Change.added and path.is_dir()

    return accept


def _hidden_below(path: Path, roots: Sequence[Path]) -> bool:
    for root in roots:
        if path.is_relative_to(root):
            return any(part.startswith(".") for part in path.relative_to(root).parts)
    return path.name.startswith(".")


def watch(
    roots: Iterable[Path | str],
    captioner: CaptionerLike,
    store: StoreLike,
    options: AnnotateOptions | None = None,
    watch_options: WatchOptions | None = None,
    *,
    stop: threading.Event | None = None,
    argv: Sequence[str] = (),
    on_batch: Callable[[Summary, bool], None] | None = None,
    totals: WatchTotals | None = None,
    **annotate_kwargs: Any,
) -> WatchTotals:
    """Caption what is under roots now, then whatever arrives or changes, until stop is set
    (or Ctrl-C, which the caller catches). on_batch(summary, full_scan) follows every
    annotate call; annotate_kwargs (on_result, metadata_writer, ...) go to each call.
    totals, when given, is filled as batches finish (so a caller still has it after Ctrl-C).
    """
    options = options or AnnotateOptions()
    watch_options = watch_options or WatchOptions()
    stop = stop or threading.Event()
    folders = [resolve_root(root) for root in roots]
    totals = totals if totals is not None else WatchTotals()

    def run(paths: Sequence[Path], full: bool) -> None:
        workers = options.workers if full or len(paths) >= SMALL_BATCH else 0
        batch_options = replace(options, workers=workers, mark_missing=full)
        summary = annotate(paths, captioner, store, batch_options, argv=argv, **annotate_kwargs)
        totals.add(summary, full)
        if on_batch:
            on_batch(summary, full)

    settler = Settler(watch_options.settle)
    gone: set[Path] = set()
    changes_iter = watchfiles.watch(
        *folders,
        watch_filter=_photo_filter(folders, options.include_hidden),
        debounce=max(50, int(watch_options.tick * 1000)),
        step=50,
        stop_event=stop,
        rust_timeout=max(50, int(watch_options.tick * 1000)),
        yield_on_timeout=True,
        force_polling=True if watch_options.poll else None,
        recursive=options.recursive,
        ignore_permission_denied=True,
    )
    # The watcher starts with the generator's first step (at most a tick): take it before the
    # catch-up scan, so a photo that arrives during the scan or just after it is seen now,
    # not at the next rescan. Its events wait in the watcher while the scan runs.
    first = next(changes_iter, set())
    run(folders, full=True)  # what arrived while nobody watched
    last_scan = time.monotonic()
    for changes in chain([first], changes_iter):
        for change, raw in changes:
            path = Path(raw)
            if change == Change.deleted:
                gone.add(path)
            else:
                settler.saw(path)
        while ready := settler.ready(watch_options.max_batch):
            run(ready, full=False)
            if stop.is_set():
                break
        if gone:
            totals.missing += _mark_gone(store, gone)
            gone = set()
        if watch_options.rescan > 0 and time.monotonic() - last_scan >= watch_options.rescan:
            run(folders, full=True)
            last_scan = time.monotonic()
        if stop.is_set():
            break
    return totals


def _mark_gone(store: StoreLike, paths: Iterable[Path]) -> int:
    """Rows of deleted photos are marked missing at once (prune removes them)."""
    if not hasattr(store, "set_missing"):
        return 0
    ids = []
    for path in paths:
        if is_gone(path):
            row = store.get_image(str(path))
            if row is not None:
                ids.append(row["id"])
    store.set_missing(ids, [])
    return len(ids)
