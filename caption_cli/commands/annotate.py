"""CLI commands: annotate, search, show, info.

A thin shell: check options and paths before any model loads, call one library
function, print. The runtime is imported inside functions so `--help` stays fast and
nothing loads onnxruntime until it is needed.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Callable
from contextlib import ExitStack
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from caption_cli.confidence import DEFAULT_MIN_CONFIDENCE
from caption_cli.display import display_text, stop_quietly
from caption_cli.errors import BundleError, CaptionCliError
from caption_cli.results import CaptionResult
from caption_cli.stopping import exit_status, signal_name, signals_stop_like_ctrl_c, stop_signal
from caption_cli.store import DB_ENV, DEFAULT_DB

MAX_BATCH = 1024  # images held in memory at once (decoded pixels, beams): a typo must not exhaust RAM


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class MetadataMode(str, Enum):
    sidecar = "sidecar"
    in_place = "in-place"


# Options shared by several commands, defined once.
DbOption = Annotated[
    Path,
    typer.Option(
        "--db",
        envvar=DB_ENV,
        dir_okay=False,
        help="Caption database (SQLite).",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]
ModelOption = Annotated[
    Path | None,
    typer.Option(
        "--model",
        exists=True,
        file_okay=False,
        help="Model bundle folder (default: the bundle shipped with caption-cli).",
    ),
]
DeviceOption = Annotated[
    Device, typer.Option("--device", help="Where the model runs; auto picks CUDA when it works.")
]
MinConfidenceOption = Annotated[
    float,
    typer.Option(
        "--min-confidence",
        min=0.0,
        max=1.0,
        help="Publish only captions at least this sure (calibrated probability that a caption is"
        " acceptable); the rest are held back and counted. 0 keeps every caption.",
    ),
]
BatchSizeOption = Annotated[
    int | None,
    typer.Option("--batch-size", min=1, max=MAX_BATCH, help="Images per model call (default: 16 on the CPU,"
                 " 256 with CUDA)."),
]
WorkersOption = Annotated[
    int | None,
    typer.Option("--workers", min=0, help="Decoder processes (0: in this process; default: cores - 1, at most 4 on"
                 " the CPU, no cap with CUDA)."),
]
RecursiveOption = Annotated[bool, typer.Option("--recursive/--no-recursive", help="Walk sub-folders.")]
IncludeHiddenOption = Annotated[bool, typer.Option("--include-hidden", help="Also walk hidden files and folders.")]
WriteMetadataOption = Annotated[
    MetadataMode | None, typer.Option("--write-metadata", help="Also write captions into photo metadata.")
]


def load_captioner(
    model: Path | None, device: str, beam: int | None = None, alternatives: int | None = None
) -> Any:
    """Build the runtime Captioner: the one seam tests replace with a fake.

    Beam width and number of alternatives left as None take the bundle's model.json.
    """
    from caption_cli.beam import SearchOptions
    from caption_cli.bundle import load_bundle
    from caption_cli.captioner import Captioner

    options = SearchOptions(beam_size=beam, alternatives=alternatives)
    # overlap: the pipeline streams its batches, so each batch's encoder runs beside the
    # search of the one before, on a CPU too (Captioner.caption_stream, issue #13)
    return Captioner(load_bundle(model), device=device, options=options, overlap=True)


def _captioner_or_exit(
    model: Path | None, device: Device, beam: int | None, alternatives: int | None,
    load: Callable[..., Any] | None = None,
) -> Any:
    from caption_cli.beam import SearchOptionsError

    try:
        return (load or load_captioner)(model, device.value, beam, alternatives)
    except SearchOptionsError as exc:  # e.g. --alternatives above the bundle's beam
        _usage_error(str(exc), "--beam/--alternatives")
    except BundleError as exc:
        if model is not None:
            _usage_error(str(exc), "--model")
        _fail(str(exc))
    except CaptionCliError as exc:
        _fail(str(exc))


def _fail(message: str) -> NoReturn:
    """One error line, exit 1. Messages often hold a path, hence display_text."""
    typer.echo(f"Error: {display_text(message)}", err=True)
    raise typer.Exit(1)


def _usage_error(message: str, param_hint: str) -> NoReturn:
    """Exit 2 with Typer's usage box; paths in the message are made printable."""
    raise typer.BadParameter(display_text(message), param_hint=param_hint)


