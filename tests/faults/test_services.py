"""Network services under fault and attack (issue 18, Why 6), with real TVM trackers and RPC
servers on 127.0.0.1 started as `edgekit` processes and stopped by each test:

- a non-loopback bind warns that the device server runs uploaded code (trusted network only);
- with a farm secret, a client without it is refused by the tracker and by the device server,
  even when it holds a valid match key, and a device without it cannot register; with it,
  the device works;
- `kill -9` of `serve-device` takes its RPC worker (and any session process) with it, and the
  tracker stops listing the device within seconds; `kill -9` of `tracker` takes its worker.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
from _processes import wait_line
from click.testing import CliRunner

from edgekit.cli import cli

EDGEKIT = [sys.executable, "-c", "from edgekit.cli import main; main()"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SECRET = "correct horse battery staple"


@pytest.fixture(scope="module")
def start():
    """Start `edgekit ARGS...` (stdout and stderr merged); every one is killed afterwards with
    all its descendants (at the end of the module: the secret farm is shared)."""
    procs: list[subprocess.Popen] = []

    def _start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        full_env = {k: v for k, v in os.environ.items() if k != "EDGEKIT_FARM_SECRET"}
        full_env.update(env or {})
        proc = subprocess.Popen([*EDGEKIT, *args], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=full_env)
        procs.append(proc)
        return proc

    yield _start
    family = []
    for p in procs:
        if p.poll() is None:
            parent = psutil.Process(p.pid)
            family += [parent, *parent.children(recursive=True)]
    for p in family:
        p.kill()
    psutil.wait_procs(family, timeout=10)
    for p in procs:
        p.wait(timeout=10)


def _farm(start, secret: str | None = None, key: str = "loopback"):
    """A tracker and a device server on loopback (which must not warn); returns (tracker
    address, tracker, server)."""
    env = {"EDGEKIT_FARM_SECRET": secret} if secret else None
    address = f"127.0.0.1:{_free_port()}"
    tracker = start("tracker", "--port", address.rsplit(":", 1)[1], env=env)
    server = start("serve-device", "--key", key, "--tracker", address,
                   "--port", str(_free_port()), env=env)
    seen: list[str] = []
    wait_line(tracker, "listening on", seen)
    wait_line(server, "serving on", seen)
    assert not any("warning" in line for line in seen), seen
    _wait_free(address, key, secret)
    return address, tracker, server


@pytest.fixture(scope="module")
def secret_farm(start):
    return _farm(start, SECRET)


def _devices(address: str, secret: str | None = None):
    env = {"EDGEKIT_FARM_SECRET": secret} if secret else {}
    return CliRunner(env=env).invoke(cli, ["devices", "--tracker", address, "--json"])


def _wait_free(address: str, key: str, secret: str | None = None) -> None:
    import json

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        res = _devices(address, secret)
        assert res.exit_code == 0, res.output
        if any(d["key"] == key and d["free"] for d in json.loads(res.output)):
            return
        time.sleep(0.2)
    raise AssertionError(f"{key} never registered with {address}")


def test_non_loopback_bind_warns(start):
    port = _free_port()
    tracker = start("tracker", "--host", "0.0.0.0", "--port", str(port))
    seen: list[str] = []
    wait_line(tracker, "listening on", seen)
    warning = " ".join(seen)
    assert "warning:" in warning and "trusted network" in warning, seen

    # the tracker listens on every address, loopback included
    server = start("serve-device", "--key", "k", "--tracker", f"127.0.0.1:{port}",
                   "--host", "0.0.0.0", "--port", str(_free_port()))
    seen = []
    wait_line(server, "serving on", seen)
    warning = " ".join(seen)
    assert "runs uploaded code" in warning and "trusted network" in warning, seen
    assert "secret" in warning  # and it says how to keep strangers out


def test_secret_refuses_clients_without_it(start, secret_farm):
    from tvm import rpc

    from edgekit.devices import farm

    secret = SECRET
    address, _, _ = secret_farm
    host, port = farm.parse_address(address)

    # the CLI without the secret: one clear line, exit 1
    res = _devices(address)
    assert res.exit_code == 1 and res.output.count("\n") == 1, res.output
    assert "secret" in res.output and "Traceback" not in res.output
    res = _devices(address, "wrong secret")
    assert res.exit_code == 1 and "secret" in res.output, res.output

    # TVM's own client, without the secret, gets no device from the tracker
    with pytest.raises(RuntimeError):
        rpc.connect_tracker(host, port).request("loopback", max_retry=1)

    # a leaked match key is not enough: the device server wants proof of the secret too
    url, server_port, matchkey = farm.lease(address, "loopback", secret)
    with pytest.raises(RuntimeError):
        rpc.connect(url, server_port, matchkey)
    time.sleep(0.2)

    # a device without the secret, or with another one, cannot register: one line, exit 1
    rogue = [start("serve-device", "--key", "loopback", "--tracker", address,
                   "--port", str(_free_port()), env=env)
             for env in ({}, {"EDGEKIT_FARM_SECRET": "wrong secret"})]
    outputs = [p.communicate(timeout=120)[0] for p in rogue]
    assert [p.returncode for p in rogue] == [1, 1], outputs
    assert "needs the farm secret" in outputs[0] and "refused the farm secret" in outputs[1]
    assert all(o.count("error:") == 1 and "Traceback" not in o for o in outputs), outputs

    # with the secret: listed and usable
    _wait_free(address, "loopback", secret)
    sess = farm.request_session(address, "loopback", secret)
    assert int(sess.get_function("runtime.NumThreads")()) >= 1
    # end the session now: TVM's RPC objects sit in reference cycles, so without a collection
    # the socket (and the device, busy) could outlive the test (the next test waited 30 s)
    del sess
    gc.collect()


def test_kill_9_of_serve_device_takes_its_worker_and_listing(secret_farm):
    """Runs last: it kills the shared farm's device server."""
    from edgekit.devices import farm

    address, tracker, server = secret_farm
    _wait_free(address, "loopback", SECRET)
    sess = farm.request_session(address, "loopback", SECRET)  # a live session: one more process
    assert int(sess.get_function("runtime.NumThreads")()) >= 1
    family = psutil.Process(server.pid).children(recursive=True)
    assert len(family) >= 2, family  # the RPC worker and its session process

    os.kill(server.pid, signal.SIGKILL)
    server.wait(timeout=10)
    _, alive = psutil.wait_procs(family, timeout=5)
    assert alive == [], [(p.pid, p.cmdline()) for p in alive]
    deadline = time.monotonic() + 5
    while any(d["key"] == "loopback" for d in farm.list_devices(address, SECRET)):
        assert time.monotonic() < deadline, "the killed device is still listed"
        time.sleep(0.2)

    # the tracker's worker dies with it too, freeing the port
    workers = psutil.Process(tracker.pid).children(recursive=True)
    assert workers
    os.kill(tracker.pid, signal.SIGKILL)
    tracker.wait(timeout=10)
    _, alive = psutil.wait_procs(workers, timeout=5)
    assert alive == [], [(p.pid, p.cmdline()) for p in alive]
