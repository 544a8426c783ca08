"""The gallery in a real browser: captions render, a clicked word shows its heat-map,
the search filter hides what does not match. A screenshot goes to test-artifacts/.

Chromium is driven over the DevTools protocol on a pipe (--remote-debugging-pipe:
JSON messages ending in NUL on file descriptors 3 and 4), so the test needs no
websocket library and opens no port. The test set-up installs Debian's chromium; in
CI (env CI set) a missing browser is a failure, locally the test skips.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from caption_cli.report import build_report
from caption_cli.store import Store
from tests.test_report import make_library

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--no-default-browser-check",
    "--window-size=1280,1000",
    "--remote-debugging-pipe",
]


def find_chromium() -> str:
    for candidate in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and (found := shutil.which(candidate)):
            return found
    if os.environ.get("CI"):
        pytest.fail(
            "chromium is not installed; the CI set-up must install it (apt-get install chromium)"
        )
    pytest.skip("chromium is not installed (apt-get install chromium)")


class Browser:
    """Just enough of the DevTools protocol: one page, evaluate, mouse, keyboard, screenshot."""

    def __init__(self, executable: str, profile: Path) -> None:
        to_browser_read, self._write_fd = os.pipe()
        self._read_fd, from_browser_write = os.pipe()

        def wire_pipes() -> None:  # in the child: fd 3 = commands in, fd 4 = replies out
            high_in = fcntl.fcntl(
                to_browser_read, fcntl.F_DUPFD, 10
            )  # out of the way of 3 and 4 first
            high_out = fcntl.fcntl(from_browser_write, fcntl.F_DUPFD, 10)
            os.dup2(high_in, 3)
            os.dup2(high_out, 4)

        self.process = subprocess.Popen(
            [executable, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=wire_pipes,
            close_fds=False,  # our own pipe ends are close-on-exec (PEP 446)
        )
        os.close(to_browser_read)
        os.close(from_browser_write)
        self._next_id = 0
        self._buffer = b""
        self.session: str | None = None

    def send(
        self, method: str, params: dict[str, Any] | None = None, timeout: float = 30.0
    ) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if self.session and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self.session
        os.write(self._write_fd, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._read_fd], [], [], left)[0]:
                raise TimeoutError("chromium did not answer")
            chunk = os.read(self._read_fd, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium exited (code {self.process.poll()})")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", {"url": url})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]

    def evaluate(self, expression: str) -> Any:
        result = self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression)
            except AssertionError:
                value = None
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"never true: {expression}")

    def click(self, selector: str) -> None:
        """A real mouse click at the centre of the element (not element.click())."""
        box = self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.scrollIntoView({{block: 'center'}});"
            " const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        x, y = box
        self.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})
        for kind in ("mousePressed", "mouseReleased"):
            self.send(
                "Input.dispatchMouseEvent",
                {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1},
            )

    def type_text(self, text: str) -> None:
        self.send("Input.insertText", {"text": text})

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(
            base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"})["data"])
        )

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._write_fd)
        os.close(self._read_fd)


@pytest.fixture()
def browser(tmp_path: Path):
    executable = find_chromium()
    instance = Browser(executable, tmp_path / "profile")
    yield instance
    instance.close()


@pytest.fixture()
def report_url(tmp_path: Path) -> str:
    db = make_library(
        tmp_path, extra=3
    )  # 7 photos on 2 pages of 4: exercises the nav and cross-page search
    with Store(db) as store:
        build_report(store, tmp_path / "report", page_size=4)
    return (tmp_path / "report" / "index.html").as_uri()


CARDS = "Array.from(document.querySelectorAll('#gallery .card'))"
VISIBLE = (
    f"{CARDS}.filter(c => !c.hidden).map(c => c.querySelector('.path').title.split('/').pop())"
)


def heat_alpha(card: str, fx: float, fy: float) -> str:
    """JS: the heat-map canvas' alpha at a fraction (fx, fy) of its size."""
    return (
        f"(() => {{ const c = document.querySelector({json.dumps(card)} + ' canvas.heat');"
        f" const x = Math.floor(c.width * {fx}), y = Math.floor(c.height * {fy});"
        " return c.getContext('2d').getImageData(x, y, 1, 1).data[3]; })()"
    )


