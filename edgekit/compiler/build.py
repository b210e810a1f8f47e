"""Relax module -> executable -> shared library, and the library's check against onnxruntime.

``build`` schedules the kernels on CPU targets (``pipeline.prepare``) and runs ``tvm.compile``
for the target dict; ``export_library`` links with the native compiler or the target's cross
compiler and, for CUDA, writes PTX beside the library (``edgekit.devices.cuda``);
``check_library`` runs the linked library on seeded inputs against onnxruntime, then with
NaN, +-Inf and +-1e30 written into each float input (the rule is in its docstring).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from edgekit import shapes, verify
from edgekit.compiler import qdq_check
from edgekit.compiler.pipeline import prepare
from edgekit.compiler.progress import Progress, no_progress
from edgekit.compiler.tune import TuningRequest
from edgekit.errors import EdgekitError, last_line
from edgekit.passes._half import ort_form
from edgekit.targets import Target
from edgekit.verify import Comparison, TensorSpec


def build(mod, target: Target, tuning: TuningRequest | None = None,
          progress: Progress = no_progress, info: dict | None = None):
    """Compile a Relax module for ``target`` and return the executable. On CPU targets the
    kernels are scheduled first (``pipeline.prepare``: tuning when ``tuning.tune``, records
    from the tuning database, default schedules); ``info`` receives that record and
    ``int8_kernels`` (``qdq.int8_kernels``), and for symbolic inputs ``shapes``: the dims'
    bounds, the specialised lengths (``buckets``) and the ``mode``. The mode is ``symbolic``,
    one set of kernels for every length, no buckets: measured by ``bench/varlen.py``
    (docs/performance.md, "Variable length")."""
    import tvm

    if target.device == "cpu":
        from edgekit.compiler.qdq import int8_kernels

        dims = symbolic_dims(mod)
        mod, record = prepare(mod, target, tuning, progress)
        if info is not None:  # int8_kernels: for the manifest's quantization record
            info.update(record, int8_kernels=int8_kernels(mod))
            if dims:  # how one library serves every length (bench/varlen.py decided)
                info["shapes"] = {"dims": dims, "buckets": [], "mode": "symbolic"}
    try:
        tvm_target = target.tvm_target()
        return tvm.compile(mod, target=tvm_target, relax_pipeline=relax_pipeline(tvm_target))
    except Exception as exc:
        raise EdgekitError(f"TVM compile for target {target.name!r} failed: "
                           f"{last_line(exc)}") from exc


def relax_pipeline(tvm_target):
    """The Relax build pipeline ``tvm.compile`` picks for ``tvm_target`` by default, then
    every PrimFunc with at most one pointer parameter marked ``tirx.noalias`` (true of any
    such function: nothing else to alias).

    Why: the pipeline adds a ``shape_func`` (the shape computations of symbolic dims) without
    that mark, and TVM 0.27's LLVM codegen then emits every kernel of the same library
    without ``noalias`` and with one shared alias class (measured: the symbolic MiniLM dense
    layer's accumulators were stored after each multiply-add, 3x slower than the same kernel
    built alone). Static-shape modules have no shape function: unchanged."""
    import tvm
    from tvm import relax

    @tvm.transform.module_pass(opt_level=0, name="edgekit.MarkShapeFuncsNoAlias")
    def mark(mod, _ctx):
        for gv, func in list(mod.functions.items()):
            if (isinstance(func, tvm.tirx.PrimFunc)
                    and not (func.attrs and func.attrs.get("tirx.noalias"))
                    and sum(p.dtype == "handle" for p in func.params) <= 1):
                mod.update_func(gv, func.with_attr("tirx.noalias", True))
        return mod

    if "gpu" in tvm_target.keys:  # as relax.build chooses for "default"
        default = relax.get_default_pipeline(tvm_target)
    else:
        default = relax.get_pipeline("default")
    return tvm.transform.Sequential([default, mark])


def symbolic_dims(mod) -> dict[str, list[int]]:
    """{name: [lo, hi]} of the shape variables ``main`` declares (``frontend.with_dim_bounds``);
    empty for static shapes."""
    attrs = mod["main"].attrs or {}
    upper = attrs.get("tir_var_upper_bound") or {}
    lower = attrs.get("tir_var_lower_bound") or {}
    return {str(k): [int(lower.get(k, 1)), int(v)] for k, v in upper.items()}


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


# The values the non-finite check writes into one element of one float input at a time.
NONFINITE_PROBES = (float("nan"), float("inf"), float("-inf"), 1e30, -1e30)


def check_library(library: Path, model: onnx.ModelProto, specs: Sequence[TensorSpec],
                  outputs: Sequence[TensorSpec], target: Target, atol: float,
                  rtol: float, dim_bounds: Mapping[str, tuple[int, int]] | None = None
                  ) -> list[Comparison]:
    """Run the linked ``library`` (on this machine) on seeded inputs and compare each of
    ``outputs`` with onnxruntime's run of ``model`` (returned, for the caller's tolerance
    verdict); then run it on non-finite inputs and raise ``EdgekitError`` where it handles
    them differently from onnxruntime.

    Symbolic dims (names in ``specs``, bounded by ``dim_bounds``): the comparison runs at
    every ``shapes.check_points`` length (both bounds and an odd length between; each
    comparison named ``output [seq=17]``), the non-finite probes at the last of them (the
    odd length: vector tails included).

    The non-finite rule: for every float input in turn (integer inputs, token ids and masks,
    stay seeded and in range), its first element (flat index 0) is set to NaN, +Inf, -Inf,
    +1e30 and -1e30, one at a time, the other inputs seeded. For each such input and each
    float output, the elements that are NaN, +Inf and -Inf must be exactly the ones that are
    NaN, +Inf and -Inf in onnxruntime's output: nothing NaN is swallowed (relu, clip, max, min
    are NaN-propagating, ``compiler.nan_propagation``), nothing finite turns non-finite.
    Finite elements are not compared there (a 1e30 input makes tolerance meaningless). The
    first element, because onnxruntime's max/min reductions keep a NaN only when it comes
    first; elsewhere they drop it while the library keeps it.

    A quantized model (``verify.QUANTIZED_OPS``) is compared with onnxruntime without its
    QDQ fusions, each output within ``atol + rtol * max|ref|`` plus ``FLIP_STEPS`` times its
    quantization step or its measured sensitivity (``compiler.qdq_check`` derives both)."""
    import tvm
    from tvm import relax

    device = tvm.cuda() if target.device == "cuda" else tvm.cpu()
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), device)

    def run(inputs):
        result = vm["main"](*(tvm.runtime.tensor(a, device) for a in inputs.values()))
        return [result.numpy()] if hasattr(result, "numpy") else [t.numpy() for t in result]

    names = [o.name for o in outputs]
    quantized = verify.quantizes(model)
    # bfloat16: onnxruntime's CPU kernels lack it, so the reference is its emulation (fp32
    # arithmetic rounded to bfloat16 at every op output), as the convert-bf16 check runs it
    session = (qdq_check.reference_session(model) if quantized
               else verify.ort_session(ort_form(model)))
    comparisons: list[Comparison] = []
    points = verify.seeded_at(specs, dim_bounds or {})
    for point, inputs in points:
        if quantized:  # the QDQ graph's own math, plus steps (compiler.qdq_check)
            allow = qdq_check.tolerances(model, inputs, names)
            found = [verify.compare([n], [qdq_check.as_number(y)], [qdq_check.as_number(r)],
                                    atol + allow[n]["allowance"], rtol)[0]
                     for n, y, r in zip(names, run(inputs), verify.run_ort(session, inputs),
                                        strict=True)]
        else:
            found = verify.compare(names, run(inputs), verify.run_ort(session, inputs),
                                   atol, rtol)
        comparisons += [dataclasses.replace(c, name=verify.at_length(c.name, point))
                        for c in found]
    point, inputs = points[-1]
    for spec in shapes.concrete(specs, point):
        if np.dtype(spec.dtype).kind != "f" or not np.prod(spec.shape):
            continue
        for value in NONFINITE_PROBES:
            probe = {k: v.copy() for k, v in inputs.items()}
            probe[spec.name].reshape(-1)[0] = value
            for out, got, ref in zip(outputs, run(probe), verify.run_ort(session, probe),
                                     strict=True):
                problem = nonfinite_mismatch(np.asarray(got), np.asarray(ref))
                if problem:
                    where = f" at {shapes.format_point(point)}" if point else ""
                    raise EdgekitError(
                        f"compiled model handles {spec.name}[0] = {value:g}{where} differently "
                        f"from onnxruntime: output {out.name!r} {problem}; nothing written")
    return comparisons


def nonfinite_mismatch(got: np.ndarray, ref: np.ndarray) -> str:
    """'' when ``got`` has NaN, +Inf and -Inf exactly where ``ref`` does (float outputs;
    others always agree), else what differs, e.g. 'is not NaN at 12 element(s) where
    onnxruntime is'."""
    if got.dtype.kind != "f" or ref.dtype.kind != "f" or got.shape != ref.shape:
        return ""
    for test, what in ((np.isnan, "NaN"), (np.isposinf, "+Inf"), (np.isneginf, "-Inf")):
        g, r = test(got), test(ref)
        if (r & ~g).any():
            return f"is not {what} at {int((r & ~g).sum())} element(s) where onnxruntime is"
        if (g & ~r).any():
            return f"is {what} at {int((g & ~r).sum())} element(s) where onnxruntime is not"
    return ""
