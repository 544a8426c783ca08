"""The Typer application. Commands live in caption_cli/commands/, one module per area;
each module's `register(app)` adds its commands, so the shell stays thin and areas
can change independently."""

from __future__ import annotations

import typer

from caption_cli.commands import annotate, calibrate, metadata, prune, report, training, watch

app = typer.Typer(
    name="caption-cli",
    help="Caption photo libraries offline with a Show, Attend and Tell model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for area in (annotate, watch, metadata, report, prune, training, calibrate):
    area.register(app)


def main(prog_name: str | None = None) -> None:
    """The `caption-cli` command. A run stopped by Ctrl-C, SIGTERM or SIGHUP ends by that
    signal once it has cleaned up (caption_cli.stopping.end_like_the_signal)."""
    from caption_cli.stopping import end_like_the_signal, forget_reported_stop

    forget_reported_stop()
    try:
        app(prog_name=prog_name)
    finally:
        end_like_the_signal()
