"""caption_cli.watch: events and rescans into annotate batches (a fake captioner, real files)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from caption_cli.pipeline import AnnotateOptions
from caption_cli.store import Store
from caption_cli.watch import Settler, WatchOptions, WatchTotals, watch
from tests.conftest import sigint_as_in_a_terminal
from tests.test_cli_annotate import _count_ok, _env, launcher  # noqa: F401 - fixture
from tests.test_pipeline import FakeCaptioner, make_photos

FAST = WatchOptions(settle=0.3, rescan=0, tick=0.05)


def unique_png(path: Path, index: int, size: int = 8) -> None:
    """A tiny photo with bytes no other index has (so no caption is reused)."""
    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[0, 0] = (index % 256, index // 256 % 256, 200)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def wait_for(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


class Watching:
    """watch() on a thread, with its own store connection, stopped on exit."""

    def __init__(self, root: Path, db: Path, captioner: FakeCaptioner, options: WatchOptions = FAST):
        self.stop = threading.Event()
        self.totals = WatchTotals()
        self.scans: list[bool] = []
        self.error: BaseException | None = None

        def run() -> None:
            try:
                with Store(db) as store:
                    watch([root], captioner, store, AnnotateOptions(workers=0, batch_size=16), options,
                          stop=self.stop, totals=self.totals, on_batch=lambda s, full: self.scans.append(full))
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)

    def __enter__(self) -> Watching:
        self.thread.start()
        wait_for(lambda: bool(self.scans) or self.error is not None)  # the catch-up scan is done
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive(), "watch did not stop"
        assert self.error is None, self.error


def rows(db: Path) -> dict[str, dict]:
    with Store(db) as store:
        return {row["path"]: row for row in store.iter_images()}


def test_settler_waits_until_a_file_holds_still(tmp_path: Path):
    now = [0.0]
    settler = Settler(settle=1.0, clock=lambda: now[0])
    growing = tmp_path / "a.jpg"
    growing.write_bytes(b"x")
    settler.saw(growing)
    now[0] = 0.9
    assert settler.ready(10) == []
    growing.write_bytes(b"xy")  # still being copied: the quiet period starts again
    now[0] = 1.5
    assert settler.ready(10) == []
    now[0] = 2.4
    assert settler.ready(10) == []
    now[0] = 2.6
    assert settler.ready(10) == [growing] and len(settler) == 0
    settler.saw(tmp_path / "vanished.jpg")  # a temporary name that is gone again
    now[0] = 9.0
    assert settler.ready(10) == [] and len(settler) == 0


def test_catch_up_then_new_changed_and_deleted_photos(tmp_path: Path):
    root, db = tmp_path / "photos", tmp_path / "captions.db"
    make_photos(root, 3)
    captioner = FakeCaptioner()
    with Watching(root, db, captioner) as watching:
        assert len(rows(db)) == 3 and watching.scans == [True]
        unique_png(root / "new" / "fresh.png", 1)
        wait_for(lambda: str(root / "new" / "fresh.png") in rows(db))
        (root / "a" / "p001.png").unlink()
        wait_for(lambda: rows(db)[str(root / "a" / "p001.png")]["missing_since"] is not None)
        (root / "notes.txt").write_text("not a photo")  # filtered out
        (root / ".hidden.png").write_bytes((root / "b" / "p000.png").read_bytes())
        time.sleep(0.6)
    assert set(rows(db)) == {str(p) for p in [root / "a" / "p001.png", root / "b" / "p000.png",
                                               root / "b" / "p002.png", root / "new" / "fresh.png"]}
    assert sum(captioner.batches) == 4 and watching.totals.captioned == 4
    assert watching.totals.missing == 1 and watching.totals.ok


def test_a_photo_that_arrives_as_the_catch_up_scan_ends_is_not_left_for_a_rescan(tmp_path: Path):
    root, db = tmp_path / "photos", tmp_path / "captions.db"
    make_photos(root, 2)
    late = root / "late.png"
    stop, errors = threading.Event(), []

    def arrives_after_the_scan(summary, full: bool) -> None:
        if full and not late.exists():
            unique_png(late, 7)  # the moment the catch-up scan is stored

    def run() -> None:
        try:
            with Store(db) as store:  # FAST: no rescans, so only the watcher can find it
                watch([root], FakeCaptioner(), store, AnnotateOptions(workers=0), FAST, stop=stop,
                      on_batch=arrives_after_the_scan)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: str(late) in rows(db) or bool(errors), timeout=20.0)
    finally:
        stop.set()
        thread.join(30)
    assert errors == [] and rows(db)[str(late)]["status"] == "ok"


def test_a_photo_being_copied_is_captioned_once_when_complete(tmp_path: Path):
    root, db = tmp_path / "photos", tmp_path / "captions.db"
    root.mkdir()
    source = tmp_path / "source.jpg"
    Image.new("RGB", (64, 48), (30, 30, 220)).save(source, quality=95)
    data = source.read_bytes()
    captioner = FakeCaptioner()
    with Watching(root, db, captioner, WatchOptions(settle=0.5, rescan=0, tick=0.05)):
        target = root / "copied.jpg"
        with open(target, "wb") as out:  # a slow copy: chunks with pauses shorter than settle
            for start in range(0, len(data), len(data) // 4 + 1):
                out.write(data[start:start + len(data) // 4 + 1])
                out.flush()
                time.sleep(0.2)
        wait_for(lambda: str(target) in rows(db))
        time.sleep(0.7)
    row = rows(db)[str(target)]
    assert row["status"] == "ok" and row["caption"] == "a blue square" and row["size"] == len(data)
    assert sum(captioner.batches) == 1  # read once, after it was complete


def test_a_burst_of_ten_thousand_photos(tmp_path: Path):
    root, db = tmp_path / "photos", tmp_path / "captions.db"
    root.mkdir()
    captioner = FakeCaptioner()
    count = 10_000
    with Watching(root, db, captioner, WatchOptions(settle=0.3, rescan=0, tick=0.1, max_batch=2000)):
        for index in range(count):
            unique_png(root / f"d{index // 1000}" / f"{index:05d}.png", index, size=4)
        wait_for(lambda: _count_ok(db) == count, timeout=300)
    stored = rows(db)
    assert len(stored) == count and all(row["status"] == "ok" for row in stored.values())
    assert sum(captioner.batches) == count  # each captioned exactly once


def test_polling_and_a_periodic_rescan_find_what_events_missed(tmp_path: Path):
    root, db = tmp_path / "photos", tmp_path / "captions.db"
    make_photos(root, 2)
    polled = WatchOptions(settle=0.2, rescan=0.5, tick=0.05, poll=True)
    with Watching(root, db, FakeCaptioner(), polled) as watching:
        unique_png(root / "polled.png", 7)
        wait_for(lambda: str(root / "polled.png") in rows(db))
        wait_for(lambda: watching.scans.count(True) >= 2)  # a rescan ran after the first one
    assert watching.totals.rescans >= 2


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_cli_watch_stops_cleanly_on_ctrl_c_and_on_sigterm(launcher: Path, tmp_path: Path, signum: int):
    root, db = tmp_path / "photos", tmp_path / "captions.db"
    make_photos(root, 2)
    process = subprocess.Popen(
        [sys.executable, str(launcher), "watch", str(root), "--db", str(db), "--settle", "0.2", "--workers", "0"],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_as_in_a_terminal,
    )
    try:
        wait_for(lambda: _count_ok(db) == 2 or process.poll() is not None)
        unique_png(root / "later.png", 3)
        wait_for(lambda: _count_ok(db) == 3 or process.poll() is not None)
        assert process.poll() is None
        process.send_signal(signum)  # SIGTERM: a service manager's stop
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert "Traceback" not in err and "Stopped. In 2 batch(es): captioned 3, reused 0, failed 0" in err
    assert "[" in out and "scan] Captioned 2, reused 0" in out and "new] Captioned 1," in out
    with sqlite3.connect(db) as conn:  # every run the watch made is closed, also after a SIGTERM
        assert conn.execute("select count(*) from runs where finished_at is null").fetchone() == (0,)
