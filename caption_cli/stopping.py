"""Stopping a long command cleanly: SIGTERM and SIGHUP take the path Ctrl-C takes.

A service manager (systemd, `docker stop`, `kill`) asks a process to stop with SIGTERM, and
a terminal that closes sends SIGHUP. By default either ends Python on the spot: the batch
being stored is rolled back by SQLite, but the run's row in the database never gets its end
time and counts, and nothing says how far the run got. Inside `signals_stop_like_ctrl_c()`
both raise `Stopped`, a KeyboardInterrupt, in the main thread instead, so the code that
already handles Ctrl-C (finish the runs row, shut the decode workers down, print what was
done) handles them too. A SIGHUP that is ignored on purpose (`nohup`) stays ignored.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

STOP_SIGNALS = ("SIGTERM", "SIGHUP")


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
    """The shell's convention for a process stopped by a signal: 128 + its number (130 for Ctrl-C)."""
    return 128 + int(stop_signal(interrupt))


@contextmanager
def signals_stop_like_ctrl_c() -> Iterator[None]:
    """While inside, SIGTERM and SIGHUP raise Stopped in the main thread; the previous
    handlers come back on the way out. Outside the main thread (where Python cannot set a
    handler) and for signals this platform lacks, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise Stopped(signum)

    previous = {}
    for name in STOP_SIGNALS:
        number = getattr(signal, name, None)
        if number is None or signal.getsignal(number) == signal.SIG_IGN:  # nohup ignores SIGHUP: keep it so
            continue
        previous[number] = signal.signal(number, stop)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