def _json_safe(value: Any) -> Any:
    """Strings made valid UTF-8, in any nesting: a name that is not UTF-8 would
    otherwise reach stdout as raw invalid bytes and break every JSON reader."""
    if isinstance(value, str):
        return display_text(value, escape_controls=False)  # JSON escapes controls itself
    if isinstance(value, Path):
        return display_text(value, escape_controls=False)
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def _dumps(value: Any, indent: int | None = None) -> str:
    return json.dumps(_json_safe(value), ensure_ascii=False, indent=indent)


def _encodes_as_utf8(text: str) -> bool:
    """False for text holding bytes that are not UTF-8 (from a file name or argv),
    which SQLite cannot bind."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _open_store(db: Path) -> Any:
    from caption_cli.store import Store

    try:
        return Store(db)
    except CaptionCliError as exc:
        _fail(str(exc))


def _existing_store_path(db: Path) -> None:
    """A usage error unless the database exists (commands that only use what is stored)."""
    if not db.is_file():
        _usage_error(f"no caption database at {db} (run caption-cli annotate first)", "--db")


def _existing_store(db: Path) -> Any:
    """Open a database that must already exist, for reading (search, show): it may sit
    in a read-only folder, an archive's copy on a DVD or a share mounted read-only."""
    from caption_cli.store import Store

    _existing_store_path(db)
    try:
        return Store.for_reading(db)
    except CaptionCliError as exc:
        _fail(str(exc))


# ------------------------------------------------------------------------ annotate


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.1f} images/s" if speed else "-- images/s")


def _interactive() -> bool:
    """A person watches stderr: show the progress bar (a seam for tests)."""
    return sys.stderr.isatty()


def _stderr_console(**kwargs: Any) -> Console:
    """The progress bar's console. It prints file names, so it never reads rich markup
    (`[bold]`), emoji codes (`:sunny:`) or highlights in what it prints."""
    return Console(stderr=True, markup=False, emoji=False, highlight=False, **kwargs)


