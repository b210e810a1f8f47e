"""Devices: run and profile artifacts where they belong.

- ``runner.cc`` / ``toolchain.py``: ``edgekit-runner``, a small C++ program on the TVM runtime
  that loads an artifact, runs it on ``.npy`` inputs and prints outputs and latency statistics
  as JSON; built for this machine or cross-compiled for aarch64 against PyPI's aarch64 wheels.
- ``runner.py``: run/profile through that binary, natively or under qemu-user.
- ``farm.py``: TVM's RPC tracker and device server, and profiling through them.
- ``cuda.py``: PTX for CUDA artifacts, so a GPU machine needs only the driver.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def profile_on_device(artifact: str | Path, runner: str | None = None,
                      tracker: str | None = None, key: str | None = None,
                      **kwargs: Any) -> dict[str, Any]:
    """Profile through ``edgekit-runner`` (``runner``) or an RPC tracker (``tracker`` + ``key``).

    Takes the local profile's keyword arguments; ``compare`` must be empty (baselines run on
    this machine, so a ratio against a remote or emulated device would mean nothing)."""
    from edgekit.errors import EdgekitError

    if kwargs.pop("compare", None):
        raise EdgekitError("--compare times engines on this machine; it cannot be combined "
                           "with --runner or --tracker")
    if runner and tracker:
        raise EdgekitError("give either --runner or --tracker, not both")
    if tracker:
        if not key:
            raise EdgekitError("--tracker needs --key (the device key; see `edgekit devices`)")
        from edgekit.devices import farm

        return farm.profile_remote(artifact, tracker, key, **kwargs)
    if key:
        raise EdgekitError("--key applies with --tracker")
    if runner is None:
        raise EdgekitError("give --runner or --tracker")
    from edgekit.devices import runner as runner_mod

    return runner_mod.profile(artifact, runner, **kwargs)


def seconds(duration: float | str | None) -> float | None:
    """--duration for a device profile: seconds only (``auto`` needs the local timing loop)."""
    from edgekit.errors import EdgekitError
    from edgekit.report.record import parse_duration

    value = parse_duration(duration)
    if isinstance(value, str):
        raise EdgekitError("--duration auto is for local profiles; give seconds or --repeat")
    return value


def finish(result: dict[str, Any], times_ms: list[float], manifest: dict[str, Any],
           warmup: int, seconds: float, stopped: str,
           device_key: str | None = None) -> dict[str, Any]:
    """Complete a device profile with the local profile's statistics and report fields."""
    from edgekit.profile import stats
    from edgekit.report.record import finalize

    result = {**result, "iterations": len(times_ms), "latency_ms": stats(times_ms)}
    steady = {"iterations": len(times_ms), "seconds": round(seconds, 4), "stopped": stopped}
    return finalize(result, {"edgekit": times_ms}, {"edgekit": steady}, manifest, warmup,
                    device_key)
