"""Stopping a long command cleanly: SIGTERM and SIGHUP take the path Ctrl-C takes.

A service manager (systemd, `docker stop`, `kill`) asks a process to stop with SIGTERM, and
a terminal that closes sends SIGHUP. By default either ends Python on the spot: the batch
being stored is rolled back by SQLite, but the run's row in the database never gets its end
time and counts, and nothing says how far the run got. Inside `signals_stop_like_ctrl_c()`
both, and Ctrl-C's SIGINT, raise `Stopped`, a KeyboardInterrupt, in the main thread instead,
so the code that already handles Ctrl-C (finish the runs row, shut the decode workers down,
print what was done) handles them all. A signal that is ignored on purpose (`nohup` ignores
SIGHUP, a background job SIGINT) stays ignored.

`stops_held()` marks work that must not be cut in two: a batch's commit and its counting,
photos' metadata and their new keys in the database. A stop that comes meanwhile is raised
when the work is done, so what a stopped run reports is what it stored, and the database
knows every photo it changed; a second stop meanwhile is raised at once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")

_holding = 0  # stops_held() blocks entered and not yet left (main thread only)
_held: int | None = None  # a stop signal that came while holding
_reported: int | None = None  # the signal a command reported stopping for (exit_status)


class Stopped(KeyboardInterrupt):
    """A stop asked for by a signal (signum); `summary` is what the run had done by then, when
    the code it passed through knew (caption_cli.pipeline.annotate fills it)."""

    def __init__(self, signum: int, summary: Any = None) -> None:
        super().__init__(signal_name(signum))
        self.signum = signum
        self.summary = summary


def signal_name(signum: int) -> str:
    """How a stop is named to the user: "Ctrl-C" for SIGINT, else the signal's name."""
    if signum == signal.SIGINT:
        return "Ctrl-C"
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def stop_signal(interrupt: KeyboardInterrupt) -> int:
    """The signal behind a KeyboardInterrupt: Stopped's, else SIGINT (a plain Ctrl-C)."""
    return getattr(interrupt, "signum", signal.SIGINT)


def exit_status(interrupt: KeyboardInterrupt) -> int:
    """The shell's convention for a process stopped by a signal: 128 + its number (130 for
    Ctrl-C). Also remembers the signal, so that end_like_the_signal() can end the process
    with it once the command has cleaned up."""
    global _reported
    _reported = int(stop_signal(interrupt))
    return 128 + _reported


def end_like_the_signal() -> None:
    """If a command reported a stop by a signal, end this process by that signal, as its
    default action would have, instead of with exit status 128 + n. A shell tells the two
    apart: bash ends a script's loop when a command in it dies of SIGINT, but runs on after
    one that merely exited 130; a service manager counts a death by SIGTERM as a clean stop.
    Called by the `caption-cli` entry point after everything is cleaned up (not by tests
    that run commands in their own process)."""
    global _reported
    signum, _reported = _reported, None
    if signum is None or not hasattr(signal, "pthread_sigmask"):  # nothing to do, or not POSIX
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a terminal that is gone, a closed stream
            pass
    signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})
    os.kill(os.getpid(), signum)


@contextmanager
def signals_stop_like_ctrl_c() -> Iterator[None]:
    """While inside, SIGINT, SIGTERM and SIGHUP raise Stopped in the main thread (later, if
    it is inside stops_held); the previous handlers come back on the way out. Outside the
    main thread (where Python cannot set a handler) and for signals this platform lacks,
    nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for name in STOP_SIGNALS:
        number = getattr(signal, name, None)
        if number is None or signal.getsignal(number) == signal.SIG_IGN:  # nohup ignores SIGHUP: keep it so
            continue
        previous[number] = signal.signal(number, _stop)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _stop(signum: int, frame: Any) -> None:
    global _held
    if _holding and _held is None:  # the first stop waits; a second one (the user insists) does not
        _held = signum
        return
    raise Stopped(signum)


@contextmanager
def stops_held(summary: Any = None) -> Iterator[None]:
    """Hold a stop signal (one handled by signals_stop_like_ctrl_c) until the block is done,
    then raise Stopped(signum, summary); a second signal meanwhile is raised at once. For
    work that must not be cut in two: a batch's commit and its counting, metadata writes and
    the new keys they give, the runs row's last update. Used in the main thread."""
    global _holding, _held
    if threading.current_thread() is not threading.main_thread():  # signals only ever reach the main thread
        yield
        return
    _holding += 1
    try:
        yield
    finally:
        _holding -= 1
        if not _holding and _held is not None:
            signum, _held = _held, None
            raise Stopped(signum, summary)
