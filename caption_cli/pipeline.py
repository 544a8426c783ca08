"""The annotate flow: walk -> skip finished -> decode in workers -> caption a batch -> store.

A file whose bytes the store has already captioned (moved, renamed, copied) is not
decoded: its worker hashes it, finds the hash, and the stored caption is copied.
After a complete walk, rows under the folders walked whose files are gone are
marked missing (caption_cli.prune).

Every stage is a generator over the one before, and the only look-ahead is bounded
(a resume look-up chunk, the decoders' in-flight files, the batch being gathered and the
one the captioner holds while it encodes the next: Captioner.caption_stream), so memory
stays flat for any number of photos. A bad file becomes an error row and the run goes on;
each batch is one database transaction, stored as soon as its captions come back, so a
run killed at any point loses at most the batches in flight (two), which the next run
captions. A run stopped by Ctrl-C (or SIGTERM/SIGHUP, see caption_cli.stopping) raises
Stopped with the counts of what it stored, after finishing its runs row.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from caption_cli.confidence import passes
from caption_cli.images import DecodedImage, content_hash, decode, decode_many, resolve_root, walk
from caption_cli.prune import mark_missing
from caption_cli.results import Caption, CaptionResult
from caption_cli.stopping import Stopped, stop_signal, stops_held

if TYPE_CHECKING:
    from caption_cli.store import ReusedCaption


class CaptionerLike(Protocol):
    """What the pipeline needs from caption_cli.captioner.Captioner."""

    device: str
    bundle: Any  # .model_id, .name, .image_size

    def caption(self, pixels: np.ndarray) -> list[Caption]: ...
    # Optional: caption_stream(batches) -> (context, captions) per (context, pixels), in order,
    # free to work on the next batch before it hands back this one (see caption_stream below).


class StoreLike(Protocol):
    """What the pipeline needs from caption_cli.store.Store (or DryRunStore)."""

    def start_run(self, model_id: str, device: str, argv: Sequence[str]) -> int: ...
    def finish_run(self, run_id: int, captioned: int, skipped: int, failed: int, reused: int = 0) -> None: ...
    def already_done(self, keys: Sequence[tuple], model_id: str) -> set[str]: ...
    def write_batch(self, results: Sequence[CaptionResult], model_id: str, run_id: int) -> None: ...
    def update_keys(self, keys: Sequence[tuple]) -> None: ...
    def stored_captions(self, paths: Sequence[Path], model_id: str) -> list[tuple]: ...
    # Content reuse and missing files (optional: a store without them captions everything
    # and marks nothing).
    # def hash_lookup(self, model_id: str) -> Callable[[str], bool] | None
    # def reusable_caption(self, content_hash: str, model_id: str) -> ReusedCaption | None
    # def paths_under(self, folder) / set_missing(missing, found_again)


def default_workers(device: str = "cpu") -> int:
    """Decoder processes. On the CPU the model needs cores too: leave it one, use at most
    four. With CUDA the cores only decode (a 12 MP JPEG takes ~10 ms of a core, so a
    GPU captioning 1,500 images/s needs about 15): every core but the one feeding the GPU."""
    cores = os.cpu_count() or 2
    if device == "cuda":
        return max(1, cores - 1)
    return max(1, min(4, cores - 1))


@dataclass
class AnnotateOptions:
    recursive: bool = True
    include_hidden: bool = False
    batch_size: int = 16
    workers: int = 2  # decoder processes; 0 decodes in this process
    force: bool = False  # caption again even what the store already has (no skip, no reuse)
    reuse: bool = True  # copy the stored caption of a file with the same bytes instead of captioning
    mark_missing: bool = True  # after the walk, mark rows under the folders whose files are gone
    lookup_size: int = 256  # keys per resume query
    prefetch: int | None = None  # files in the decoders at once (None: a batch plus 4 per worker)
    min_confidence: float = 0.0  # metadata only for captions at least this sure (confidence.passes)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.workers < 0:
            raise ValueError(f"workers must be 0 or more, got {self.workers}")


@dataclass
class Summary:
    captioned: int = 0  # by the model, in this run
    reused: int = 0  # same bytes as a stored caption (moved, renamed, copied): copied, no model run
    skipped: int = 0
    failed: int = 0
    missing: int = 0  # rows under the folders walked whose files are gone (caption-cli prune removes them)
    seconds: float = 0.0
    metadata_written: int = 0
    metadata_failed: int = 0
    metadata_held_back: int = 0  # captions below --min-confidence: no metadata is better than wrong metadata

    @property
    def images_per_second(self) -> float:
        """Files given a caption (by the model or reused) per second of the run."""
        done = self.captioned + self.reused
        return done / self.seconds if self.seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        """Exit code 0 or 1: did every file (and every metadata write) succeed?"""
        return self.failed == 0 and self.metadata_failed == 0


@dataclass(frozen=True)
class FileKey:
    """A file as found on disk: what resume compares (public: the cluster run sends these to its nodes)."""

    path: Path
    size: int
    mtime: float


ResultHandler = Callable[[CaptionResult], None]
SkipHandler = Callable[[Path], None]
MetadataHandler = Callable[[Any], None]  # a caption_cli.metadata.MetadataOutcome


class RunRecorder:
    """One run's bookkeeping, shared with caption_cli.cluster so that both runs count and record alike.

    Starts the store's runs row, counts each file into the Summary (captioned, reused,
    failed, skipped) before passing it on to the caller's handlers, and finishes the row
    with those counts.
    """

    def __init__(self, store: StoreLike, model_id: str, device: str, argv: Sequence[str],
                 on_result: ResultHandler | None = None, on_skip: SkipHandler | None = None) -> None:
        self.store = store
        self.summary = Summary()
        self.on_result = on_result
        self.on_skip = on_skip
        self.started = time.monotonic()
        self.run_id = store.start_run(model_id, device, argv)

    def result(self, result: CaptionResult) -> None:
        """Count a captioned, reused or failed file (after its batch is stored) and report it."""
        self.results([result])

    def results(self, results: Sequence[CaptionResult]) -> None:
        """Count a stored batch's files, then report each: a report that fails (stdout piped
        into a `head` that has quit) cannot leave the counts short of what was stored."""
        for result in results:
            if result.reused:
                self.summary.reused += 1
            elif result.status == "ok":
                self.summary.captioned += 1
            else:
                self.summary.failed += 1
        if self.on_result:
            for result in results:
                self.on_result(result)

    def skipped(self, path: Path) -> None:
        """Count and report a file the store already has."""
        self.summary.skipped += 1
        if self.on_skip:
            self.on_skip(path)

    def walk_error(self, path: Path, message: str) -> None:
        """A folder that cannot be listed: reported and counted, but not a row."""
        self.result(CaptionResult(path=path, size=0, mtime=0.0, status="error", error=message))

    def mark_missing_under(self, roots: Sequence[Path | str], options: AnnotateOptions) -> None:
        """Mark rows under the folders walked whose files are gone; only after a complete
        walk, since a run stopped half-way has not looked everywhere."""
        if options.mark_missing and hasattr(self.store, "paths_under"):
            folders = [resolve_root(root) for root in roots]
            self.summary.missing = mark_missing(self.store, [folder for folder in folders if folder.is_dir()])

    def finish(self) -> None:
        """Close the runs row with the counts (in a finally: a stopped run keeps its record too)."""
        summary = self.summary
        summary.seconds = time.monotonic() - self.started
        self.store.finish_run(self.run_id, summary.captioned, summary.skipped, summary.failed, summary.reused)


def annotate(
    roots: Iterable[Path | str],
    captioner: CaptionerLike,
    store: StoreLike,
    options: AnnotateOptions | None = None,
    *,
    argv: Sequence[str] = (),
    on_result: ResultHandler | None = None,
    on_skip: SkipHandler | None = None,
    metadata_writer: Any | None = None,
    on_metadata: MetadataHandler | None = None,
    decoder_pool: Any | None = None,
) -> Summary:
    """Caption every image under roots that the store does not already have.

    on_result sees each captioned or failed file (after its batch is stored),
    on_skip each file skipped as already done. metadata_writer, when given, is an
    open caption_cli.metadata.MetadataWriter that receives each batch's captions, and
    the stored captions of skipped files too (so a second run with --write-metadata,
    or one after a run killed between storing a batch and writing its metadata,
    still writes every file; the writer leaves files that already agree unchanged);
    on_metadata sees its outcomes. decoder_pool is images.start_decoders(options.workers),
    started by the caller before the model loaded so the workers are up by now.
    """
    options = options or AnnotateOptions()
    model_id = captioner.bundle.model_id

    def skipped(path: Path) -> None:
        if on_skip:
            on_skip(path)
        if metadata_writer is not None:  # a skipped file's stored caption still goes into its metadata
            batcher.add_skipped(path)

    run = RunRecorder(store, model_id, captioner.device, argv, on_result, skipped)
    roots = list(roots)
    known = None
    if options.reuse and not options.force and hasattr(store, "hash_lookup"):
        known = store.hash_lookup(model_id)
    size = captioner.bundle.image_size
    batcher = _Batcher(captioner, store, model_id, run.run_id, run.results, metadata_writer, run.summary,
                       on_metadata, options.min_confidence, size, reusing=known is not None)
    try:
        todo = files_to_caption(roots, store, model_id, options, run)
        in_flight: deque[FileKey] = deque()  # keys of files the decoders hold, in order

        def paths() -> Iterator[Path]:
            for key in todo:
                in_flight.append(key)
                yield key.path

        decode_fn = decode if known is None else partial(decode, known=known)
        # A batch's worth of files ahead: the workers keep decoding the next batch while
        # this one is captioned, instead of stopping a few files in.
        prefetch = options.prefetch or options.batch_size + 4 * options.workers

        def batches() -> Iterator[tuple[Batch, np.ndarray | None]]:
            for decoded in decode_many(paths(), size, options.workers, prefetch=prefetch, decode_fn=decode_fn,
                                      pool=decoder_pool):
                batcher.add(in_flight.popleft(), decoded)
                if batcher.ready(options.batch_size):
                    yield batcher.take()
            if batcher.items:
                yield batcher.take()

        # The captioner may hold one batch while it searches the one before (caption_stream):
        # each batch is stored as soon as its captions come back.
        for batch, captions in caption_stream(captioner, batches()):
            batcher.store(batch, captions)
        batcher.flush_skipped()
        run.mark_missing_under(roots, options)
    except KeyboardInterrupt as interrupt:  # Ctrl-C, or SIGTERM/SIGHUP (caption_cli.stopping)
        raise Stopped(stop_signal(interrupt), run.summary) from interrupt
    finally:
        if known is not None and hasattr(known, "close"):
            known.close()  # used in this process when workers == 0
        with stops_held(run.summary):  # a second Ctrl-C must not leave the runs row open
            run.finish()
    return run.summary


def files_to_caption(roots: Sequence[Path | str], store: StoreLike, model_id: str, options: AnnotateOptions,
                     run: RunRecorder) -> Iterator[FileKey]:
    """The files under roots the store does not have yet (shared, so a cluster run resumes as a local one does)."""
    found = walk(roots, options.recursive, options.include_hidden, on_error=run.walk_error)
    return _unfinished(_keys(found), store, model_id, options, run.skipped)


def _keys(paths: Iterable[Path]) -> Iterator[FileKey]:
    """Size and mtime of each file; a file that cannot be stat'ed still goes on, so
    decode names its cause (a dangling symlink, a file deleted meanwhile)."""
    for path in paths:
        try:
            info = path.stat()
        except OSError:
            yield FileKey(path, 0, 0.0)
        else:
            yield FileKey(path, info.st_size, info.st_mtime)


def _unfinished(
    keys: Iterable[FileKey],
    store: StoreLike,
    model_id: str,
    options: AnnotateOptions,
    on_skip: SkipHandler,
) -> Iterator[FileKey]:
    """Drop files already captioned by this model, one store query per chunk."""
    keys = iter(keys)
    while chunk := list(islice(keys, options.lookup_size)):
        done = set() if options.force else store.already_done(
            [(key.path, key.size, key.mtime) for key in chunk], model_id
        )
        if done and options.reuse and hasattr(store, "unhashed"):
            _backfill_hashes(store, store.unhashed(sorted(done)))
        for key in chunk:
            if str(key.path) in done:
                on_skip(key.path)
            else:
                yield key


def _backfill_hashes(store: StoreLike, paths: Sequence[str]) -> None:
    """Rows stored before content reuse existed get their hash the first time a run skips
    them, so copies of those photos are reused too. A read and a hash per file, once."""
    hashes = []
    for path in paths:
        try:
            hashes.append((path, content_hash(Path(path).read_bytes())))
        except OSError:
            continue  # unreadable now: it keeps no hash, and the next run tries again
    store.set_hashes(hashes)


def caption_stream(captioner: CaptionerLike, batches: Iterable[tuple[Any, np.ndarray | None]]
                   ) -> Iterator[tuple[Any, list[Caption]]]:
    """(context, captions) for each (context, pixels), in order: the captioner's own
    caption_stream when it has one (the Captioner keeps its encoder a batch ahead),
    else one caption() call per batch. pixels None: no captions."""
    stream = getattr(captioner, "caption_stream", None)
    if stream is not None:
        return stream(batches)
    return ((context, [] if pixels is None else captioner.caption(pixels)) for context, pixels in batches)


@dataclass
class Batch:
    """Files taken from the batcher: each with its decoded image and reused caption (or
    None), and the content keys whose pixels went to the captioner, in order."""

    items: list[tuple[FileKey, DecodedImage, ReusedCaption | None]]
    contents: list[str | int]


SKIPPED_METADATA_CHUNK = 64  # skipped files whose stored captions go to the writer at once


class _Batcher:
    """Collects decoded files; take() hands over a batch's pixels to caption, store() writes
    the batch once its captions are back."""

    def __init__(
        self,
        captioner: CaptionerLike,
        store: StoreLike,
        model_id: str,
        run_id: int,
        report: Callable[[Sequence[CaptionResult]], None],
        metadata_writer: Any | None,
        summary: Summary,
        on_metadata: MetadataHandler | None,
        min_confidence: float = 0.0,
        image_size: int = 0,
        reusing: bool = False,
    ) -> None:
        self.captioner = captioner
        self.image_size = image_size
        self.reusing = reusing
        self.min_confidence = min_confidence
        self.database = store
        self.model_id = model_id
        self.run_id = run_id
        self.report = report
        self.metadata_writer = metadata_writer
        self.summary = summary
        self.on_metadata = on_metadata
        self.items: list[tuple[FileKey, DecodedImage, ReusedCaption | None]] = []
        self.good = 0
        self.skipped: list[Path] = []  # already captioned; their metadata is still written

    def add_skipped(self, path: Path) -> None:
        self.skipped.append(path)
        if len(self.skipped) >= SKIPPED_METADATA_CHUNK:
            self.flush_skipped()

    def flush_skipped(self) -> None:
        """Write the stored captions of skipped files into their metadata."""
        if not self.skipped:
            return
        from caption_cli.metadata import MetadataRequest  # only when asked for

        rows = self.database.stored_captions(self.skipped, self.model_id)
        self.skipped = []
        name = self.captioner.bundle.name
        self._send_metadata([MetadataRequest(Path(path), caption, name, size, mtime)
                             for path, caption, size, mtime, confidence in rows
                             if self._publishable(confidence)])

    def add(self, key: FileKey, decoded: DecodedImage) -> None:
        reused = None
        if decoded.reusable:
            # The worker found these bytes in the store; the row could have gone since
            # (pruned by another process): then the file is decoded here after all.
            reused = self.database.reusable_caption(decoded.content_hash, self.model_id)
            if reused is None:
                decoded = decode(key.path, self.image_size)
        self.items.append((key, decoded, reused))
        self.good += decoded.error is None and reused is None

    def ready(self, batch_size: int) -> bool:
        # Errors ride along with the next batch, but a long run of bad files
        # is still written out in bounded groups.
        return self.good >= batch_size or len(self.items) >= 4 * batch_size

    def take(self) -> tuple[Batch, np.ndarray | None]:
        """The files added so far, and the pixels to caption for them (None: nothing to
        caption); the batcher starts empty again. Each distinct content is captioned
        once: copies in one batch share the caption."""
        todo: dict[str | int, np.ndarray] = {}
        for index, (_, decoded, reused) in enumerate(self.items):
            if decoded.error is None and reused is None:
                todo.setdefault(self._content_key(decoded, index), decoded.pixels)
        batch = Batch(self.items, list(todo))
        self.items, self.good = [], 0
        return batch, np.stack(list(todo.values())) if todo else None

    def store(self, batch: Batch, captions: list[Caption]) -> None:
        """Write a taken batch with its captions (in the order of its pixels) and count and
        report it, then write its metadata."""
        if len(captions) != len(batch.contents):
            raise RuntimeError(f"the captioner returned {len(captions)} captions for {len(batch.contents)} images")
        by_content = dict(zip(batch.contents, captions))
        first_of: set[str | int] = set()
        results = []
        for index, (key, decoded, reused) in enumerate(batch.items):
            if reused is not None:
                results.append(_reused_result(key, decoded, reused))
            elif decoded.error is not None:
                results.append(caption_result(key, decoded, None))
            else:
                content = self._content_key(decoded, index)
                result = caption_result(key, decoded, by_content[content])
                result.reused = content in first_of
                first_of.add(content)
                results.append(result)
        with stops_held(self.summary):  # a stop waits until the rows are stored and counted
            self.database.write_batch(results, self.model_id, self.run_id)
            self.report(results)
        if self.metadata_writer is not None:
            self._write_metadata([r for r in results if r.status == "ok"])

    def _content_key(self, decoded: DecodedImage, index: int) -> str | int:
        """What makes two files the same content: their hash when reuse is on."""
        if self.reusing and decoded.content_hash is not None:
            return decoded.content_hash
        return index

    def _write_metadata(self, results: list[CaptionResult]) -> None:
        from caption_cli.metadata import MetadataRequest  # only when asked for

        name = self.captioner.bundle.name
        self._send_metadata([MetadataRequest(r.path, r.caption.text, name, r.size, r.mtime)
                             for r in results if self._publishable(r.caption.confidence)])

    def _publishable(self, confidence: float | None) -> bool:
        """The shared --min-confidence rule; what it holds back is counted, not written."""
        if passes(confidence, self.min_confidence):
            return True
        self.summary.metadata_held_back += 1
        return False

    def _send_metadata(self, requests: list) -> None:
        from caption_cli.metadata import write_recorded  # only when asked for

        def count(outcomes: list) -> None:
            self.summary.metadata_written += sum(o.status == "written" for o in outcomes)
            self.summary.metadata_failed += sum(o.status == "error" for o in outcomes)

        for request in requests:
            outcomes = write_recorded(self.metadata_writer, request, self.database, count)
            if self.on_metadata:
                for outcome in outcomes:
                    self.on_metadata(outcome)


def caption_result(key: FileKey, decoded: DecodedImage, caption: Caption | None) -> CaptionResult:
    """The row of a decoded file (public: the cluster's captioner actors must make the same rows)."""
    return CaptionResult(
        path=key.path,
        size=key.size,
        mtime=key.mtime,
        status="error" if decoded.error else "ok",
        width=decoded.width,
        height=decoded.height,
        error=decoded.error,
        caption=caption,
        content_hash=decoded.content_hash,
    )


def _reused_result(key: FileKey, decoded: DecodedImage, reused: ReusedCaption) -> CaptionResult:
    return CaptionResult(
        path=key.path,
        size=key.size,
        mtime=key.mtime,
        status="ok",
        width=reused.width,
        height=reused.height,
        caption=reused.caption,
        content_hash=decoded.content_hash,
        reused=True,
    )
