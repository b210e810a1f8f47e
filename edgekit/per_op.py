"""Per-kernel time of an artifact, with each kernel mapped back to the ONNX nodes it computes.

Timing: TVM 0.27 has no ``vm.profile``; ``VirtualMachine.set_instrument`` calls a function
before and after every packed call the VM makes (compiled kernels and ``vm.builtin.*``). We
time each call with ``perf_counter`` and a device sync after it, over ``repeat`` runs.

Mapping (by op signature, a heuristic): TVM's ONNX frontend keeps no node names or spans, and
its passes rename every variable, so the names are lost by the time kernels exist. What
survives is the kernel name, which lists the Relax ops fused into it
(``fused_conv2d3_add2_maximum2_minimum2`` = conv2d, add, maximum, minimum). Kernel calls in
execution order are matched to ONNX nodes in graph (topological) order: each op of a call takes
the first unclaimed node whose op type can produce it (``conv2d`` <- Conv; ``add`` <- Add, or
the bias of a Conv/Gemm this call took; ``maximum``/``minimum`` <- Relu/Clip...). Ops no node
explains (folded constants, layout glue) map to nothing; a kernel called several times collects
the nodes of every call.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Relax op (as it appears in kernel names) -> ONNX op types it implements directly ...
_PRIMARY: dict[str, set[str]] = {
    "conv1d": {"Conv"}, "conv2d": {"Conv"}, "conv3d": {"Conv"},
    "conv2d_transpose": {"ConvTranspose"}, "matmul": {"MatMul", "Gemm"},
    "dense": {"MatMul", "Gemm"}, "add": {"Add", "Sum"}, "subtract": {"Sub"},
    "multiply": {"Mul"}, "divide": {"Div"}, "maximum": {"Relu", "Clip", "Max", "LeakyRelu"},
    "minimum": {"Min", "Clip"}, "clip": {"Clip", "Relu"}, "relu": {"Relu"},
    "mean": {"ReduceMean", "GlobalAveragePool"}, "sum": {"ReduceSum"}, "max": {"ReduceMax"},
    "softmax": {"Softmax"}, "gelu": {"Gelu", "Erf"}, "erf": {"Erf"},
    "layer_norm": {"LayerNormalization"}, "rms_norm": {"RMSNormalization"},
    "power": {"Pow"}, "sqrt": {"Sqrt"}, "rsqrt": {"Sqrt", "Reciprocal"},
    "reshape": {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}, "permute_dims": {"Transpose"},
    "take": {"Gather"}, "concat": {"Concat"}, "concatenate": {"Concat"}, "split": {"Split"},
    "strided_slice": {"Slice"}, "dynamic_strided_slice": {"Slice"},
    "max_pool2d": {"MaxPool"}, "avg_pool2d": {"AveragePool"},
    "adaptive_avg_pool2d": {"GlobalAveragePool"}, "where": {"Where"}, "astype": {"Cast"},
    "broadcast_to": {"Expand"}, "tile": {"Tile"}, "image_resize2d": {"Resize"},
    "resize2d": {"Resize"}, "cumsum": {"CumSum"},
    # quantized graphs: quantize, and the integer GEMMs of Int8Kernels
    # (``fused_edgekit_int8_gemm...``)
    "quantize": {"QuantizeLinear", "QLinearMatMul", "QLinearConv"},
    "dequantize": {"DequantizeLinear"},
    "gemm": {"MatMul", "Gemm", "Conv", "QLinearMatMul", "QLinearConv", "ConvInteger"},
}
# ... and ONNX op types it is one part of (bias add of Conv/Gemm, the min of a Clip, ...).
_PART_OF: dict[str, set[str]] = {
    "add": {"Conv", "Gemm", "BatchNormalization", "LayerNormalization", "MatMul"},
    "multiply": {"BatchNormalization", "Gemm", "LayerNormalization", "Gelu", "Erf"},
    "subtract": {"BatchNormalization", "LayerNormalization"},
    "divide": {"BatchNormalization", "LayerNormalization", "ReduceMean", "Erf", "Gelu"},
    "maximum": {"Clip"}, "minimum": {"Clip"}, "sum": {"Softmax", "ReduceMean"},
    "max": {"Softmax"}, "exp": {"Softmax"}, "mean": {"LayerNormalization"},
    "power": {"LayerNormalization"}, "sqrt": {"LayerNormalization"},
    "rsqrt": {"LayerNormalization"}, "reshape": {"MatMul", "Gemm", "Flatten"},
    "permute_dims": {"Gemm", "MatMul"},
}
_MULTI = sorted((k for k in _PRIMARY if "_" in k), key=len, reverse=True)


def kernel_ops(kernel: str) -> list[str]:
    """Relax op names in a kernel name: ``fused_matmul3_add4_gelu`` -> matmul, add, gelu."""
    name = kernel.removeprefix("fused_")
    parts = [re.sub(r"\d+$", "", p) for p in name.split("_") if p]
    ops: list[str] = []
    i = 0
    while i < len(parts):
        for multi in _MULTI:
            n = multi.count("_") + 1
            if "_".join(parts[i:i + n]) == multi:
                ops.append(multi)
                i += n
                break
        else:
            ops.append(parts[i])
            i += 1
    return ops


def _primary(op: str) -> set[str]:
    return _PRIMARY.get(op, {op.capitalize(), op.title().replace("_", "")})


def map_kernels(calls: Sequence[str], node_ops: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    """Kernel name -> ONNX node names, from calls in execution order and (name, op_type) of
    the graph's nodes in topological order (see the module docstring)."""
    claimed = [False] * len(node_ops)
    last: int | None = None  # the node claimed most recently
    out: dict[str, list[str]] = defaultdict(list)
    for kernel in calls:
        if "." in kernel:  # vm.builtin.*: no ONNX node of its own
            continue
        got: list[int] = []
        first = next((i for i, c in enumerate(claimed) if not c), len(node_ops))
        for op in kernel_ops(kernel):
            primary, part_of = _primary(op), _PART_OF.get(op, set())
            if any(node_ops[i][1] in primary for i in got):
                continue  # this call already took a node of this op
            nxt = next((i for i in range(first, len(node_ops))
                        if not claimed[i] and node_ops[i][1] in primary), None)
            # A part of a node this call (or the previous one) took: the bias add of a Conv,
            # the min of a Clip; unless a node of its own op comes right after that node.
            owner = next((i for i in [*got[::-1], last] if i is not None
                          and node_ops[i][1] in part_of), None)
            if owner is not None and (nxt is None or nxt != owner + 1):
                got.append(owner)
            elif nxt is not None:
                claimed[nxt] = True
                got.append(nxt)
                last = nxt
        for i in sorted(set(got)):
            if node_ops[i][0] not in out[kernel]:
                out[kernel].append(node_ops[i][0])
    return dict(out)


