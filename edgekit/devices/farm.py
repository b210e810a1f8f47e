"""A device farm over TVM's RPC tracker: serve a tracker, serve a device, list, profile.

``serve_tracker`` and ``serve_device`` run TVM's own tracker and RPC server (each in a TVM
popen worker process) until SIGINT/SIGTERM, then stop them and every process they started:
TVM's server forks a worker per session and does not reap them when it is killed.
``profile_remote`` uploads an artifact's library to a device reached through the tracker and
times it there with TVM's time evaluator (per-call times measured on the device).
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgekit import runtime
from edgekit.errors import EdgekitError, last_line
from edgekit.report.record import device_seconds, finalize_device

DEFAULT_TRACKER_PORT = 9190
DEFAULT_SERVER_PORT = 9090


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise EdgekitError(f"tracker address {address!r}: expected HOST:PORT")
    return host, int(port)


def stop_children(timeout: float = 5.0) -> list[int]:
    """Terminate every descendant of this process (then kill what remains); returns their pids."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=timeout)
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(alive, timeout=timeout)
    return [c.pid for c in children]


def _serve(start: Callable[[], Any], describe: Callable[[Any], str],
           announce: Callable[[str], None]) -> None:
    """Start a TVM service, announce it, and block until SIGINT/SIGTERM; then clean up."""
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT,
                                                                      signal.SIGTERM)}
    service = None
    try:
        service = start()
        announce(describe(service))
        while not stop.wait(0.5):
            proc = getattr(service, "proc", None)
            if proc is not None and not proc.is_alive():
                raise EdgekitError("the TVM service process exited unexpectedly")
    finally:
        if service is not None:
            with contextlib.suppress(Exception):
                service.terminate()
        stop_children()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve_tracker(host: str = "127.0.0.1", port: int = DEFAULT_TRACKER_PORT,
                  port_end: int | None = None,
                  announce: Callable[[str], None] = print) -> None:
    """Run TVM's RPC tracker until interrupted."""
    from tvm.rpc.tracker import Tracker

    def start():
        try:
            return Tracker(host=host, port=port, port_end=port_end or port + 10, silent=True)
        except Exception as exc:
            raise EdgekitError(f"cannot start the tracker on {host}:{port}: "
                               f"{last_line(exc)}") from None

    _serve(start, lambda t: f"tracker listening on {host}:{t.port}", announce)


def serve_device(key: str, tracker: str, host: str = "127.0.0.1",
                 port: int = DEFAULT_SERVER_PORT, port_end: int | None = None,
                 announce: Callable[[str], None] = print) -> None:
    """Run TVM's RPC server for this machine, registered with ``tracker`` under ``key``."""
    from tvm import rpc

    tracker_addr = parse_address(tracker)
    _check_tracker(*tracker_addr, wait=30.0)  # the tracker may still be starting

    def start():
        try:
            return rpc.Server(host=host, port=port, port_end=port_end or port + 10,
                              tracker_addr=tracker_addr, key=key, silent=True)
        except Exception as exc:
            raise EdgekitError(f"cannot start the RPC server on {host}:{port}: "
                               f"{last_line(exc)}") from None

    _serve(start, lambda s: f"device {key!r} serving on {host}:{s.port}, "
                            f"registered with tracker {tracker}", announce)


def _check_tracker(host: str, port: int, wait: float = 0.0):
    """A tracker session; retries for ``wait`` seconds before giving up."""
    from tvm import rpc

    deadline = time.monotonic() + wait
    while True:
        try:
            with socket.create_connection((host, port), timeout=5):
                pass
            return rpc.connect_tracker(host, port)
        except Exception as exc:
            if time.monotonic() < deadline:
                time.sleep(0.5)
                continue
            raise EdgekitError(f"cannot reach the tracker at {host}:{port}: "
                               f"{last_line(exc)}") from None