def test_gallery_heatmap_and_search_in_chromium(browser: Browser, report_url: str) -> None:
    browser.open(report_url)
    browser.wait_for("document.body && document.body.dataset.ready === 'true'")
    browser.wait_for("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")

    # Sorted by path, four per page: broken, car, dog, evil... on page 1.
    captions = browser.evaluate(
        "Array.from(document.querySelectorAll('.card .caption')).map(p => p.textContent)"
    )
    assert captions == [
        "a red car parked on a street",
        "a dog runs on the grass",
        '<script>alert("x")</script> & <b>',
    ]
    assert (
        browser.evaluate("document.querySelector('.card.error .error').textContent")
        == "cannot identify image file <broken.jpg>"
    )
    assert browser.evaluate("!document.querySelector('#gallery script, #gallery b')")

    # Clicking "dog" pins its heat-map: hot top-left, where the fixture's attention looked.
    dog_card = ".card[data-text*='a dog runs']"
    assert browser.evaluate(
        f"document.querySelector({json.dumps(dog_card)} + ' canvas.heat').hidden"
    )
    browser.click(f"{dog_card} .word[data-word='1']")
    assert (
        browser.evaluate(
            f"document.querySelector({json.dumps(dog_card)} + ' .word[data-word=\"1\"]').getAttribute('aria-pressed')"
        )
        == "true"
    )
    assert (
        browser.evaluate(
            f"getComputedStyle(document.querySelector({json.dumps(dog_card)} + ' canvas.heat')).display"
        )
        != "none"
    )
    hot, cold = (
        browser.evaluate(heat_alpha(dog_card, 0.05, 0.05)),
        browser.evaluate(heat_alpha(dog_card, 0.95, 0.95)),
    )
    assert hot > 180 and cold < 100, (hot, cold)
    # The pinned map stays when the mouse moves away; another word's map follows the mouse.
    browser.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": 5, "y": 5})
    assert browser.evaluate(heat_alpha(dog_card, 0.05, 0.05)) > 180
    # The canvas lies exactly over the thumbnail.
    assert browser.evaluate(
        f"(() => {{ const f = document.querySelector({json.dumps(dog_card)} + ' .frame');"
        " const a = f.querySelector('img').getBoundingClientRect(), b = f.querySelector('canvas').getBoundingClientRect();"
        " return Math.abs(a.x - b.x) < 1 && Math.abs(a.y - b.y) < 1 && Math.abs(a.width - b.width) < 1 && Math.abs(a.height - b.height) < 1; })()"
    )
    ARTIFACTS.mkdir(exist_ok=True)
    browser.screenshot(ARTIFACTS / "report-heatmap.png")

    # Search: typing filters the cards on this page and points to matches on page 2.
    browser.click("#q")
    browser.type_text("red car")
    browser.wait_for(f"{VISIBLE}.length === 1")
    assert browser.evaluate(VISIBLE) == ["car.jpg"]
    assert browser.evaluate("document.getElementById('count').value") == "1 of 4 on this page"
    browser.evaluate(
        "document.getElementById('q').value = 'photo number'; document.getElementById('q').dispatchEvent(new Event('input'))"
    )
    assert browser.evaluate(VISIBLE) == []
    assert (
        browser.evaluate("document.getElementById('elsewhere').textContent")
        == "Also on other pages: page 2 (3)"
    )
    assert (
        browser.evaluate("document.querySelector('#elsewhere a').getAttribute('href')")
        == "page-2.html#q=photo+number"
    )

    # Status filter: failed files only.
    browser.evaluate(
        "document.getElementById('q').value = ''; const s = document.getElementById('status'); s.value = 'error'; s.dispatchEvent(new Event('change'))"
    )
    assert browser.evaluate(VISIBLE) == ["broken.jpg"]
    browser.screenshot(ARTIFACTS / "report-filtered.png")

    # Following a page link keeps the filter (it travels in the URL hash).
    browser.click("nav.pages a[rel=next]")
    browser.wait_for(
        "location.pathname.endsWith('page-2.html') && document.body.dataset.ready === 'true'"
    )
    assert browser.evaluate("document.getElementById('status').value") == "error"
    assert browser.evaluate(VISIBLE) == []
