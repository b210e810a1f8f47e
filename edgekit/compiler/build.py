"""Relax module -> executable -> shared library, and the library's check against onnxruntime.

``build`` schedules the kernels on CPU targets (``pipeline.prepare``) and runs ``tvm.compile``
for the target dict; ``export_library`` links with the native compiler or the target's cross
compiler and, for CUDA, writes PTX beside the library (``edgekit.devices.cuda``);
``check_library`` runs the linked library on seeded inputs against onnxruntime.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import onnx

from edgekit import verify
from edgekit.compiler.pipeline import prepare
from edgekit.compiler.progress import Progress, no_progress
from edgekit.compiler.tune import TuningRequest
from edgekit.errors import EdgekitError, last_line
from edgekit.targets import Target
from edgekit.verify import Comparison, TensorSpec


def build(mod, target: Target, tuning: TuningRequest | None = None,
          progress: Progress = no_progress, info: dict | None = None):
    """Compile a Relax module for ``target`` and return the executable. On CPU targets the
    kernels are scheduled first (``pipeline.prepare``: tuning when ``tuning.tune``, records
    from the tuning database, default schedules); ``info`` receives that record."""
    import tvm

    if target.device == "cpu":
        mod, record = prepare(mod, target, tuning, progress)
        if info is not None:
            info.update(record)
    try:
        return tvm.compile(mod, target=target.tvm_target())
    except Exception as exc:
        raise EdgekitError(f"TVM compile for target {target.name!r} failed: "
                           f"{last_line(exc)}") from exc


def export_library(executable, target: Target, path: Path) -> None:
    """Link the executable into a shared library, cross-compiling when the target needs it."""
    from tvm.support import cc

    compiler = target.find_cross_compiler()
    try:
        if compiler:
            executable.export_library(str(path), fcompile=cc.cross_compiler(compiler))
        else:
            executable.export_library(str(path))
    except Exception as exc:
        raise EdgekitError(f"linking the library for {target.name!r} failed: "
                           f"{last_line(exc)}") from exc
    if target.device == "cuda":  # PTX beside the library: the GPU machine needs no nvcc
        from edgekit.devices.cuda import write_ptx

        write_ptx(executable, target, path.parent)


def check_library(library: Path, model: onnx.ModelProto, specs: Sequence[TensorSpec],
                  outputs: Sequence[TensorSpec], target: Target, atol: float,
                  rtol: float) -> list[Comparison]:
    """Run the linked ``library`` (on this machine) once on seeded inputs and compare each of
    ``outputs`` with onnxruntime's run of ``model``."""
    import tvm
    from tvm import relax

    inputs = verify.seeded_inputs(specs, seed=0)
    ref = verify.run_ort(model, inputs)
    device = tvm.cuda() if target.device == "cuda" else tvm.cpu()
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), device)
    result = vm["main"](*(tvm.runtime.tensor(a, device) for a in inputs.values()))
    got = [result.numpy()] if hasattr(result, "numpy") else [t.numpy() for t in result]
    return verify.compare([o.name for o in outputs], got, ref, atol, rtol)