def list_devices(tracker: str) -> list[dict[str, Any]]:
    """Devices registered with the tracker: key, free, pending requests, total."""
    summary = _check_tracker(*parse_address(tracker)).summary()
    rows: dict[str, dict[str, Any]] = {}
    for server in summary.get("server_info", []):
        key = str(server.get("key", "")).split(":")[-1] if server.get("key") else "?"
        row = rows.setdefault(key, {"key": key, "free": 0, "pending": 0, "total": 0,
                                    "addresses": []})
        row["total"] += 1
        addr = server.get("addr")
        if addr:
            row["addresses"].append(f"{addr[0]}:{addr[1]}")
    for key, info in summary.get("queue_info", {}).items():
        row = rows.setdefault(key, {"key": key, "free": 0, "pending": 0, "total": 0,
                                    "addresses": []})
        row["free"], row["pending"] = info.get("free", 0), info.get("pending", 0)
    return sorted(rows.values(), key=lambda r: r["key"])


def wait_for_device(tracker: str, key: str, timeout: float = 30.0) -> None:
    """Block until ``key`` has a free device on the tracker; raise at once when no device has
    that key, or after ``timeout`` when they stay busy."""
    deadline = time.monotonic() + timeout
    while True:
        devices = {d["key"]: d for d in list_devices(tracker)}
        if devices.get(key, {}).get("free", 0) > 0:
            return
        if key not in devices or time.monotonic() > deadline:
            known = ", ".join(devices) or "none"
            raise EdgekitError(f"no free device with key {key!r} on tracker {tracker} "
                               f"(keys: {known})")
        time.sleep(0.2)


def profile_remote(artifact: str | Path, tracker: str, key: str, warmup: int = 10,
                   repeat: int = 100, duration: float | str | None = None,
                   threads: int | None = None, seed: int = 0,
                   wait: float = 10.0) -> dict[str, Any]:
    """Upload ``artifact`` to a device with ``key`` and time it there (local-profile format)."""
    from tvm import relax
    from tvm import runtime as tvm_runtime

    from edgekit.verify import TensorSpec, seeded_inputs

    duration = device_seconds(duration)
    try:
        manifest = runtime.read_manifest(artifact)
    except runtime.ArtifactError as exc:
        raise EdgekitError(str(exc)) from None
    wait_for_device(tracker, key, wait)
    host, port = parse_address(tracker)
    specs = [TensorSpec.from_dict(i) for i in manifest["inputs"]]
    inputs = seeded_inputs(specs, seed)
    try:
        t0 = time.perf_counter()
        sess = _check_tracker(host, port).request(key, priority=1, session_timeout=0)
        if threads:
            sess.get_function("runtime.config_threadpool")(1, threads)
        used_threads = int(sess.get_function("runtime.NumThreads")())
        sess.upload(str(Path(artifact) / runtime.LIBRARY), runtime.LIBRARY)
        lib = sess.load_module(runtime.LIBRARY)
        dev = sess.cuda(0) if manifest["target"].get("device") == "cuda" else sess.cpu(0)
        vm = relax.VirtualMachine(lib, dev)
        load_ms = (time.perf_counter() - t0) * 1e3
        vm.set_input("main", *(tvm_runtime.tensor(a, dev) for a in inputs.values()))
        t0 = time.perf_counter()
        vm.invoke_stateful("main")
        dev.sync()
        first_ms = (time.perf_counter() - t0) * 1e3
        for _ in range(warmup):
            vm.invoke_stateful("main")
        dev.sync()
        # number=1: every result is one call, timed on the device (it syncs the device)
        timer = vm.time_evaluator("invoke_stateful", dev, number=1,
                                  repeat=10 if duration else repeat, min_repeat_ms=0)
        start = time.perf_counter()
        times = [t * 1e3 for t in timer("main").results]
        while duration and time.perf_counter() < start + duration:
            times += [t * 1e3 for t in timer("main").results]
        elapsed = time.perf_counter() - start
    except EdgekitError:
        raise
    except Exception as exc:
        raise EdgekitError(f"remote profile on {key!r} via {tracker} failed: "
                           f"{last_line(exc)}") from None
    result = {
        "artifact": str(artifact),
        "target": manifest["target"]["name"],
        "threads": used_threads,
        "load_ms": load_ms,
        "first_run_ms": first_ms,
        "device": {"tracker": tracker, "key": key},
        "notes": [f"timed on device {key!r} through tracker {tracker} (TVM time evaluator); "
                  "load and first-run times include the RPC round trip"],
    }
    return finalize_device(result, times, manifest, warmup, elapsed,
                  "duration" if duration else "repeat", device_key=key)
