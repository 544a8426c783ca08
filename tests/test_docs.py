"""Every command is documented: in the README and with an example in its --help."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from caption_cli.cli import app

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
COMMANDS = sorted(typer.main.get_command(app).commands)


def test_all_commands_are_listed() -> None:
    assert COMMANDS == ["alt-text", "annotate", "calibrate", "evaluate", "export", "info", "prune", "report",
                        "search", "show", "train", "watch", "write-metadata"]


@pytest.mark.parametrize("command", COMMANDS)
def test_command_is_in_readme(command: str) -> None:
    assert f"caption-cli {command}" in README


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_an_example(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0
    assert f"Example: caption-cli {command}" in result.output


def test_readme_test_command_is_what_ci_runs() -> None:
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in README
