"""caption_cli.stopping: SIGTERM and SIGHUP raise Stopped as Ctrl-C raises KeyboardInterrupt,
only inside the context, and never where the signal is ignored on purpose (nohup)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import pytest

from caption_cli.stopping import (
    Stopped,
    exit_status,
    signal_name,
    signals_stop_like_ctrl_c,
    stop_signal,
    stops_held,
)

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals (SIGHUP, kill to oneself)")


def _deliver(number: int) -> None:
    """Send a signal to this process and give Python the moments it needs to run the handler."""
    os.kill(os.getpid(), number)
    for _ in range(200):
        time.sleep(0.005)


@pytest.fixture
def default_handler():
    """Each stop signal at its default for the test (a run under nohup inherits SIGHUP ignored)."""
    saved = {n: signal.signal(n, signal.SIG_DFL) for n in (signal.SIGTERM, signal.SIGHUP)}
    saved[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    for number, handler in saved.items():
        signal.signal(number, handler)


@pytest.mark.parametrize("name, status, named", [("SIGTERM", 143, "SIGTERM"), ("SIGHUP", 129, "SIGHUP"),
                                                 ("SIGINT", 130, "Ctrl-C")])
def test_a_stop_signal_raises_stopped_inside_and_the_old_handler_comes_back(default_handler, name, status, named):
    number = getattr(signal, name)
    with pytest.raises(Stopped) as caught:
        with signals_stop_like_ctrl_c():
            _deliver(number)
    stopped = caught.value
    assert isinstance(stopped, KeyboardInterrupt)  # so every Ctrl-C handler handles it too
    assert stopped.signum == number and stop_signal(stopped) == number
    assert exit_status(stopped) == status and signal_name(number) == named and stopped.summary is None
    assert signal.getsignal(number) in (signal.SIG_DFL, signal.default_int_handler)


def test_a_stop_waits_for_the_end_of_a_held_block_and_carries_its_summary(default_handler):
    done = []
    with pytest.raises(Stopped) as caught:
        with signals_stop_like_ctrl_c():
            with stops_held(summary="counts"):
                _deliver(signal.SIGTERM)
                done.append("the rest of the block ran")
            done.append("never: the stop is raised as the block ends")
    assert done == ["the rest of the block ran"]
    assert caught.value.signum == signal.SIGTERM and caught.value.summary == "counts"
    with signals_stop_like_ctrl_c():
        with stops_held():  # nothing held from before
            pass


def test_a_second_stop_while_one_is_held_is_raised_at_once(default_handler):
    done = []
    with pytest.raises(Stopped) as caught:
        with signals_stop_like_ctrl_c():
            with stops_held(summary="counts"):
                _deliver(signal.SIGTERM)  # held
                done.append("held")
                _deliver(signal.SIGINT)  # the user insists: raised here
                done.append("never")
    assert done == ["held"] and caught.value.signum == signal.SIGINT  # the second one, at once


def test_a_held_stop_is_raised_anyway_after_the_hold_limit(default_handler, monkeypatch):
    monkeypatch.setattr("caption_cli.stopping.HOLD_LIMIT", 0.2)
    started = time.monotonic()
    with pytest.raises(Stopped) as caught:
        with signals_stop_like_ctrl_c():
            with stops_held(summary="counts"):
                _deliver(signal.SIGTERM)
                while time.monotonic() - started < 5:  # held work that hangs (a dead exiftool's pipe)
                    time.sleep(0.01)
    assert caught.value.signum == signal.SIGTERM and time.monotonic() - started < 2


def test_an_error_in_held_work_is_not_hidden_by_the_held_stop(default_handler):
    with signals_stop_like_ctrl_c():
        with pytest.raises(ValueError, match="disk full"):
            with stops_held():
                _deliver(signal.SIGTERM)
                raise ValueError("disk full")
        with stops_held():  # the dropped stop does not come back later
            time.sleep(0.05)


def test_a_sighup_ignored_by_nohup_stays_ignored(default_handler):
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    with signals_stop_like_ctrl_c():
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
        _deliver(signal.SIGHUP)  # nothing is raised
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN


def test_outside_the_main_thread_nothing_changes(default_handler):
    seen, errors = [], []

    def run() -> None:
        try:
            with signals_stop_like_ctrl_c():
                seen.append(signal.getsignal(signal.SIGTERM))
        except Exception as exc:  # noqa: BLE001 - the test reports it
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert errors == [] and seen == [signal.SIG_DFL]


def test_a_plain_ctrl_c_is_named_and_exits_130():
    assert stop_signal(KeyboardInterrupt()) == signal.SIGINT
    assert exit_status(KeyboardInterrupt()) == 130
    assert signal_name(signal.SIGINT) == "Ctrl-C" and str(Stopped(signal.SIGTERM)) == "SIGTERM"
