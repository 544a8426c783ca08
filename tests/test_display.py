"""display_text: every path the CLI prints is valid UTF-8 and stays on one line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from caption_cli.display import display_text

LATIN1_NAME = os.fsdecode(b"/photos/lat\xe9.jpg")  # what Python makes of a Latin-1 byte


@pytest.mark.parametrize(
    "value, shown",
    [
        ("/photos/beach.jpg", "/photos/beach.jpg"),
        ("/photos/café 日本 ☀.jpg", "/photos/café 日本 ☀.jpg"),  # printable Unicode is kept
        (LATIN1_NAME, "/photos/lat\\xe9.jpg"),
        (b"/photos/lat\xe9.jpg", "/photos/lat\\xe9.jpg"),
        (Path(LATIN1_NAME), "/photos/lat\\xe9.jpg"),
        ("new\nline.jpg", "new\\nline.jpg"),
        ("tab\there\r.jpg", "tab\\there\\r.jpg"),
        ("bell\x07esc\x1b[31mdel\x7f.jpg", "bell\\x07esc\\x1b[31mdel\\x7f.jpg"),
        ("c1\x85.jpg", "c1\\x85.jpg"),  # NEL: a line break to str.splitlines
        ("ls\u2028ps\u2029.jpg", "ls\\u2028ps\\u2029.jpg"),
        ("no\u00a0break space.jpg", "no\u00a0break space.jpg"),  # not printable() but harmless: kept
        ("\ud800odd.jpg", "\\ud800odd.jpg"),  # a surrogate no file name decoding makes
    ],
)
def test_display_text(value: str | bytes | Path, shown: str) -> None:
    text = display_text(value)
    assert text == shown
    text.encode("utf-8")  # never raises
    assert len(text.splitlines()) == 1


def test_json_mode_keeps_control_characters_for_json_to_escape() -> None:
    assert display_text("new\nline.jpg", escape_controls=False) == "new\nline.jpg"
    assert display_text(LATIN1_NAME, escape_controls=False) == "/photos/lat\\xe9.jpg"
