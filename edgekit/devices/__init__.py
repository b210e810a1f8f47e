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

from edgekit.errors import EdgekitError


def profile_on_device(artifact: str | Path, runner: str | None = None,
                      tracker: str | None = None, key: str | None = None,
                      **kwargs: Any) -> dict[str, Any]:
    """Profile through ``edgekit-runner`` (``runner``) or an RPC tracker (``tracker`` + ``key``).

    Takes the local profile's keyword arguments; ``compare`` must be empty (baselines run on
    this machine, so a ratio against a remote or emulated device would mean nothing)."""
    if kwargs.pop("compare", None):
        raise EdgekitError("--compare times engines on this machine; it cannot be combined "
                           "with --runner or --tracker")
    if runner and tracker:
        raise EdgekitError("give either --runner or --tracker, not both")
    if tracker:
        if not key:
            raise EdgekitError("--tracker needs --key (the device key; see `edgekit devices`)")
        # farm and runner are imported here, not above: the runtime imports this package
        # (for devices/cuda.py) and must not pull them in
        from edgekit.devices import farm

        return farm.profile_remote(artifact, tracker, key, **kwargs)
    if key:
        raise EdgekitError("--key applies with --tracker")
    if runner is None:
        raise EdgekitError("give --runner or --tracker")
    from edgekit.devices import runner as runner_mod

    return runner_mod.profile(artifact, runner, **kwargs)

