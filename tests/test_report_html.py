"""The HTML report opened in headless Chromium (Debian ``chromium``), driven over the DevTools
protocol on a pipe: the page renders, its charts exist and have size, it logs no console
message or exception and requests nothing but itself. Runs are real profiles of the demo's
model; the per-op rows follow the ``profile --per-op`` row format."""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import subprocess
import tempfile
import time

import pytest
from click.testing import CliRunner

from edgekit.cli import cli

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-pipe")
PROBLEMS = ("Runtime.consoleAPICalled", "Runtime.exceptionThrown", "Log.entryAdded")


class Browser:
    """Headless Chromium with a fresh profile, spoken to over --remote-debugging-pipe
    (fd 3: commands in, fd 4: replies and events out, JSON messages ending in NUL)."""

    def __init__(self, exe: str):
        self.profile = tempfile.mkdtemp(prefix="edgekit-chromium-")
        cmd_r, self._cmd_w = os.pipe()
        self._out_r, out_w = os.pipe()
        args = " ".join([exe, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"])
        self.proc = subprocess.Popen(["bash", "-c", f"exec {args} 3<&{cmd_r} 4>&{out_w}"],
                                     pass_fds=(cmd_r, out_w), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        os.close(cmd_r)
        os.close(out_w)
        self._buf, self._id, self.events = b"", 0, []

    def _read(self, timeout: float) -> dict:
        end = time.monotonic() + timeout
        while b"\0" not in self._buf:
            left = end - time.monotonic()
            if left <= 0 or not select.select([self._out_r], [], [], left)[0]:
                raise TimeoutError("no answer from chromium")
            chunk = os.read(self._out_r, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed its DevTools pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 60) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        while True:
            m = self._read(timeout)
            if m.get("id") == self._id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def load(self, url: str, probe: str) -> tuple[object, list[dict], list[str]]:
        """Open ``url`` in a new tab; the value of the JS expression ``probe`` after the load
        event, the console/exception/log events, and every URL the page requested."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        s = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})
        session = s["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable", session=session)
        self.events.clear()
        self.send("Page.navigate", {"url": url}, session=session)
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            self.events.append(self._read(60))
        value = self.send("Runtime.evaluate", {"expression": probe, "returnByValue": True},
                          session=session)["result"].get("value")
        events = [e for e in self.events if e.get("sessionId") == session]
        problems = [e for e in events if e.get("method") in PROBLEMS]
        urls = [e["params"]["request"]["url"] for e in events
                if e.get("method") == "Network.requestWillBeSent"]
        self.send("Target.closeTarget", {"targetId": target})
        return value, problems, urls

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, TimeoutError, OSError):
            self.send("Browser.close", timeout=10)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._cmd_w)
        os.close(self._out_r)
        shutil.rmtree(self.profile, ignore_errors=True)


PROBE = """JSON.stringify({
  title: document.title,
  charts: [...document.querySelectorAll('svg.chart')].map(s => [s.id,
      Math.round(s.getBoundingClientRect().width), Math.round(s.getBoundingClientRect().height)]),
  violins: document.querySelectorAll('#latency-chart g.violin').length,
  bars: document.querySelectorAll('svg[id^=per-op-chart] g.bar').length,
  comparison: document.querySelectorAll('#comparison tr').length,
  environment: document.querySelectorAll('#environment tr').length,
  ledger: !!document.getElementById('pass-ledger')})"""


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium); "
                    "the HTML report is not checked in a browser")
    b = Browser(CHROMIUM)
    yield b
    b.close()


def test_detector_sees_console_errors_and_network(browser, tmp_path):
    """The checks below can fail: a page with a console error, an exception and an external
    resource is caught."""
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><body><img src="http://127.0.0.1:9/x.png">'
                    '<script>console.error("boom"); missing_fn();</script></body></html>')
    _, problems, urls = browser.load(page.as_uri(), "1")
    kinds = {e["method"] for e in problems}
    assert {"Runtime.consoleAPICalled", "Runtime.exceptionThrown"} <= kinds
    assert "http://127.0.0.1:9/x.png" in urls


def test_report_renders_in_chromium(browser, compiled_default, tmp_path):
    runs = []
    for name in ("before", "after"):
        path = tmp_path / f"{name}.json"
        r = CliRunner().invoke(cli, ["profile", str(compiled_default.path), "--warmup", "1",
                                     "--repeat", "15", "--compare", "ort,torch", "--json",
                                     "--save", str(path)], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        runs.append(path)
    after = json.loads(runs[1].read_text())
    after["per_op"] = [
        {"kernel": f"fused_conv2d{i}_add_relu", "onnx_nodes": [f"/conv{i}/Conv", f"/relu{i}"],
         "calls": 15, "total_ms": 10.0 / (i + 1), "mean_ms": 0.66 / (i + 1), "share": 0.1}
        for i in range(6)]
    runs[1].write_text(json.dumps(after))
    html = tmp_path / "report.html"
    r = CliRunner().invoke(cli, ["report", *map(str, runs), "-o", str(html)],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    value, problems, urls = browser.load(html.as_uri(), PROBE)
    page = json.loads(value)
    assert page["title"] == "edgekit profile report"
    ids = {c[0] for c in page["charts"]}
    assert {"latency-chart", "per-op-chart-0"} <= ids
    assert all(w > 300 and h > 100 for _, w, h in page["charts"])
    assert page["violins"] == 6  # 3 engines x 2 runs
    assert page["bars"] == 6
    assert page["comparison"] == 1 + 3  # header + one row per engine
    assert page["environment"] > 10 and page["ledger"]
    assert problems == []
    assert urls == [html.as_uri()]
