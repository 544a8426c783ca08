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
a photo's metadata and its new key in the database. A stop that comes meanwhile is raised
when the work is done, so what a stopped run reports is what it stored, and the database
knows every photo it changed. A second stop meanwhile is raised at once, and so is the
first after HOLD_LIMIT seconds: work that hangs (an exiftool that the same Ctrl-C killed,
a full pipe) must not keep the process from stopping, and `docker stop` kills after 10 s.
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
HOLD_LIMIT = 5.0  # seconds a stop waits for held work before it is raised anyway

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


def forget_reported_stop() -> None:
    """Start a command with no stop reported (exit_status), so end_like_the_signal acts
    only on this one's."""
    global _reported
    _reported = None


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
    if previous and hasattr(signal, "setitimer"):  # the limit on a held stop (POSIX)
        previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, _held_too_long)
    try:
        yield
    finally:
        if hasattr(signal, "SIGALRM") and signal.SIGALRM in previous:
            _set_limit(0)
        for number, handler in previous.items():
            signal.signal(number, handler)


def _stop(signum: int, frame: Any) -> None:
    global _held
    if _holding and _held is None:  # the first stop waits; a second one (the user insists) does not
        _held = signum
        _set_limit(HOLD_LIMIT)
        return
    raise Stopped(signum)


def _held_too_long(signum: int, frame: Any) -> None:
    global _held
    if _held is not None:
        held, _held = _held, None
        raise Stopped(held)


def _set_limit(seconds: float) -> None:
    if hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread():
        signal.setitimer(signal.ITIMER_REAL, seconds)


@contextmanager
def stops_held(summary: Any = None) -> Iterator[None]:
    """Hold a stop signal (one handled by signals_stop_like_ctrl_c) until the block is done,
    then raise Stopped(signum, summary). A second signal meanwhile is raised at once, the
    first after HOLD_LIMIT seconds. For work that must not be cut in two: a batch's commit
    and its counting, a photo's metadata and its new key, the runs row's last update. An
    error in the block goes on as it is (a held stop is then dropped: the command is ending
    anyway). Used in the main thread."""
    global _holding, _held
    if threading.current_thread() is not threading.main_thread():  # signals only ever reach the main thread
        yield
        return
    _holding += 1
    try:
        yield
    except BaseException:
        _holding -= 1
        if not _holding and _held is not None:
            _held = None
            _set_limit(0)
        raise
    _holding -= 1
    if not _holding and _held is not None:
        signum, _held = _held, None
        _set_limit(0)
        raise Stopped(signum, summary)