def onnx_nodes(model) -> list[tuple[str, str]]:
    """(name, op_type) of every computing node in graph order (constants left out)."""
    return [(n.name or f"{n.op_type}#{i}", n.op_type) for i, n in enumerate(model.graph.node)
            if n.op_type not in ("Constant", "Identity")]


def time_kernels(vm, device, args: Sequence[Any], warmup: int = 3,
                 repeat: int = 20) -> tuple[list[str], dict[str, list[float]], list[float]]:
    """Instrumented runs: (call sequence of one run, name -> per-call seconds over all timed
    runs, per-run instrumented wall seconds)."""
    from tvm.runtime.vm import VMInstrumentReturnKind

    main = vm["main"]
    for _ in range(warmup):
        main(*args)
    device.sync()
    sequence: list[str] = []
    times: dict[str, list[float]] = defaultdict(list)
    starts: list[float] = []
    record = {"on": False, "first": True}

    def instrument(func, name, before_run, ret, *fargs):
        if before_run:
            starts.append(time.perf_counter())
        else:
            device.sync()
            dt = time.perf_counter() - starts.pop()
            if record["on"]:
                times[str(name)].append(dt)
                if record["first"]:
                    sequence.append(str(name))
        return VMInstrumentReturnKind.NO_OP

    vm.set_instrument(instrument)
    runs: list[float] = []
    try:
        main(*args)  # instrumented warm-up: the Python callback's own first-call costs
        record["on"] = True
        for _ in range(repeat):
            t0 = time.perf_counter()
            main(*args)
            device.sync()
            runs.append(time.perf_counter() - t0)
            record["first"] = False
    finally:
        vm.set_instrument(None)
    return sequence, dict(times), runs


