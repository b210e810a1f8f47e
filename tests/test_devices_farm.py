"""Device farm: a real TVM tracker and RPC server on 127.0.0.1, started with the edgekit CLI,
an artifact profiled through them from the CLI, and every process stopped afterwards."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from _processes import wait_line
from click.testing import CliRunner

from edgekit.cli import cli
from edgekit.report import schema
from edgekit.report.stats import latency_stats

EDGEKIT = [sys.executable, "-c", "from edgekit.cli import main; main()"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(procs: list[subprocess.Popen]) -> list[psutil.Process]:
    """SIGTERM the edgekit processes; returns those of them and their descendants that are
    still alive 20 s later (after killing them, so nothing is left behind either way)."""
    family = []
    for p in procs:
        if p.poll() is None:
            parent = psutil.Process(p.pid)
            family += [parent, *parent.children(recursive=True)]
            p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(family, timeout=20)
    for p in alive:
        p.kill()
    psutil.wait_procs(alive, timeout=5)
    for p in procs:
        p.wait(timeout=5)
    return alive


@pytest.fixture(scope="module")
def farm():
    procs: list[subprocess.Popen] = []

    def start(*args: str) -> subprocess.Popen:
        proc = subprocess.Popen([*EDGEKIT, *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        return proc

    try:
        address = f"127.0.0.1:{_free_port()}"
        # started together: serve-device waits for the tracker to come up
        tracker = start("tracker", "--port", address.rsplit(":", 1)[1])
        server = start("serve-device", "--key", "loopback", "--tracker", address,
                       "--port", str(_free_port()))
        assert wait_line(tracker, "listening on").strip().endswith(address)
        wait_line(server, "serving on")
        yield {"address": address, "procs": procs}
    finally:
        _stop(procs)


def test_remote_profile_through_loopback_tracker(farm, compiled_default):
    address = farm["address"]
    deadline = time.monotonic() + 30
    while True:  # the server registers with the tracker asynchronously
        res = CliRunner().invoke(cli, ["devices", "--tracker", address, "--json"])
        assert res.exit_code == 0, res.output
        devices = {d["key"]: d for d in json.loads(res.output)}
        if devices.get("loopback", {}).get("free") or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert devices["loopback"]["free"] == 1

    res = CliRunner().invoke(cli, ["profile", str(compiled_default.path), "--tracker", address,
                                   "--key", "loopback", "--warmup", "2", "--repeat", "5",
                                   "--json"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.output)
    assert result["iterations"] == 5 and set(result["latency_ms"]) == set(latency_stats([1.0, 2.0]))
    assert result["device"] == {"tracker": address, "key": "loopback"}
    assert result["environment"]["device_key"] == "loopback"
    assert 0 < result["latency_ms"]["min"] <= result["latency_ms"]["max"]
    assert schema.validate(result) == []  # the same run format as a local profile

    res = CliRunner().invoke(cli, ["profile", str(compiled_default.path), "--tracker", address,
                                   "--key", "no-such-device"])
    assert res.exit_code == 1 and "no free device with key 'no-such-device'" in res.output


def test_remote_profile_uploads_the_hashed_library(farm, compiled_default, tmp_path,
                                                   monkeypatch):
    """Issue 18 (TOCTOU): model.so swapped for garbage right after the hash check. Before, the
    upload read the path again and the device got the garbage (its load failed); now the
    hashed bytes are uploaded, so the profile runs."""
    from faults._swap import swap_after_check

    from edgekit.devices.farm import profile_remote

    art = Path(shutil.copytree(compiled_default.path, tmp_path / "m.edgekit"))
    state = swap_after_check(monkeypatch, art, b"\x7fELF not a library")
    result = profile_remote(art, farm["address"], "loopback", warmup=1, repeat=2, wait=30.0)
    assert result["iterations"] == 2 and state["swaps"] == 1


def test_stopping_leaves_no_process_behind(farm):
    """Runs after the profile: SIGTERM must end the servers and TVM's popen workers."""
    procs = farm["procs"]
    workers = [c for p in procs for c in psutil.Process(p.pid).children(recursive=True)]
    assert any("popen_worker" in " ".join(c.cmdline()) for c in workers)
    survivors = _stop(procs)
    assert survivors == [], [p.pid for p in survivors]
    assert all(p.returncode is not None for p in procs)
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
