"""CLI command: prune, which forgets the rows of photos that no longer exist.

annotate marks such rows missing when it walks their folder again; prune deletes
those rows (with their alternatives and attention) after checking once more that
the files are still gone. Nothing on disk is ever deleted.
"""

from __future__ import annotations

from typing import Annotated

import typer

from caption_cli.commands.annotate import DbOption, JsonOption, _dumps, _existing_store_path, _fail
from caption_cli.display import display_text
from caption_cli.errors import CaptionCliError
from caption_cli.store import DEFAULT_DB


def register(app: typer.Typer) -> None:
    app.command()(prune)


def prune(
    db: DbOption = DEFAULT_DB,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be removed; change nothing.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Forget stored captions of photos that were deleted (rows marked missing by annotate).

    Example: caption-cli prune --dry-run   (after caption-cli annotate ~/Pictures)
    """
    from caption_cli.prune import prune as run_prune
    from caption_cli.store import Store

    _existing_store_path(db)
    try:
        with Store(db) as store:
            result = run_prune(store, dry_run=dry_run)
    except CaptionCliError as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(_dumps({"removed": result.removed, "back": result.back, "dry_run": dry_run}))
        return
    verb = "would remove" if dry_run else "removed"
    for path in result.removed:
        typer.echo(f"{verb}: {display_text(path)}")
    typer.echo(
        f"{len(result.removed)} row(s) of missing files {verb}"
        + (f"; {len(result.back)} marked missing exist again and were kept" if result.back else "")
        + (" (dry run: nothing was changed)." if dry_run else ".")
    )
