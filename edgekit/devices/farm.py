"""A device farm over TVM's RPC tracker: serve a tracker, serve a device, list, profile.

``serve_tracker`` and ``serve_device`` run TVM's own tracker and RPC server (each in a TVM
popen worker process) until SIGINT/SIGTERM, then stop them and every process they started:
TVM's server forks a worker per session and does not reap them when it is killed. Those workers
also die with a server killed by SIGKILL, and an optional farm secret keeps out clients that
lack it (``farm_auth.py``); a bind to a non-loopback address warns that TVM's RPC runs uploaded
code for anyone who reaches it.
``profile_remote`` uploads an artifact's library to a device reached through the tracker and
times it there with TVM's time evaluator (per-call times measured on the device).
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgekit import runtime
from edgekit.devices import farm_auth
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


def _stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` names is a loopback one (0.0.0.0 and :: are not)."""
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(str(i[4][0]).split("%")[0]).is_loopback
                               for i in infos)


def _warn_exposed(host: str, what: str, secret: str | None,
                  warn: Callable[[str], None]) -> None:
    if is_loopback(host):
        return
    advice = "" if secret else f"; set a farm secret (--secret or ${farm_auth.SECRET_ENV})"
    who = ("a device server" if what == "the tracker" else "the device server")
    reach = ("anyone who reaches it can lease its devices, and " if what == "the tracker"
             else "")
    warn(f"{what} binds {host}, which is not a loopback address: {reach}{who} runs uploaded "
         "code for any client that reaches it (TVM's RPC assumes a trusted network), so use "
         f"it only on a trusted network{advice}")


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


class _TrackerProcess:
    """TVM's tracker in a TVM popen worker that dies with this process (``farm_auth``)."""

    def __init__(self, secret: str | None, host: str, port: int, port_end: int) -> None:
        from tvm.support.popen_pool import PopenWorker

        self.proc = PopenWorker()
        self.proc.send(farm_auth.start_tracker, [os.getpid(), secret, host, port, port_end])
        self.port, _ = self.proc.recv()

    def terminate(self) -> None:
        self.proc.kill()


def serve_tracker(host: str = "127.0.0.1", port: int = DEFAULT_TRACKER_PORT,
                  port_end: int | None = None,
                  announce: Callable[[str], None] = print, secret: str | None = None,
                  warn: Callable[[str], None] = _stderr) -> None:
    """Run TVM's RPC tracker until interrupted; with a secret (or ``$EDGEKIT_FARM_SECRET``)
    only clients and devices that hold it may list, lease or register devices."""
    secret = farm_auth.resolve_secret(secret)
    _warn_exposed(host, "the tracker", secret, warn)

    def start():
        try:
            return _TrackerProcess(secret, host, port, port_end or port + 10)
        except Exception as exc:
            raise EdgekitError(f"cannot start the tracker on {host}:{port}: "
                               f"{last_line(exc)}") from None

    _serve(start, lambda t: f"tracker listening on {host}:{t.port}", announce)


def serve_device(key: str, tracker: str, host: str = "127.0.0.1",
                 port: int = DEFAULT_SERVER_PORT, port_end: int | None = None,
                 announce: Callable[[str], None] = print, secret: str | None = None,
                 warn: Callable[[str], None] = _stderr) -> None:
    """Run TVM's RPC server for this machine, registered with ``tracker`` under ``key``; with
    a secret (or ``$EDGEKIT_FARM_SECRET``) it serves only clients that prove they hold it."""
    from tvm import rpc

    secret = farm_auth.resolve_secret(secret)
    tracker_addr = parse_address(tracker)
    _warn_exposed(host, "serve-device", secret, warn)
    # the tracker may still be starting; and a secret it would refuse is better said now
    _summary(_check_tracker(*tracker_addr, wait=30.0, secret=secret), tracker)
    init = functools.partial(farm_auth.server_worker_init, os.getpid(), secret)

    def start():
        try:
            return rpc.Server(host=host, port=port, port_end=port_end or port + 10,
                              tracker_addr=tracker_addr, key=key, silent=True,
                              server_init_callback=init)
        except Exception as exc:
            raise EdgekitError(f"cannot start the RPC server on {host}:{port}: "
                               f"{last_line(exc)}") from None

    _serve(start, lambda s: f"device {key!r} serving on {host}:{s.port}, "
                            f"registered with tracker {tracker}", announce)


