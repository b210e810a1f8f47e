"""An ONNX model lowered and compiled for the host by edgekit's TVM backend, without an
artifact, and compared with onnxruntime: what the compiler-pass tests share."""

from __future__ import annotations

import numpy as np
import onnx

from edgekit import verify


def host():
    from edgekit.targets import load_target

    return load_target("host")


def lowered(model: onnx.ModelProto, tvm_target):
    """``model`` imported, rewritten and lowered to fused TIR kernels (not yet scheduled)."""
    from edgekit.compiler import pipeline, to_relax

    specs = verify.onnx_input_specs(model, [])
    return pipeline.lower(to_relax(model, specs, tvm_target=tvm_target), tvm_target)


def kernels(mod) -> dict[str, object]:
    """The TIR kernels of a lowered module, by name."""
    import tvm

    return {gv.name_hint: f for gv, f in mod.functions.items()
            if isinstance(f, tvm.tirx.PrimFunc)}


def run_against_ort(model: onnx.ModelProto, seed: int = 3) -> tuple[float, list[str]]:
    """(norm-wise relative error of the compiled model against onnxruntime on seeded inputs,
    kernel names)."""
    import tvm
    from tvm import relax

    from edgekit.compiler import build

    target = host()
    mod = lowered(model, target.tvm_target())
    names = list(kernels(mod))
    specs = verify.onnx_input_specs(model, [])
    vm = relax.VirtualMachine(build(mod, target), tvm.cpu())
    inputs = verify.seeded_inputs(specs, seed=seed)
    got = vm["main"](*(tvm.runtime.tensor(a) for a in inputs.values())).numpy()
    ref = verify.run_ort(model, inputs)[0]
    return float(np.abs(got - ref).max() / np.abs(ref).max()), names
