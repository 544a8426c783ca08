"""Paths and messages made safe to print: valid UTF-8, and one line each.

A Linux file name is bytes. Python hands a name that is not UTF-8 over with lone
surrogates (surrogateescape), which a strict UTF-8 stream refuses and a lenient one
writes back as invalid bytes, so such a name would break JSON output or crash a print.
A name may also hold a newline or another control character, which would split the
"one line per bad file" rule, or a terminal escape sequence. Everything the CLI
prints about a file goes through `display_text`.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# Control characters shown the way Python and `ls -b` show them; others as \xNN / \uNNNN.
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_LINE_BREAKING = {"Cc", "Zl", "Zp"}  # controls (C0, DEL, C1) and the Unicode line/paragraph separators


def display_text(value: str | os.PathLike[str] | bytes, *, escape_controls: bool = True) -> str:
    """A path or message as printable text that always encodes to UTF-8.

    Bytes that are not UTF-8 become `\\xNN` (so `lat\\xe9.jpg` shows which byte is
    wrong). With escape_controls, control characters and line separators become
    `\\n`, `\\x1b`, `\\u2028` and so on, so the text stays on one line and cannot drive
    the terminal; JSON output passes escape_controls=False because JSON escapes them
    itself and a valid UTF-8 name then round-trips exactly.
    A backslash is left as is, so a name that already holds `\\n` reads the same as
    one with a newline: this text is for people, the database keeps the real name.
    """
    text = _valid_utf8(value)
    if escape_controls and not text.isprintable():
        text = "".join(_escape(ch) for ch in text)
    return text


def _valid_utf8(value: str | os.PathLike[str] | bytes) -> str:
    """The file system's bytes decoded as UTF-8, undecodable bytes as \\xNN."""
    if isinstance(value, str) and value.isascii():
        return value  # the usual case: nothing to check
    try:
        raw = os.fsencode(value)  # the name's real bytes (undoes surrogateescape)
    except UnicodeEncodeError:  # a surrogate that no file name decoding produced
        return os.fspath(value).encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def _escape(ch: str) -> str:
    if ch in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[ch]
    if unicodedata.category(ch) not in _LINE_BREAKING:
        return ch
    code = ord(ch)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


@contextmanager
def showing(progress: Any) -> Iterator[Any]:
    """A rich Progress, started and stopped. A terminal that is gone by the end (SIGHUP:
    the user closed it) is no error: stopping the bar would fail to draw its last frame,
    and that failure must not replace how the command really ended."""
    progress.start()
    try:
        yield progress
    finally:
        stop_quietly(progress)


def stop_quietly(progress: Any) -> None:
    """progress.stop(), ignoring a terminal that is gone (see showing)."""
    try:
        progress.stop()
    except OSError:
        pass
