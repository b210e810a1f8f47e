"""ONNX -> Relax -> TVM executable for a target, linked to a shared library.

Steps: list every op TVM's ONNX frontend cannot convert (all of them, with node names,
before trying); import with static input shapes, rewriting what keeps CPU code slow (n-ary
Sum, Dropout, libm math, grouped convs, NCHW convs: see ``to_relax``); ``tvm.compile`` for
the target dict; ``export_library`` with the native compiler or the target's cross compiler.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import onnx

from edgekit._fast_math import fast_math
from edgekit._grouped_conv import split_groups
from edgekit.errors import EdgekitError, last_line
from edgekit.targets import Target
from edgekit.verify import TensorSpec


def unsupported_nodes(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """(op_type, node name) of every node TVM's ONNX frontend has no converter for."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    known = set(_get_convert_map()) | {"Constant", "If"}
    missing = []
    for i, node in enumerate(model.graph.node):
        if node.domain not in ("", "ai.onnx") or node.op_type not in known:
            missing.append((node.op_type, node.name or f"node #{i}"))
        elif node.op_type == "Constant" and any(
                a.name in ("value_ints", "value_floats", "value_strings") for a in node.attribute):
            missing.append((f"Constant({node.attribute[0].name})", node.name or f"node #{i}"))
    return missing


def _lift_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Turn Constant nodes into initializers: TVM cannot read Constant(value_ints)."""
    import onnx_ir as ir
    from onnx_ir.passes.common import LiftConstantsToInitializersPass

    work = ir.from_proto(model)
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(work)
    return ir.to_proto(work)


def _plain_ops(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite two ONNX ops whose TVM import gets in the way of the conv layout change:

    - n-ary Sum -> a chain of Add, ((a + b) + c) ...: the same float sums in the same order
      (TVM imports Sum as stack + reduce: a copy of every input into a 5-D tensor);
    - Dropout (inference: the identity) whose mask output is unused -> Identity (TVM
      imports it as a tuple-valued op that the layout pass cannot follow)."""
    from onnx import helper

    def ours(n: onnx.NodeProto, op: str) -> bool:
        return n.op_type == op and n.domain in ("", "ai.onnx")

    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    todo = [n for n in model.graph.node if (ours(n, "Sum") and len(n.input) >= 2) or (
        ours(n, "Dropout") and len(n.input) == 1 and not set(n.output[1:]) & used)]
    if not todo:
        return model
    model = onnx.ModelProto.FromString(model.SerializeToString())
    nodes = []
    for i, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}#{i}"
        if ours(node, "Dropout") and len(node.input) == 1 and not set(node.output[1:]) & used:
            nodes.append(helper.make_node("Identity", [node.input[0]], [node.output[0]],
                                          name=name))
        elif ours(node, "Sum") and len(node.input) >= 2:
            acc = node.input[0]
            for k, term in enumerate(node.input[1:], start=1):
                out = node.output[0] if k == len(node.input) - 1 else f"{name}__sum{k}"
                nodes.append(helper.make_node("Add", [acc, term], [out], name=f"{name}__add{k}"))
                acc = out
        else:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def to_relax(model: onnx.ModelProto, specs: Sequence[TensorSpec]):
    """Import an ONNX model into a Relax IRModule with static input shapes: what both compiling
    and tuning lower. Rewrites on the way: ``_plain_ops`` (ONNX), slow scalar math
    (``edgekit._fast_math``), grouped convs split (``edgekit._grouped_conv``), convs to
    NHWC (``_channels_last``)."""
    from tvm.relax.frontend import onnx as relax_onnx

    model = _plain_ops(_lift_constants(model))
    missing = unsupported_nodes(model)
    if missing:
        ops = sorted({op for op, _ in missing})
        where = ", ".join(f"{name} ({op})" for op, name in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise EdgekitError(
            f"TVM cannot convert {len(missing)} node(s), ops {', '.join(ops)}: {where}{more}")
    try:
        mod = relax_onnx.from_onnx(
            model,
            shape_dict={s.name: list(s.shape) for s in specs},
            dtype_dict={s.name: s.dtype for s in specs},
        )
    except Exception as exc:
        raise EdgekitError(f"TVM's ONNX import failed: {last_line(exc)}") from exc
    return _channels_last(fast_math(_bounded_take(mod)))


def _bounded_take(mod):
    """Gather (``relax.take``) in ``clip`` mode instead of TVM's default ``fast`` mode.

    Why: ``fast`` reads out of bounds (a segfault or wild memory) when an index is out of
    range, and warns about it once per Gather at build time. ``clip`` costs a min/max per index.
    In-range indices give the same result; the runtime refuses out-of-range token-id inputs
    before they get here (``runtime.CompiledModel``), and computed indices clamp instead of
    crashing the process."""
    from tvm import relax
    from tvm.relax import PyExprMutator, expr_functor

    @expr_functor.mutator
    class _Clip(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if getattr(call.op, "name", "") == "relax.take" and call.attrs.mode == "fast":
                return relax.op.take(call.args[0], call.args[1], call.attrs.axis, mode="clip")
            return call

    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            mod[gv] = _Clip().visit_expr(func)
    return mod


def _channels_last(mod):
    """2-D convolutions in NHWC with HWIO weights (Relax ``ConvertLayout``; transposes of the
    constant weights fold away, activations are transposed once at the graph's edges).

    Why: in NCHW the innermost output axis of a conv is the output width (7, 14, 56 pixels):
    short, rarely a multiple of the vector width, so default schedules vectorize badly. In
    NHWC/HWIO it is the output channel, contiguous in both output and weights, and a conv
    becomes a matmul-like kernel (``edgekit._tiling``). Elementwise ops, pooling and
    residual adds between convs follow the layout; only the summation order inside each
    conv changes (channels innermost)."""
    from tvm import relax

    try:
        # Decomposing first (lowering does it anyway): BatchNorm becomes elementwise ops,
        # which follow any layout.
        mod = split_groups(relax.transform.DecomposeOpsForInference()(mod))
        return relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "HWIO"]})(mod)
    except Exception:  # noqa: BLE001 - an op the layout pass cannot follow: keep NCHW
        return mod


def build(mod, target: Target, tuning=None, progress=None, info: dict | None = None):
    """Compile a Relax module for ``target`` and return the executable. On CPU targets the
    kernels are scheduled first (``edgekit.tune.prepare``: tuning when ``tuning.tune``,
    records from the tuning database, default schedules); ``info`` receives that record."""
    import tvm

    if target.device == "cpu":
        from edgekit import tune

        mod, record = tune.prepare(mod, target, tuning, progress or (lambda _msg: None))
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
