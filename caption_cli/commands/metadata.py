"""CLI command: write-metadata (the database's captions into XMP/EXIF/IPTC or XMP sidecars)."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from caption_cli.commands.annotate import MinConfidenceOption, _tell_stop
from caption_cli.confidence import DEFAULT_MIN_CONFIDENCE, held_back_message, split_by_confidence
from caption_cli.display import showing
from caption_cli.errors import CaptionCliError
from caption_cli.stopping import exit_status, signal_name, signals_stop_like_ctrl_c, stop_signal
from caption_cli.store import DB_ENV, DEFAULT_DB

HELD_BACK = "held-back"  # a caption below --min-confidence: counted, never written


class Mode(str, Enum):
    sidecar = "sidecar"
    in_place = "in-place"


class SidecarName(str, Enum):
    default = "default"
    adobe = "adobe"


def register(app: typer.Typer) -> None:
    """Add this area's commands to the app."""
    app.command("write-metadata")(write_metadata)


def write_metadata(
    paths: list[Path] | None = typer.Argument(
        None, exists=True, help="Photos or folders to write (default: every captioned photo in the database)."
    ),
    db: Path = typer.Option(DEFAULT_DB, "--db", envvar=DB_ENV, dir_okay=False, help=f"Caption database (env {DB_ENV})."),
    mode: Mode = typer.Option(
        Mode.sidecar, "--mode",
        help="sidecar: an .xmp next to each photo, the photo untouched. in-place: into JPEG/PNG/WebP/TIFF"
        " via a verified copy (HEIC/HEIF and RAW still get a sidecar).",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace descriptions a person wrote (kept by default)."),
    sidecar_name: SidecarName = typer.Option(
        SidecarName.default, "--sidecar-name",
        help="default: IMG_1.jpg.xmp (darktable, digiKam, Immich); adobe: IMG_1.xmp (Lightroom, Bridge).",
    ),
    min_confidence: MinConfidenceOption = DEFAULT_MIN_CONFIDENCE,
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be written; change nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object with every file's outcome."),
) -> None:
    """Write the database's captions into photo metadata (XMP, EXIF, IPTC) or XMP sidecars.

    Example: caption-cli write-metadata ~/Pictures/2024 --mode in-place --db captions.db
    """
    from caption_cli.metadata import MetadataOutcome, MetadataWriter, write_recorded
    from caption_cli.store import Store

    if not db.is_file():
        raise typer.BadParameter(f"{db}: no caption database here; run 'caption-cli annotate DIR' first", param_hint="--db")
    err = Console(stderr=True)
    outcomes: list[MetadataOutcome] = []

    def tell(done: list[MetadataOutcome]) -> None:
        outcomes.extend(done)
        if not as_json:
            for outcome in done:
                if outcome.status in ("skipped", "error"):
                    typer.echo(f"{outcome.path}: {outcome.message}", err=True)

    try:
        with signals_stop_like_ctrl_c(), Store(db) as store, MetadataWriter(  # SIGTERM/SIGHUP stop as Ctrl-C does
            mode=mode.value, overwrite=overwrite, sidecar_name=sidecar_name.value, dry_run=dry_run
        ) as writer, showing(_progress(err)) as progress:
            rows, unknown = _select(store, paths or [])
            tell([MetadataOutcome(p, "error", "no caption in the database; run annotate first") for p in unknown])
            rows, held = split_by_confidence(rows, min_confidence)  # no metadata beats wrong metadata
            outcomes.extend(MetadataOutcome(Path(row["path"]), HELD_BACK,
                                            held_back_message(row.get("confidence"), min_confidence))
                            for row in held)
            task = progress.add_task("Metadata", total=len(rows))
            for row in rows:  # a stop waits for the photo in hand: written, its new key stored, counted
                write_recorded(writer, _request(row), store, tell, record=not dry_run)
                progress.advance(task)
    except CaptionCliError as error:
        err.print(f"[red]error:[/] {error}", markup=True, highlight=False)
        raise typer.Exit(1) from error
    except KeyboardInterrupt as interrupt:  # Ctrl-C, SIGTERM or SIGHUP: every file is whole, written or not
        counts = Counter(outcome.status for outcome in outcomes)
        written = "would write" if dry_run else "written"
        _tell_stop(f"Stopped by {signal_name(stop_signal(interrupt))} after {len(outcomes)} file(s): "
                   f"{counts['written']} {written}, {counts['unchanged']} unchanged, {counts['skipped']} skipped, "
                   f"{counts[HELD_BACK]} held back, {counts['error']} failed. Each photo has either its old or its "
                   f"new metadata; run the same command again to go on.")
        raise typer.Exit(exit_status(interrupt)) from None

    counts = Counter(outcome.status for outcome in outcomes)
    if as_json:
        typer.echo(json.dumps({
            "mode": mode.value, "dry_run": dry_run,
            "min_confidence": min_confidence,
            "counts": {status: counts.get(status, 0) for status in ("written", "unchanged", "skipped", HELD_BACK, "error")},
            "files": [{"path": str(o.path), "status": o.status, "message": o.message} for o in outcomes],
        }, ensure_ascii=False, indent=2))
    else:
        written = "would write" if dry_run else "written"
        typer.echo(
            f"Metadata ({mode.value}): {counts['written']} {written}, {counts['unchanged']} unchanged, "
            f"{counts['skipped']} skipped, {counts[HELD_BACK]} held back (confidence below {min_confidence:.2f}), "
            f"{counts['error']} failed"
        )
    if counts["error"]:
        raise typer.Exit(1)


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=console, transient=True,
    )


def _select(store, paths: Sequence[Path]) -> tuple[list[dict], list[Path]]:
    """Rows captioned OK for the given files and folders (all when none), and the files
    given that have no caption. Paths are matched as given and with links resolved."""
    if not paths:
        return list(store.iter_images(status="ok")), []
    rows: dict[str, dict] = {}
    files = [path for path in paths if not path.is_dir()]
    folders = [path for path in paths if path.is_dir()]
    unknown = []
    if files:
        spellings = {path: {os.path.abspath(path), str(path.resolve())} for path in files}
        wanted = sorted(set().union(*spellings.values()))
        rows.update((row["path"], row) for row in store.iter_images(status="ok", paths=wanted))
        unknown = [path for path, names in spellings.items() if not names & rows.keys()]
    if folders:
        prefixes = tuple({os.path.join(name, "") for f in folders for name in (os.path.abspath(f), str(f.resolve()))})
        rows.update((row["path"], row) for row in store.iter_images(status="ok") if row["path"].startswith(prefixes))
    return [rows[key] for key in sorted(rows)], unknown


def _request(row: dict):
    from caption_cli.metadata import MetadataRequest

    # The pipeline records the bundle's name; the DB keeps "name@hash": use the name,
    # so annotate --write-metadata and write-metadata mark files the same way.
    model_name = (row.get("model_id") or "unknown").rsplit("@", 1)[0]
    return MetadataRequest(Path(row["path"]), row["caption"], model_name, row["size"], row["mtime"])