class _Reporter:
    """Everything annotate prints: error lines, --json rows, the progress bar."""

    def __init__(
        self, as_json: bool, show_progress: bool, total: int | None, console: Console | None = None
    ) -> None:
        self.as_json = as_json
        self.console = console or _stderr_console()
        self.progress: Progress | None = None
        if show_progress:
            self.progress = Progress(
                TextColumn("captioning"),
                BarColumn(),
                MofNCompleteColumn(),
                _RateColumn(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self.task = self.progress.add_task("annotate", total=total)

    def __enter__(self) -> _Reporter:
        if self.progress:
            self.progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.progress:
            # the last frame shows what was done, also when the count has not finished
            done = self.progress.tasks[0].completed
            self.progress.update(self.task, total=max(done, self.progress.tasks[0].total or 0))
            stop_quietly(self.progress)  # after a SIGHUP the terminal may be gone

    def set_total(self, total: int) -> None:
        """The number of files to expect, once the background count knows it."""
        if self.progress:
            self.progress.update(self.task, total=total)

    def _err(self, path: Path | str, message: str) -> None:
        """One line per file: control characters in the name or message are escaped."""
        line = f"{display_text(path)}: {display_text(message)}"
        if self.progress:
            self.progress.console.print(line, markup=False, emoji=False, highlight=False, soft_wrap=True)
        else:
            typer.echo(line, err=True)

    def _json(self, row: dict) -> None:
        typer.echo(_dumps(row))

    def _advance(self) -> None:
        if self.progress:
            self.progress.advance(self.task)

    def result(self, result: CaptionResult) -> None:
        if result.status == "error":
            self._err(result.path, result.error or "failed")
        if self.as_json:
            caption = result.caption
            self._json(
                {
                    "path": result.path,
                    "status": result.status,
                    "reused": result.reused,
                    "caption": caption.text if caption else None,
                    "score": caption.score if caption else None,
                    "confidence": caption.confidence if caption else None,
                    "error": result.error,
                    "width": result.width,
                    "height": result.height,
                    "alternatives": [
                        {"caption": a.caption, "score": a.score, "confidence": a.confidence}
                        for a in caption.alternatives
                    ]
                    if caption
                    else [],
                }
            )
        self._advance()

    def skipped(self, path: Path) -> None:
        if self.as_json:
            self._json({"path": path, "status": "skipped", "caption": None, "score": None, "confidence": None,
                        "error": None})
        self._advance()

    def metadata(self, outcome: Any) -> None:
        if outcome.status == "error":
            self._err(outcome.path, f"metadata not written: {outcome.message}")


def annotate(
    paths: Annotated[
        list[Path], typer.Argument(exists=True, help="Photo folders or files.", show_default=False)
    ],
    db: DbOption = DEFAULT_DB,
    model: ModelOption = None,
    device: DeviceOption = Device.auto,
    batch_size: BatchSizeOption = None,
    workers: WorkersOption = None,
    beam: Annotated[
        int | None, typer.Option("--beam", min=1, help="Beam width (default: the bundle's).")
    ] = None,
    alternatives: Annotated[
        int | None,
        typer.Option("--alternatives", min=1, help="Ranked captions kept per image (<= beam)."),
    ] = None,
    recursive: RecursiveOption = True,
    include_hidden: IncludeHiddenOption = False,
    force: Annotated[bool, typer.Option("--force", help="Caption again what is already stored.")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Caption and report, but write nothing.")
    ] = False,
    write_metadata: WriteMetadataOption = None,
    min_confidence: MinConfidenceOption = DEFAULT_MIN_CONFIDENCE,
    as_json: JsonOption = False,
    ray: Annotated[
        str | None,
        typer.Option("--ray", metavar="auto|local|ADDRESS", help="Decode and caption on a Ray cluster (auto: the"
                     " running one; local: start one here; or the head's host:port); the database stays here."
                     " Needs pip install 'caption-cli[cluster]'; see docs/cluster.md."),
    ] = None,
) -> None:
    """Caption every photo under the given folders into the database.

    Example: caption-cli annotate ~/Pictures --db photos.db --beam 5
    """
    from caption_cli.pipeline import AnnotateOptions, default_workers
    from caption_cli.pipeline import annotate as run_pipeline

    # Everything the user can get wrong is checked before the model loads.
    _check_search_options(beam, alternatives)
    load = None
    if ray is not None:  # the same flow, with decoding and the model on the cluster (caption_cli.cluster)
        from functools import partial

        from caption_cli import cluster

        if write_metadata is not None:
            _usage_error("--write-metadata does not run with --ray yet; run caption-cli write-metadata after", "--ray")
        try:
            cluster.require_ray()
        except CaptionCliError as exc:
            _fail(str(exc))
        load, run_pipeline = cluster.load_remote_captioner, partial(cluster.annotate, address=ray)
    if not dry_run and not db.resolve().parent.is_dir():
        _usage_error(f"folder {db.parent} does not exist", "--db")
    options = AnnotateOptions(
        recursive=recursive,
        include_hidden=include_hidden,
        batch_size=batch_size or 16,
        workers=default_workers() if workers is None else workers,
        force=force,
        min_confidence=min_confidence,
    )
    show_progress = _interactive()

    try:
        with ExitStack() as stack:
            stack.enter_context(signals_stop_like_ctrl_c())  # a service's stop ends the run like Ctrl-C
            # Cheap failures first (exiftool missing), then the model, then the Ray cluster,
            # then the store: a bad --model, or --alternatives above the bundle's beam, is only
            # found once the bundle is read, a cluster only once it is asked, and neither
            # failure must leave a new empty database behind.
            writer = None
            if write_metadata is not None:
                writer = stack.enter_context(_metadata_writer(write_metadata, dry_run))
            pool = None
            if ray is None:  # the workers boot while the sessions are built (images.start_decoders)
                from caption_cli.images import start_decoders

                pool = start_decoders(options.workers)
                if pool is not None:
                    stack.callback(pool.shutdown, wait=True, cancel_futures=True)
            prestarted = options.workers
            captioner = _captioner_or_exit(model, device, beam, alternatives, load)
            size_for_device(options, captioner, batch_size, workers)
            if pool is not None and options.workers != prestarted:  # CUDA loaded: more decoders
                pool.shutdown(wait=False, cancel_futures=True)
                pool = None
            if ray is not None:  # cluster.annotate runs on this connection; it ends with the stack
                try:
                    ray_module = stack.enter_context(cluster.connected(ray))
                    # ray.init() put in its own SIGTERM handler (sys.exit): ours again, over it
                    stack.enter_context(signals_stop_like_ctrl_c())
                    # a pool that cannot fit (--device cuda with no GPU, too few CPUs) fails here too
                    cluster.plan(ray_module.cluster_resources(), captioner.requested_device, cluster.ClusterOptions())
                except CaptionCliError as exc:
                    _fail(str(exc))
            if dry_run:
                from caption_cli.store import DryRunStore

                store = stack.enter_context(DryRunStore(db))
            else:
                store = stack.enter_context(_open_store(db))
            reporter = stack.enter_context(_Reporter(as_json, show_progress, total=None))
            if show_progress:
                _count_in_background(paths, options, reporter.set_total)
            try:
                summary = run_pipeline(
                    paths,
                    captioner,
                    store,
                    options,
                    argv=sys.argv,
                    on_result=reporter.result,
                    on_skip=reporter.skipped,
                    metadata_writer=writer,
                    on_metadata=reporter.metadata,
                    **({} if pool is None else {"decoder_pool": pool}),
                )
            except CaptionCliError as exc:
                _fail(str(exc))
    except KeyboardInterrupt as interrupt:  # Ctrl-C, SIGTERM or SIGHUP: what was stored stays
        _report_stop(interrupt, dry_run, metadata=write_metadata is not None)
    typer.echo(_summary_line(summary, captioner.device, write_metadata is not None, min_confidence, dry_run),
               err=as_json)
    kept = summary.skipped + summary.reused
    if kept and not force and (beam is not None or alternatives is not None):
        typer.echo(f"{kept} file(s) were already captioned by this model (or are copies of such files) and "
                   "kept their captions; add --force to caption them again with these search options.", err=True)
    if not summary.ok:
        raise typer.Exit(1)


def _report_stop(interrupt: KeyboardInterrupt, dry_run: bool, metadata: bool = False) -> NoReturn:
    """How far a stopped run got, in one line, then exit 128 + the signal's number (130 for
    Ctrl-C). Every batch stored before the stop stays; the next run skips those files."""
    summary = getattr(interrupt, "summary", None)
    line = f"Stopped by {signal_name(stop_signal(interrupt))}"
    if summary is not None:
        line += (f" after {summary.seconds:.1f} s: captioned {summary.captioned}, reused {summary.reused}, "
                 f"skipped {summary.skipped}, failed {summary.failed}")
        if metadata:
            line += f"; metadata written {summary.metadata_written}, failed {summary.metadata_failed}"
    if dry_run:
        line += " (dry run: nothing was written)."
    else:
        line += ". What was stored stays; run the same command again to go on."
    _tell_stop(line)
    raise typer.Exit(exit_status(interrupt))


def _tell_stop(line: str) -> None:
    """A stopped command's last line, on stderr; after a SIGHUP the terminal may be gone."""
    try:
        typer.echo(line, err=True)
    except OSError:
        pass


def _summary_line(summary: Any, device: str, metadata: bool, min_confidence: float, dry_run: bool) -> str:
    """The one line every annotate (and every watch batch) ends with."""
    line = (
        f"Captioned {summary.captioned}, reused {summary.reused}, skipped {summary.skipped}, "
        f"failed {summary.failed} in {summary.seconds:.1f} s ({summary.images_per_second:.1f} images/s) on {device}"
    )
    if metadata:
        line += (f"; metadata written {summary.metadata_written}, held back {summary.metadata_held_back}"
                 f" (confidence below {min_confidence:.2f}), failed {summary.metadata_failed}")
    if summary.missing:
        line += f"; {summary.missing} stored file(s) no longer exist (caption-cli prune forgets them)"
    if dry_run:
        line += " (dry run: nothing was written)"
    return line + "."


def size_for_device(options: Any, captioner: Any, batch_size: int | None, workers: int | None) -> None:
    """Batch size and decoders for where the model really runs (known only once it loaded):
    bigger batches and more decoders when CUDA loaded, unless the user said otherwise."""
    from caption_cli.pipeline import default_workers

    if batch_size is None:
        options.batch_size = getattr(captioner, "preferred_batch", options.batch_size)
    if workers is None:
        options.workers = default_workers(captioner.device)


def _check_search_options(beam: int | None, alternatives: int | None) -> None:
    """--beam and --alternatives against the beam search's own limits, before anything
    loads or any database is created. (Typer's min=1 already refused zero.)"""
    from caption_cli.beam import BEAM_SIZE_RANGE

    widest = BEAM_SIZE_RANGE[1]
    for option, value in (("--beam", beam), ("--alternatives", alternatives)):
        if value is not None and value > widest:
            _usage_error(f"{value} is more than {widest}, the beam search's limit", option)
    if beam is not None and alternatives is not None and alternatives > beam:
        _usage_error(
            f"--alternatives {alternatives} is more than --beam {beam}; use at most {beam}", "--alternatives"
        )


def _metadata_writer(mode: MetadataMode, dry_run: bool) -> Any:
    """An open MetadataWriter (exiftool started), or a usage error saying what is missing."""
    try:
        from caption_cli.metadata import MetadataWriter
    except ImportError as exc:
        raise typer.BadParameter(
            f"metadata writing is not available ({exc})", param_hint="--write-metadata"
        ) from exc
    writer = MetadataWriter(mode=mode.value, dry_run=dry_run)
    try:
        return writer.open()
    except CaptionCliError as exc:
        _fail(str(exc))


def _count_in_background(paths: list[Path], options: Any, on_total: Callable[[int], None]) -> None:
    """Count the files to expect in a daemon thread and hand the number to on_total.

    Captioning starts at once instead of after a second full walk (minutes on a NAS);
    until the count is in, the bar shows done/? and no ETA. The count only feeds the
    bar, so a failure in it is not the run's failure.
    """

    def count() -> None:
        try:
            on_total(_count(paths, options))
        except Exception:  # noqa: BLE001 - cosmetic: the run goes on without a total
            pass

    threading.Thread(target=count, name="caption-cli-count", daemon=True).start()


def _count(paths: list[Path], options: Any) -> int:
    """Files to expect, for the progress bar's total and ETA (a quick second walk).

    What the walk reports instead of yielding (a name that is not UTF-8, a folder that
    cannot be listed) reaches the reporter as a failed file too, so it counts: the bar
    then ends at exactly its total.
    """
    from caption_cli.images import walk

    reported = 0

    def count_reported(path: Path, message: str) -> None:
        nonlocal reported
        reported += 1

    found = sum(1 for _ in walk(paths, options.recursive, options.include_hidden, on_error=count_reported))
    return found + reported


# -------------------------------------------------------------------------- search


def search(
    query: Annotated[
        str,
        typer.Argument(
            help='Words to look for in captions: every word must match (stemmed), "quoted words" as a phrase.'
        ),
    ],
    db: DbOption = DEFAULT_DB,
    limit: Annotated[int, typer.Option("--limit", min=1, help="Most results to show.")] = 20,
    as_json: JsonOption = False,
) -> None:
    """Full-text search over the stored captions, best match first.

    Example: caption-cli search "dog on a beach" --limit 5
    """
    _check_query(query)
    store = _existing_store(db)
    with store:
        try:
            rows = store.search(query, limit=limit)
        except CaptionCliError as exc:
            _fail(str(exc))
    if as_json:
        typer.echo(_dumps(rows, indent=2))
        return
    if not rows:
        typer.echo(f"No caption matches {query!r}.", err=True)
    for row in rows:
        typer.echo(f"{display_text(row['path'])}\t{row['caption']}\t{row['score']:.3f}\t{_confidence_text(row)}")


def _check_query(query: str) -> None:
    """Refuse, as usage errors, queries the full-text index cannot run.

    The store quotes every word, so FTS operators (OR, NOT, NEAR, *) are plain words and
    only "..." phrases keep a meaning; a query with no word at all (`"`, `*`) would
    quote down to nothing, which FTS5 calls a syntax error.
    """
    if not query.strip():
        _usage_error("the query is empty", "QUERY")
    if not _encodes_as_utf8(query):
        _usage_error(f"the query is not valid UTF-8: {display_text(query)}", "QUERY")
    if not any(ch.isalnum() for ch in query):
        _usage_error(
            f"the query {query!r} has no word to look for; give words, or \"words in quotes\" for a phrase",
            "QUERY",
        )


# ---------------------------------------------------------------------------- show


def show(
    path: Annotated[Path, typer.Argument(help="A photo that was annotated.", show_default=False)],
    db: DbOption = DEFAULT_DB,
    heatmap: Annotated[
        Path | None,
        typer.Option("--heatmap", dir_okay=False, help="Write a PNG of each word's attention."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Show one photo's caption, ranked alternatives and scores.

    Example: caption-cli show ~/Pictures/beach.jpg --heatmap beach-attention.png
    """
    if heatmap is not None and not heatmap.resolve().parent.is_dir():
        _usage_error(f"folder {heatmap.parent} does not exist", "--heatmap")
    store = _existing_store(db)
    with store:
        from caption_cli.images import resolve_root

        lookup = os.path.abspath(path)
        if not _encodes_as_utf8(lookup):  # annotate refuses such names, so none is stored
            _fail(f"{path}: file name is not valid UTF-8, so it is not in {db} (rename it and annotate it)")
        # Stored paths are real paths (one file, one row); rows written before that are as typed.
        row = store.get_image(str(resolve_root(path))) or store.get_image(lookup)
        if row is None:
            _fail(f"{path}: not in {db} (run caption-cli annotate on it first)")
        alternatives = store.alternatives(row["id"])
        attention = store.attention(row["id"])
    if heatmap is not None:
        _write_heatmap(row, attention, heatmap)
    if as_json:
        row = {key: value for key, value in row.items() if key != "id"}
        row["alternatives"] = alternatives
        row["words"] = [word for word, _ in attention]
        if heatmap is not None:
            row["heatmap"] = heatmap
        typer.echo(_dumps(row, indent=2))
        if row["status"] != "ok":
            raise typer.Exit(1)  # as in text mode: the photo failed
        return
    typer.echo(display_text(row["path"]))
    if row["status"] != "ok":
        typer.echo(f"  error: {display_text(row['error'] or 'failed')}")
        raise typer.Exit(1)
    typer.echo(f"  caption: {row['caption']}  (score {row['score']:.3f}, {_confidence_text(row)})")
    typer.echo(f"  model: {row['model_id']}, captioned {row['captioned_at']}, {row['width']}x{row['height']} px")
    if row.get("missing_since"):
        typer.echo(f"  missing: the file was gone when its folder was annotated on {row['missing_since']}"
                   " (caption-cli prune forgets it)")
    if alternatives:
        typer.echo("  alternatives:")
        for alt in alternatives:
            typer.echo(f"    {alt['rank']}. {alt['caption']}  ({alt['score']:.3f}, {_confidence_text(alt)})")
    if heatmap is not None:
        typer.echo(f"  attention heat-map: {display_text(heatmap)}")


def _confidence_text(row: dict) -> str:
    """"confidence 0.73", or "confidence unknown" for a row of an uncalibrated model."""
    value = row.get("confidence")
    return "confidence unknown" if value is None else f"confidence {value:.2f}"


def _write_heatmap(row: dict, attention: list, out: Path) -> None:
    import numpy as np

    if row["status"] != "ok" or not attention:
        _fail(f"{row['path']}: no attention stored, so no heat-map")
    if not Path(row["path"]).is_file():
        _fail(f"{row['path']}: the photo is no longer there to draw the heat-map on")
    from caption_cli.attention import heatmap_png

    words = [word for word, _ in attention]
    weights = np.stack([grid for _, grid in attention])  # [T, h, w]
    try:
        heatmap_png(Path(row["path"]), words, weights, out)
    except (CaptionCliError, OSError) as exc:
        _fail(f"{out}: {exc}")


# ---------------------------------------------------------------------------- info


def info(
    model: ModelOption = None,
    device: DeviceOption = Device.auto,
    as_json: JsonOption = False,
) -> None:
    """Show the model bundle, the onnxruntime providers and the device that would run.

    Example: caption-cli info --device cuda --json
    """
    import onnxruntime

    captioner = _captioner_or_exit(model, device, None, None)
    bundle = captioner.bundle
    meta = getattr(bundle, "meta", {}) or {}
    data = {
        "name": bundle.name,
        "model_id": bundle.model_id,
        "backbone": meta.get("backbone"),
        "image_size": bundle.image_size,
        "grid": list(bundle.grid),
        "search": meta.get("search", {}),
        "scores": meta.get("scores", {}),
        "training": {k: v for k, v in meta.get("training", {}).items() if k != "config"},
        "calibration": meta.get("calibration"),
        "scorer": meta.get("scorer") if meta.get("files", {}).get("scorer") else None,
        "providers_available": onnxruntime.get_available_providers(),
        "providers": list(captioner.providers),
        "device": captioner.device,
    }
    if as_json:
        typer.echo(_dumps(data, indent=2))
        return
    typer.echo(f"model:     {data['name']} ({data['model_id']})")
    typer.echo(f"backbone:  {data['backbone']}, {data['image_size']} px, grid {'x'.join(map(str, data['grid']))}")
    for index, line in enumerate(_score_lines(data["scores"], data["search"].get("beam_size"))):
        typer.echo(f"{'scores:' if index == 0 else '':<11}{line}")
    typer.echo(f"confidence: {_calibration_line(meta.get('calibration'))}")
    if data["scorer"] is not None:
        typer.echo(f"{'':<11}read with a scorer ({meta['files']['scorer']}: a cross-entropy model's "
                   f"log-probability of each caption)")
    typer.echo(f"providers: {', '.join(data['providers_available'])} (available)")
    typer.echo(f"device:    {data['device']} ({', '.join(data['providers'])})")


METRICS = ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


def _calibration_line(calibration: dict | None) -> str:
    """Where the confidence map was fitted and how well it matched there."""
    if not calibration:
        return "not calibrated (captions have no confidence; run caption-cli calibrate)"
    fitted = calibration.get("fitted_on", {})
    quality = calibration.get("quality", {})
    threshold = calibration.get("acceptable", {}).get("threshold")
    parts = [f"fitted on {fitted.get('data', '?')} {fitted.get('split', '?')} ({fitted.get('images', '?')} images)"]
    if threshold is not None:
        parts.append(f"acceptable = CIDEr >= {threshold}")
    if "ece" in quality:
        parts.append(f"ECE {quality['ece']:.3f}")
    return ", ".join(parts)


def _score_lines(scores: dict, default_beam: int | None) -> list[str]:
    """model.json's measured scores as a few readable lines: where measured, then one per beam."""
    if not scores:
        return []
    where = [f"{scores['split']} split" if scores.get("split") else ""]
    where += [str(scores[key]) for key in ("dataset", "engine") if scores.get(key)]
    where = [part for part in where if part]
    lines = [" · ".join(where)] if where else []
    by_beam = scores.get("by_beam") or {scores.get("beam_size"): scores}
    for beam, values in by_beam.items():
        shown = ", ".join(f"{name} {values[name]:.3f}" for name in METRICS if isinstance(values.get(name), float))
        if shown and beam is None:
            lines.append(shown)
        elif shown:
            default = " (default)" if str(default_beam) == str(beam) else ""
            lines.append(f"beam {beam}{default}: {shown}")
    for other in scores.get("more", []):  # further test sets, one line each
        shown = ", ".join(f"{name} {other[name]:.3f}" for name in METRICS if isinstance(other.get(name), float))
        lines.append(f"{other.get('dataset', '?')} {other.get('split', '')}, beam {other.get('beam_size', '?')}: {shown}")
    if scores.get("selection"):
        lines.append(f"selected: {scores['selection']}")
    return lines


def register(app: typer.Typer) -> None:
    """Add this area's commands to the app."""
    app.command()(annotate)
    app.command()(search)
    app.command()(show)
    app.command()(info)
