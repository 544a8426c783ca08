"""CLI command: watch, which keeps folders captioned as photos arrive, change and go.

The same options as annotate; each batch of settled files goes through the same
pipeline (caption_cli.watch). Ctrl-C stops it between two batches' writes, and so do
SIGTERM (a service manager's stop) and SIGHUP (caption_cli.stopping): every batch is one
transaction, so nothing stored is half-written, and what was in flight
is captioned by the next start's catch-up scan.
"""

from __future__ import annotations

import sys
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer

from caption_cli.commands.annotate import (
    BatchSizeOption,
    DbOption,
    Device,
    DeviceOption,
    IncludeHiddenOption,
    JsonOption,
    MinConfidenceOption,
    ModelOption,
    RecursiveOption,
    WorkersOption,
    WriteMetadataOption,
    _captioner_or_exit,
    _fail,
    _metadata_writer,
    _open_store,
    _Reporter,
    _summary_line,
    _usage_error,
    size_for_device,
)
from caption_cli.confidence import DEFAULT_MIN_CONFIDENCE
from caption_cli.errors import CaptionCliError
from caption_cli.stopping import signals_stop_like_ctrl_c
from caption_cli.store import DEFAULT_DB


def register(app: typer.Typer) -> None:
    app.command()(watch)


def watch(
    paths: Annotated[
        list[Path], typer.Argument(exists=True, file_okay=False, help="Photo folders to watch.", show_default=False)
    ],
    db: DbOption = DEFAULT_DB,
    model: ModelOption = None,
    device: DeviceOption = Device.auto,
    batch_size: BatchSizeOption = None,
    workers: WorkersOption = None,
    recursive: RecursiveOption = True,
    include_hidden: IncludeHiddenOption = False,
    write_metadata: WriteMetadataOption = None,
    min_confidence: MinConfidenceOption = DEFAULT_MIN_CONFIDENCE,
    settle: Annotated[
        float, typer.Option("--settle", min=0.0, help="Seconds a file must stay unchanged before it is captioned.")
    ] = 2.0,
    rescan: Annotated[
        float,
        typer.Option("--rescan", min=0.0, help="Seconds between full rescans, which catch changes no event"
                     " reported (network mounts); 0: only at start."),
    ] = 900.0,
    poll: Annotated[
        bool, typer.Option("--poll", help="Poll the folders instead of waiting for filesystem events.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Caption photos as they arrive or change, until Ctrl-C.

    Example: caption-cli watch ~/Pictures --write-metadata sidecar --db ~/captions.db
    """
    from caption_cli.pipeline import AnnotateOptions, default_workers
    from caption_cli.watch import WatchOptions, WatchTotals
    from caption_cli.watch import watch as run_watch

    if not db.resolve().parent.is_dir():
        _usage_error(f"folder {db.parent} does not exist", "--db")
    options = AnnotateOptions(
        recursive=recursive,
        include_hidden=include_hidden,
        batch_size=batch_size or 16,
        workers=default_workers() if workers is None else workers,
        min_confidence=min_confidence,
    )
    watch_options = WatchOptions(settle=settle, rescan=rescan, poll=poll)
    totals = WatchTotals()
    device_name = "?"
    with ExitStack() as stack:
        # a service manager's stop (SIGTERM) or a closed terminal (SIGHUP) ends the watch as Ctrl-C does
        stack.enter_context(signals_stop_like_ctrl_c())
        writer = None
        if write_metadata is not None:
            writer = stack.enter_context(_metadata_writer(write_metadata, dry_run=False))
        captioner = _captioner_or_exit(model, device, None, None)
        device_name = captioner.device
        size_for_device(options, captioner, batch_size, workers)
        store = stack.enter_context(_open_store(db))
        reporter = stack.enter_context(_Reporter(as_json, show_progress=False, total=None))

        def batch_done(summary, full: bool) -> None:
            if full or summary.captioned or summary.reused or summary.failed or summary.missing:
                stamp = datetime.now().strftime("%H:%M:%S")
                what = "scan" if full else "new"
                line = _summary_line(summary, device_name, writer is not None, min_confidence, dry_run=False)
                typer.echo(f"[{stamp} {what}] {line}", err=as_json)
                sys.stdout.flush()

        typer.echo(f"Watching {', '.join(str(p) for p in paths)} (Ctrl-C stops)", err=True)
        try:
            run_watch(
                paths, captioner, store, options, watch_options, argv=sys.argv, totals=totals,
                on_batch=batch_done, on_result=reporter.result,
                metadata_writer=writer, on_metadata=reporter.metadata,
            )
        except KeyboardInterrupt:
            pass  # the usual way to stop: Ctrl-C, or SIGTERM/SIGHUP (caption_cli.stopping)
        except CaptionCliError as exc:
            _fail(str(exc))
    typer.echo(
        f"Stopped. In {totals.batches} batch(es): captioned {totals.captioned}, reused {totals.reused},"
        f" failed {totals.failed}, missing {totals.missing}.", err=True,
    )
    if not totals.ok:
        raise typer.Exit(1)
