"""CLI commands: report (HTML gallery) and alt-text (fill missing alt text in HTML/Markdown)."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from caption_cli.commands.annotate import (
    DbOption,
    Device,
    DeviceOption,
    JsonOption,
    MinConfidenceOption,
    ModelOption,
)
from caption_cli.confidence import DEFAULT_MIN_CONFIDENCE
from caption_cli.errors import CaptionCliError
from caption_cli.store import DEFAULT_DB


def register(app: typer.Typer) -> None:
    """Add this area's commands to the app."""
    app.command("report")(report)
    app.command("alt-text")(alt_text)


def report(
    db: DbOption = DEFAULT_DB,
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", file_okay=False, help="Folder for index.html, page-N.html and thumbs/."
        ),
    ] = Path("report"),
    page_size: Annotated[int, typer.Option("--page-size", min=1, help="Photos per page.")] = 200,
    thumb_size: Annotated[
        int, typer.Option("--thumb-size", min=16, help="Longest side of thumbnails, in pixels.")
    ] = 320,
    workers: Annotated[
        int,
        typer.Option(
            "--workers", min=1, help="Threads making thumbnails (default: cores, at most 8)."
        ),
    ] = min(8, os.cpu_count() or 1),
    min_confidence: MinConfidenceOption = DEFAULT_MIN_CONFIDENCE,
) -> None:
    """Write a static HTML gallery of the captions, with per-word attention heat-maps.

    Example: caption-cli report --db captions.db --out report/
    """
    from caption_cli.report import build_report
    from caption_cli.store import Store

    if not db.is_file():
        raise typer.BadParameter(
            f"{db}: no caption database here; run 'caption-cli annotate DIR' first",
            param_hint="--db",
        )
    err = Console(stderr=True)
    try:
        with Store.for_reading(db) as store, _progress(err) as progress:
            task = progress.add_task("Thumbnails", total=None)
            summary = build_report(
                store,
                out,
                page_size=page_size,
                thumb_size=thumb_size,
                workers=workers,
                on_progress=lambda done, total: progress.update(task, completed=done, total=total),
                min_confidence=min_confidence,
            )
    except (CaptionCliError, OSError) as error:
        err.print(f"error: {error}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from error
    for line in summary.thumb_errors:
        err.print(line, markup=False, highlight=False, soft_wrap=True)
    pages = f"{summary.pages} page" + ("s" if summary.pages != 1 else "")
    typer.echo(
        f"Wrote {summary.index}: {summary.photos} photos on {pages} ({summary.failed} failed, "
        f"{summary.doubtful} marked low confidence, below {min_confidence:.2f}); "
        f"thumbnails: {summary.thumbs_made} made, {summary.thumbs_reused} reused"
        + (f", {len(summary.thumb_errors)} failed" if summary.thumb_errors else "")
    )
    if summary.thumb_errors:
        raise typer.Exit(1)


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


def alt_text(
    page: Annotated[
        Path,
        typer.Argument(exists=True, dir_okay=False, readable=True, help="An .html or .md file."),
    ],
    in_place: Annotated[
        bool, typer.Option("--in-place", "-i", help="Rewrite PAGE itself.")
    ] = False,
    out: Annotated[
        Optional[Path],
        typer.Option(
            "--out", "-o", dir_okay=False, help="Write the result here (default: stdout)."
        ),
    ] = None,
    db: DbOption = DEFAULT_DB,
    model: ModelOption = None,
    device: DeviceOption = Device.auto,
    limit: Annotated[
        int,
        typer.Option("--limit", min=20, help="Longest alt text, in characters (cut at a word)."),
    ] = 125,
    keep_empty: Annotated[
        bool, typer.Option("--keep-empty", help='Leave alt="" alone: it marks decorative images.')
    ] = False,
    site_root: Annotated[
        Optional[Path],
        typer.Option(
            "--site-root",
            file_okay=False,
            help='Folder that src="/..." is relative to (default: the page\'s folder).',
        ),
    ] = None,
    min_confidence: MinConfidenceOption = DEFAULT_MIN_CONFIDENCE,
    as_json: JsonOption = False,
) -> None:
    """Fill missing or empty alt text of local images in an HTML or Markdown page.

    Captions come from the database when the photo is already annotated (same size
    and mtime), otherwise from the model, which loads only if a photo needs it; the
    database is not changed. Existing alt text is never changed, nor is anything
    else in the file. --json prints one object per image on stdout.

    Example: caption-cli alt-text site/index.html --in-place --db captions.db
    """
    from caption_cli.alttext import StoreThenModel, fill_alt_text

    if in_place and out is not None:
        raise typer.BadParameter("use --in-place or --out, not both", param_hint="--out")
    if as_json and not in_place and out is None:
        raise typer.BadParameter(
            "--json prints to stdout, where the page would go: add --in-place or --out",
            param_hint="--json",
        )
    if model is not None and not (model / "model.json").is_file():
        raise typer.BadParameter(
            f"{model}: not a model bundle (no model.json)", param_hint="--model"
        )
    err = Console(stderr=True)
    store = _open_store_if_present(db)
    try:
        lookup = StoreThenModel(store, model, device=device.value, min_confidence=min_confidence)
        result = fill_alt_text(
            page, lookup, limit=limit, keep_empty=keep_empty, site_root=site_root
        )
    except (CaptionCliError, OSError, ValueError) as error:
        err.print(f"error: {error}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from error
    finally:
        if store is not None:
            store.close()

    target = page if in_place else out
    if target is None:
        sys.stdout.buffer.write(result.data)
        sys.stdout.flush()
    elif not in_place or result.count("filled"):
        _write_atomic(target, result.data, like=page)

    for outcome in result.outcomes:
        if as_json:
            typer.echo(json.dumps({"page": str(page), **outcome.__dict__}, ensure_ascii=False))
        elif outcome.status == "failed":
            err.print(
                f"{page}:{outcome.line}: {outcome.src}: {outcome.message}",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
    source = (
        f" ({lookup.from_store} from the database, {lookup.from_model} from the model)"
        if result.count("filled")
        else ""
    )
    err.print(
        f"{page}: {result.count('filled')} filled{source}, {result.count('kept')} kept, "
        f"{result.count('skipped')} skipped (not local), "
        f"{result.count('low-confidence')} held back (confidence below {min_confidence:.2f}), "
        f"{result.count('failed')} failed",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    if result.count("failed"):
        raise typer.Exit(1)


def _open_store_if_present(db: Path) -> object | None:
    """The database when there is one; alt-text works without it (model only)."""
    if not db.is_file():
        return None
    from caption_cli.store import Store

    try:
        return Store.for_reading(db)
    except CaptionCliError as error:
        raise typer.BadParameter(str(error), param_hint="--db") from error


def _write_atomic(target: Path, data: bytes, like: Path) -> None:
    """Write via a temporary file in the same folder, keeping the page's permissions."""
    target = target.resolve()
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.chmod(temporary, like.stat().st_mode & 0o7777)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