def rows(times: dict[str, list[float]], repeat: int, mapping: dict[str, list[str]],
         int8: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The ``per_op`` contract: one row per kernel or builtin, per-run numbers, by total_ms;
    ``int8``: the kernel computes in integers (named in ``int8``, the manifest's
    ``verification.quantization.int8_kernels``: int8/uint8 reads into an int32 sum)."""
    per_run = {k: 1e3 * sum(v) / repeat for k, v in times.items()}
    total = sum(per_run.values()) or 1.0
    counts = {k: len(v) // repeat for k, v in times.items()}
    out = [{"kernel": k, "onnx_nodes": list(mapping.get(k, [])), "calls": counts[k],
            "total_ms": per_run[k], "mean_ms": per_run[k] / max(counts[k], 1),
            "share": per_run[k] / total, "int8": k in int8} for k in times]
    return sorted(out, key=lambda r: r["total_ms"], reverse=True)


def profile_per_op(path: str | Path, inputs: dict[str, np.ndarray], warmup: int = 3,
                   repeat: int = 20) -> dict[str, Any]:
    """Per-op profile of an artifact on ``inputs`` (names in the manifest's order).

    Returns ``{"per_op": rows, "per_op_info": {...}}``; the rows' ``total_ms`` add up to the
    instrumented run time (``per_op_info.instrumented_run_ms``), which includes the
    callback's overhead of a few microseconds per call."""
    import onnx
    import tvm
    from tvm import relax

    from edgekit import runtime
    from edgekit.artifact import ONNX_FILE

    model = runtime.load(path)  # checks hashes, machine and device
    device = model.device
    # the library runtime.load loaded from the bytes it hashed: a second read of the path
    # could run a model.so replaced after the check
    vm = relax.VirtualMachine(model.library, device)
    args = [tvm.runtime.tensor(np.ascontiguousarray(inputs[i["name"]]), device)
            for i in model.inputs]
    sequence, times, runs = time_kernels(vm, device, args, warmup, repeat)
    mapping = map_kernels(sequence, onnx_nodes(onnx.load(str(Path(path) / ONNX_FILE))))
    quantization = model.manifest.get("verification", {}).get("quantization") or {}
    table = rows(times, repeat, mapping, quantization.get("int8_kernels", []))
    return {"per_op": table, "per_op_info": {
        "repeat": repeat,
        "instrumented_run_ms": float(np.mean(runs) * 1e3),
        "kernel_sum_ms": sum(r["total_ms"] for r in table),
        "calls_per_run": len(sequence),
        "mapping": "by op signature: kernel-name ops matched in execution order to ONNX "
                   "nodes in graph order",
    }}


def profile_artifact_per_op(path: str | Path, threads: int | None = None, warmup: int = 3,
                            repeat: int = 20, seed: int = 0) -> dict[str, Any]:
    """``edgekit profile --per-op``: seeded inputs, ``threads`` TVM threads, then
    ``profile_per_op``."""
    import os

    from edgekit import runtime
    from edgekit.verify import TensorSpec, seeded_inputs

    runtime.set_threads(threads or os.cpu_count() or 1)
    manifest = runtime.read_manifest(path)
    specs = [TensorSpec.from_dict(i) for i in manifest["inputs"]]
    return profile_per_op(path, seeded_inputs(specs, seed), warmup, repeat)
