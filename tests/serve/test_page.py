"""The demo page at ``/``: served from the package, nothing fetched from elsewhere, and driven in a real browser
(headless Chromium over the DevTools protocol) against a running server: an upload, the answer with a bar per
option, the mapping shifts' agreement and the latency, and a refusal shown with the service's own message.

The browser test is skipped, saying why, where Chromium is absent (Debian: ``apt-get install chromium``; CI
installs it). ``HKD4VLM_PAGE_SCREENSHOT=docs/demo-page.png`` saves its screenshot there."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from hkd4vlm.serve import ServerThread, create_app  # noqa: E402
from hkd4vlm.serve.page import demo_page  # noqa: E402

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def test_the_page_is_served_at_the_root_and_needs_nothing_from_elsewhere(detector):
    html = demo_page()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html), "the page must work offline"
    assert not re.search(r"""\bimport\s*\(|@import|url\(\s*["']?https?:""", html)
    with ServerThread(create_app(detector, api_key="page-test-key")) as s:
        got = httpx.get(f"{s.url}/")  # the page needs no key: it holds no answer
        assert got.status_code == 200 and got.headers["content-type"].startswith("text/html")
        assert got.text == html
        assert httpx.get(f"{s.url}/v1/model").status_code == 401  # the API still does
        assert httpx.get(f"{s.url}/", headers={"Host": "evil.example"}).status_code == 400  # and the Host check holds


class DevTools:
    """A minimal Chrome DevTools protocol client over one page's websocket: ``send`` waits for its answer."""

    def __init__(self, ws):
        self.ws, self.next_id = ws, 0

    def send(self, method: str, timeout: float = 30, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def eval(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.eval(expression)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {expression}")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A headless Chromium with remote debugging; yields the DevTools websocket URL of its page."""
    binary = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if binary is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium); the page's browser test needs it")
    pytest.importorskip("websockets", reason="the browser test talks to Chromium through the 'websockets' package")
    profile = tmp_path_factory.mktemp("chromium")
    args = [
        binary,
        "--headless=new",
        "--no-sandbox",  # root in a container has no user namespaces for the sandbox
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--window-size=1000,1000",
        "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0",
        f"--user-data-dir={profile}",
        "about:blank",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None:
                pytest.fail(f"Chromium exited ({proc.returncode}): {proc.stderr.read()[-2000:]}")
            assert time.monotonic() < deadline, "Chromium did not open its DevTools port"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as r:
            pages = [t for t in json.load(r) if t["type"] == "page"]
        yield pages[0]["webSocketDebuggerUrl"]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow  # starts Chromium: a few seconds
def test_the_page_checks_an_upload_in_a_real_browser(browser, detector, hall, tmp_path):
    r = hall.records[0]
    image = hall.image_path(r)
    with ServerThread(create_app(detector)) as server:
        want = httpx.post(
            f"{server.url}/v1/hallucination",
            files={"image": image.read_bytes()},
            data={"caption": r.system1_answer, "options": r.options},
            timeout=60,
        ).json()
        from websockets.sync.client import connect

        with connect(browser, max_size=None, open_timeout=30) as ws:
            page = DevTools(ws)
            page.send("Page.enable")
            page.send("Page.navigate", url=f"{server.url}/")
            page.wait_for("document.readyState === 'complete' && !!document.getElementById('check')")

            # a refusal shows the service's own message: a fact check without a claim
            page.eval("document.querySelector('input[value=factuality]').click()")
            assert page.eval("getComputedStyle(document.getElementById('factuality-fields')).display") != "none"
            _upload(page, image)
            page.eval("document.getElementById('context').value = 'Tom drew the red shapes.'")
            page.eval("document.getElementById('check').click()")
            error = page.wait_for(
                "document.getElementById('error').offsetParent && document.getElementById('error').textContent"
            )
            assert "422" in error and "field 'claim'" in error, error

            # an answer: the same prediction and probabilities as the API gives, a bar per option
            page.eval("document.querySelector('input[value=hallucination]').click()")
            page.eval(f"document.getElementById('caption').value = {json.dumps(r.system1_answer)}")
            page.eval(f"document.getElementById('options').value = {json.dumps(chr(10).join(r.options))}")
            page.eval("document.getElementById('check').click()")
            page.wait_for("document.getElementById('result').offsetParent !== null")
            shown = page.eval(
                """(() => ({
                answer: document.getElementById('answer').textContent,
                error: document.getElementById('error').offsetParent !== null,
                bars: [...document.querySelectorAll('.bar-row')].map(row => ({
                    letter: row.querySelector('.bar-label').textContent,
                    width: parseFloat(row.querySelector('.bar > span').style.width),
                    text: row.querySelector('.bar-text').textContent,
                    chosen: row.classList.contains('chosen')})),
                agreement: document.getElementById('agreement').textContent,
                shifts: document.getElementById('shifts').textContent,
                latency: document.getElementById('latency').textContent,
                elsewhere: performance.getEntriesByType('resource').map(e => e.name)
                    .filter(u => !u.startsWith(location.origin) && !u.startsWith('blob:')),
            }))()"""
            )
            pred = want["prediction"]
            assert shown["answer"] == f"{pred['letter']}: {pred['option']}" and not shown["error"]
            assert [b["text"] for b in shown["bars"]] == r.options
            assert [b["letter"] for b in shown["bars"]] == ["A", "B", "C", "D"][: len(r.options)]
            assert [b["width"] for b in shown["bars"]] == pytest.approx(
                [100 * p for p in want["probabilities"]], abs=0.06
            )
            assert [b["chosen"] for b in shown["bars"]] == [i == pred["index"] for i in range(len(r.options))]
            assert shown["agreement"] == f"{100 * want['agreement']:.0f} %" and shown["shifts"] == str(want["shifts"])
            assert re.fullmatch(r"\d+ ms", shown["latency"]), shown["latency"]
            assert shown["elsewhere"] == [], "the page fetched something from another origin"
            _screenshot(page, tmp_path / "demo-page.png")


def _upload(page: DevTools, path: Path) -> None:
    """Choose ``path`` in the page's file input, as a user would (change event included)."""
    root = page.send("DOM.getDocument")["root"]["nodeId"]
    node = page.send("DOM.querySelector", nodeId=root, selector="#image")["nodeId"]
    page.send("DOM.setFileInputFiles", files=[str(path)], nodeId=node)
    page.wait_for("document.getElementById('image').files.length === 1")


def _screenshot(page: DevTools, path: Path) -> None:
    import base64

    data = base64.b64decode(page.send("Page.captureScreenshot", format="png")["data"])
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    path.write_bytes(data)
    target = os.environ.get("HKD4VLM_PAGE_SCREENSHOT")
    if target:
        Path(target).write_bytes(data)