def _check_tracker(host: str, port: int, wait: float = 0.0, secret: str | None = None):
    """A tracker session, authenticated when there is a secret; retries for ``wait`` seconds
    before giving up."""
    from tvm import rpc

    deadline = time.monotonic() + wait
    while True:
        try:
            with socket.create_connection((host, port), timeout=5):
                pass
            session = rpc.connect_tracker(host, port)
            break
        except Exception as exc:
            if time.monotonic() < deadline:
                time.sleep(0.5)
                continue
            raise EdgekitError(f"cannot reach the tracker at {host}:{port}: "
                               f"{last_line(exc)}") from None
    if secret:
        problem = farm_auth.authenticate(session._sock, secret)
        if problem:
            raise EdgekitError(f"{host}:{port}: {problem}")
    return session


def _summary(session: Any, tracker: str) -> dict[str, Any]:
    """The tracker's summary, or a clear error when it wants the farm secret."""
    try:
        return session.summary()
    except (RuntimeError, OSError):
        raise EdgekitError(f"the tracker at {tracker} needs the farm secret: pass --secret or "
                           f"set ${farm_auth.SECRET_ENV}") from None


def lease(tracker: str, key: str, secret: str | None = None) -> tuple[str, int, str]:
    """Lease a device with ``key`` from the tracker (waits for a free one): (host, port,
    match key). The match key alone does not open a secret-holding device server."""
    from tvm.rpc import base

    secret = farm_auth.resolve_secret(secret)
    session = _check_tracker(*parse_address(tracker), secret=secret)
    base.sendjson(session._sock, [base.TrackerCode.REQUEST, key, "", 1])
    reply = base.recvjson(session._sock)
    if not (isinstance(reply, list) and reply and reply[0] == base.TrackerCode.SUCCESS):
        raise EdgekitError(f"the tracker at {tracker} needs the farm secret: pass --secret or "
                           f"set ${farm_auth.SECRET_ENV}")
    url, port, matchkey = reply[1]
    return str(url), int(port), str(matchkey)


def request_session(tracker: str, key: str, secret: str | None = None,
                    session_timeout: float = 0) -> Any:
    """An RPC session on a device with ``key`` (TVM's ``RPCSession``), proving the secret."""
    from tvm import rpc

    secret = farm_auth.resolve_secret(secret)
    url, port, matchkey = lease(tracker, key, secret)
    return rpc.connect(url, port, farm_auth.client_key(matchkey, secret), session_timeout)


def list_devices(tracker: str, secret: str | None = None) -> list[dict[str, Any]]:
    """Devices registered with the tracker: key, free, pending requests, total."""
    secret = farm_auth.resolve_secret(secret)
    summary = _summary(_check_tracker(*parse_address(tracker), secret=secret), tracker)
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
    # TVM's tracker keeps a key's queue after its last device goes: not a device any more
    return sorted((r for r in rows.values() if r["total"] or r["free"] or r["pending"]),
                  key=lambda r: r["key"])


def wait_for_device(tracker: str, key: str, timeout: float = 30.0,
                    secret: str | None = None) -> None:
    """Block until ``key`` has a free device on the tracker; raise at once when no device has
    that key, or after ``timeout`` when they stay busy."""
    deadline = time.monotonic() + timeout
    while True:
        devices = {d["key"]: d for d in list_devices(tracker, secret)}
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
                   wait: float = 10.0, secret: str | None = None) -> dict[str, Any]:
    """Upload ``artifact`` to a device with ``key`` and time it there (local-profile format);
    ``secret`` defaults to ``$EDGEKIT_FARM_SECRET``."""
    from tvm import relax
    from tvm import runtime as tvm_runtime

    from edgekit.verify import TensorSpec, seeded_inputs

    duration = device_seconds(duration)
    try:  # the bytes uploaded are the bytes hashed, not a second read of model.so
        manifest, library = runtime.read_artifact(artifact)
    except runtime.ArtifactError as exc:
        raise EdgekitError(str(exc)) from None
    secret = farm_auth.resolve_secret(secret)
    wait_for_device(tracker, key, wait, secret)
    specs = [TensorSpec.from_dict(i) for i in manifest["inputs"]]
    inputs = seeded_inputs(specs, seed)
    try:
        t0 = time.perf_counter()
        sess = request_session(tracker, key, secret)
        if threads:
            sess.get_function("runtime.config_threadpool")(1, threads)
        used_threads = int(sess.get_function("runtime.NumThreads")())
        sess.upload(bytearray(library), runtime.LIBRARY)
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
