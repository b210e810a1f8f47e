"""Run and profile an artifact through ``edgekit-runner``, natively or under qemu-user.

``runner="native"`` runs the runner built for this machine; ``runner="qemu"`` runs the
runner built for the artifact's CPU (aarch64) under ``qemu-aarch64``, so an ``rpi4`` artifact
executes its real aarch64 code here. Latencies under qemu are emulation times, not device
times: the profile says so in its notes. Outputs come back as ``.npy`` files.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgekit import runtime, shapes
from edgekit.devices import toolchain
from edgekit.errors import EdgekitError
from edgekit.hashed_library import library_file
from edgekit.report.record import device_seconds, finalize_device

RUNNERS = ("native", "qemu")


def _arch_for(manifest: dict[str, Any], runner: str) -> str:
    machine = manifest["target"].get("machine") or platform.machine()
    name = manifest["target"].get("name")
    if manifest["target"].get("device") == "cuda":
        raise EdgekitError(f"artifact {name!r} is for a CUDA GPU; the runner runs CPU artifacts")
    if runner == "native":
        if machine != platform.machine():
            raise EdgekitError(f"artifact was built for {name!r} ({machine}); this machine is "
                               f"{platform.machine()}: use --runner qemu or run it on the device")
        return "host"
    if runner != "qemu":
        raise EdgekitError(f"unknown runner {runner!r} (choose from {', '.join(RUNNERS)})")
    if machine not in toolchain.QEMU:
        raise EdgekitError(f"artifact was built for {name!r} ({machine}); --runner qemu runs "
                           f"{', '.join(toolchain.QEMU)} artifacts")
    return machine


def invoke(artifact: str | Path, inputs: Mapping[str, np.ndarray], runner: str = "qemu",
           warmup: int = 10, repeat: int = 100, duration: float | None = None,
           threads: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Run the artifact through the runner; returns ({output name: array}, runner JSON). The
    runner loads exactly the bytes that were hashed: a sealed memfd it inherits (or a private
    copy), never the artifact's ``model.so``, which may have changed since the check."""

    try:
        manifest, library = runtime.read_artifact(artifact)
    except runtime.ArtifactError as exc:
        raise EdgekitError(str(exc)) from None
    arch = _arch_for(manifest, runner)
    specs = manifest["inputs"]
    missing = [s["name"] for s in specs if s["name"] not in inputs]
    unknown = sorted(set(inputs) - {s["name"] for s in specs})
    if missing or unknown:
        raise EdgekitError(f"missing input {missing[0]!r}" if missing else
                           f"unknown input {unknown[0]!r}")
    binary, rt = toolchain.build_runner(arch)
    with (tempfile.TemporaryDirectory(prefix="edgekit-runner-") as tmp,
          library_file(library) as (lib_path, lib_fd)):
        cmd = [*toolchain.launcher(arch, rt), str(binary), str(lib_path), "--warmup", str(warmup),
               "--repeat", str(repeat), "--out", tmp]
        if duration:
            cmd += ["--duration", str(duration)]
        if threads:
            cmd += ["--threads", str(threads)]
        # the .npy headers give the runner each input's shape (a symbolic artifact's length):
        # checked here against the manifest's shapes and dims bounds before it starts
        dims = shapes.bounds_from_json(manifest.get("dims") or {})
        if dims:
            shapes.bind({s["name"]: s["shape"] for s in specs},
                        {s["name"]: np.shape(inputs[s["name"]]) for s in specs}, dims)
            # and the runner checks them again itself (it may be run without this module)
            cmd += [a for i, s in enumerate(specs) if any(map(shapes.is_symbolic, s["shape"]))
                    for a in ("--shape", f"{i}={shapes.format_shape(s['shape'])}")]
            cmd += [a for k, (lo, hi) in dims.items() for a in ("--dim", f"{k}={lo}..{hi}")]
        for i, spec in enumerate(specs):
            a = np.ascontiguousarray(inputs[spec["name"]])
            if (not dims and tuple(a.shape) != tuple(spec["shape"])) or a.dtype != np.dtype(
                    spec["dtype"]):
                raise EdgekitError(f"input {spec['name']!r}: expected {spec['dtype']} "
                                   f"{tuple(spec['shape'])}, got {a.dtype} {tuple(a.shape)}")
            np.save(Path(tmp) / f"input_{i}.npy", a)
            cmd.append(str(Path(tmp) / f"input_{i}.npy"))
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              pass_fds=() if lib_fd is None else (lib_fd,))
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
            raise EdgekitError(f"edgekit-runner ({runner}) failed: {lines[-1]}")
        report = json.loads(proc.stdout)
        names = [o["name"] for o in manifest["outputs"]]
        if len(report["outputs"]) != len(names):
            raise EdgekitError(f"runner returned {len(report['outputs'])} outputs, the "
                               f"manifest lists {len(names)}")
        outputs = {n: np.load(o["file"], allow_pickle=False)
                   for n, o in zip(names, report["outputs"], strict=True)}
    return outputs, report


def profile(artifact: str | Path, runner: str = "qemu", warmup: int = 10, repeat: int = 100,
            duration: float | str | None = None, threads: int | None = None,
            seed: int = 0) -> dict[str, Any]:
    """A latency profile through the runner, in the local profile's format."""
    from edgekit.verify import TensorSpec, seeded_inputs

    duration = device_seconds(duration)
    threads = threads or os.cpu_count() or 1  # as a local profile does
    try:
        manifest = runtime.read_manifest(artifact)
    except runtime.ArtifactError as exc:
        raise EdgekitError(str(exc)) from None
    arch = _arch_for(manifest, runner)
    specs = [TensorSpec.from_dict(i) for i in manifest["inputs"]]
    upper = {k: hi for k, (lo, hi) in shapes.bounds_from_json(manifest.get("dims") or {}
                                                              ).items()}
    _, report = invoke(artifact, seeded_inputs(shapes.concrete(specs, upper), seed), runner,
                       warmup, repeat, duration, threads)
    how = f"qemu-user emulation of {arch}" if runner == "qemu" else "native"
    notes = [f"run by edgekit-runner ({how})"]
    if upper:
        notes.append(f"timed at the upper bounds ({shapes.format_point(upper)})")
    if runner == "qemu":
        notes.append("latencies are emulation times on this machine, not device times")
    result = {
        "artifact": str(artifact),
        "target": manifest["target"]["name"],
        "threads": report["threads"],
        "load_ms": report["load_ms"],
        "first_run_ms": report["first_run_ms"],
        "runner": {"kind": runner, "arch": arch},
        "notes": notes,
    }
    times = report["times_ms"]
    return finalize_device(result, times, manifest, warmup, sum(times) / 1e3,
                  "duration" if duration else "repeat")
