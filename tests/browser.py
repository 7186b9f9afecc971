"""A small Chrome DevTools Protocol client for tests: load a page in headless Chromium, collect
its errors, check its images, take a full-page screenshot.

Chromium is started with ``--remote-debugging-port=0`` (it picks a free port and writes it to
``<user-data-dir>/DevToolsActivePort``); the client speaks CDP over the browser's websocket
(aiohttp) with flattened sessions: one page target, ``Runtime``/``Log``/``Page`` enabled.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")

# Every <img> complete and decoded (naturalWidth > 0); returns the sources of those that are not.
BROKEN_IMAGES_JS = """
Promise.all(Array.from(document.images).map(function (img) {
  return (img.decode ? img.decode() : Promise.resolve()).catch(function () { return null; });
})).then(function () {
  return Array.from(document.images).filter(function (img) { return !(img.complete && img.naturalWidth > 0); })
    .map(function (img) { return (img.getAttribute('src') || '').slice(0, 80); });
})
"""


def find_chromium() -> str | None:
    """The Chromium executable on PATH, or None."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageCheck:
    """What loading a page produced: ``errors`` (uncaught exceptions, console errors, error log
    entries, undecoded images; one line each), ``evaluated`` (the values of the expressions asked
    for) and the screenshot path when one was taken."""

    errors: list[str] = field(default_factory=list)
    evaluated: dict[str, object] = field(default_factory=dict)
    screenshot: Path | None = None


class _Session:
    """Commands and events over one websocket; ``session_id`` routes them to the page target."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.next_id = 0
        self.pending: dict[int, asyncio.Future] = {}
        self.events: list[dict] = []
        self.event_signal = asyncio.Event()
        self.session_id: str | None = None
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if "id" in data and data["id"] in self.pending:
                self.pending.pop(data["id"]).set_result(data)
            elif "method" in data:
                self.events.append(data)
                self.event_signal.set()
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError("the browser closed the DevTools connection"))

    async def send(self, method: str, params: dict | None = None, *, browser: bool = False, timeout: float = 30) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if self.session_id and not browser:
            msg["sessionId"] = self.session_id
        fut = asyncio.get_running_loop().create_future()
        self.pending[self.next_id] = fut
        await self.ws.send_str(json.dumps(msg))
        reply = await asyncio.wait_for(fut, timeout)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    async def wait_event(self, method: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for ev in self.events[seen:]:
                if ev["method"] == method and ev.get("sessionId") == self.session_id:
                    return ev
            seen = len(self.events)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {method} within {timeout} s")
            self.event_signal.clear()
            try:
                await asyncio.wait_for(self.event_signal.wait(), left)
            except asyncio.TimeoutError:
                pass


def _errors(events: list[dict]) -> list[str]:
    """The error lines among CDP events."""
    out = []
    for ev in events:
        p = ev.get("params", {})
        if ev["method"] == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            out.append("exception: " + (d.get("exception", {}).get("description") or d.get("text", "")))
        elif ev["method"] == "Runtime.consoleAPICalled" and p.get("type") == "error":
            out.append("console.error: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
        elif ev["method"] == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            e = p["entry"]
            out.append(f"log ({e.get('source')}): {e.get('text')} {e.get('url', '')}".strip())
    return out


async def _check(port: int, url: str, expressions: dict[str, str], screenshot: Path | None, width: int) -> PageCheck:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/json/version") as r:
            ws_url = (await r.json())["webSocketDebuggerUrl"]
        async with http.ws_connect(ws_url, max_msg_size=0) as ws:
            s = _Session(ws)
            target = await s.send("Target.createTarget", {"url": "about:blank"}, browser=True)
            attached = await s.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}, browser=True)
            s.session_id = attached["sessionId"]
            for domain in ("Runtime", "Log", "Page"):
                await s.send(f"{domain}.enable")
            await s.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": 900, "deviceScaleFactor": 1,
                                                               "mobile": False})
            start = len(s.events)
            nav = await s.send("Page.navigate", {"url": url})
            if nav.get("errorText"):
                raise RuntimeError(f"navigation to {url} failed: {nav['errorText']}")
            await s.wait_event("Page.loadEventFired")
            broken = await s.send("Runtime.evaluate", {"expression": BROKEN_IMAGES_JS, "awaitPromise": True,
                                                       "returnByValue": True})
            check = PageCheck()
            if screenshot is not None:  # before the expressions, which may change the page
                metrics = await s.send("Page.getLayoutMetrics")
                size = metrics.get("cssContentSize") or metrics["contentSize"]
                clip = {"x": 0, "y": 0, "width": width, "height": min(float(size["height"]), 16000.0), "scale": 1}
                shot = await s.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                                "clip": clip}, timeout=60)
                screenshot.parent.mkdir(parents=True, exist_ok=True)
                screenshot.write_bytes(base64.b64decode(shot["data"]))
                check.screenshot = screenshot
            for name, expr in expressions.items():
                res = await s.send("Runtime.evaluate", {"expression": expr, "returnByValue": True})
                check.evaluated[name] = res.get("result", {}).get("value")
            await asyncio.sleep(0.2)  # let late console/log events arrive
            check.errors = _errors(s.events[start:]) + [f"image not decoded: {src}" for src in
                                                         broken.get("result", {}).get("value") or []]
            try:
                await s.send("Browser.close", browser=True, timeout=5)
            except (RuntimeError, ConnectionError, asyncio.TimeoutError):
                pass
            s.reader.cancel()
            return check


def check_page(path: Path, *, expressions: dict[str, str] | None = None, screenshot: Path | None = None,
               width: int = 1280, chromium: str | None = None, timeout: float = 60) -> PageCheck:
    """Load ``path`` (a local HTML file) in a fresh headless Chromium and report its errors.

    ``expressions``: name -> JavaScript expression evaluated after the load event (JSON values
    come back in ``evaluated``). ``screenshot``: write a full-page PNG there (``width`` CSS
    pixels wide). Raises FileNotFoundError without Chromium."""
    exe = chromium or find_chromium()
    if exe is None:
        raise FileNotFoundError("chromium not found on PATH")
    profile = Path(tempfile.mkdtemp(prefix="segpipe-chromium-"))
    log = tempfile.TemporaryFile()  # chromium's own stderr (a pipe could fill up and stall it)
    proc = subprocess.Popen([exe, "--headless", "--remote-debugging-port=0", f"--user-data-dir={profile}", "--no-sandbox",
                             "--disable-gpu", "--no-first-run", "--no-default-browser-check", "--mute-audio",
                             "about:blank"], stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not (port_file.is_file() and port_file.read_text().strip()):
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"chromium exited with {proc.returncode}: {log.read().decode(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"chromium wrote no DevToolsActivePort within {timeout} s")
            time.sleep(0.05)
        port = int(port_file.read_text().splitlines()[0])
        return asyncio.run(asyncio.wait_for(_check(port, path.resolve().as_uri(), expressions or {}, screenshot, width),
                                            timeout))
    finally:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)  # the group of the browser this call started
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
        shutil.rmtree(profile, ignore_errors=True)
