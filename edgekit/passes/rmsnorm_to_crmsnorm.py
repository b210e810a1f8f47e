"""rmsnorm-to-crmsnorm: Pre-RMSNorm -> Pre-CRMSNorm, a residual stream one channel narrower.

Precondition: the stream is zero-mean over its channel axis, so x_d = -sum_{i<d} x_i is redundant.
With z = x[:d-1], sum_i x_i^2 = sum z_i^2 + (sum z_i)^2, hence

    RMSNorm(x)[:d-1] = CRMSNorm(z) = z / sqrt((sum z^2 + (sum z)^2) / d + eps)
    RMSNorm(x) @ W   = CRMSNorm(z) @ (W[:-1] - W[-1:])       (ONNX x @ W layout)

1. Recognise the norms: opset-23 RMSNormalization (last axis, constant scale) or the
   decomposition x / sqrt(ReduceMean(x^2, -1) + eps), square as Pow(x, 2) or Mul(x, x), the
   inverse root as Sqrt+Div, Sqrt+Reciprocal+Mul or Pow(-0.5)+Mul, optionally followed by
   Mul(gamma) and Add(beta): what ``ln-to-rmsnorm`` emits and what common exporters write.
2. Trace the residual stream they read (``_residual.trace_stream``) and CHECK the precondition
   on the weights, since nothing else can prove it: every writer's output sums to ~0 over the
   channel, |sum_c w| <= tol * sum_c |w| per weight row / embedding row / constant
   (tol = ``zero_mean_tol``, default 1e-4; recentred fp32 weights measure ~1e-7).
   A writer that fails is named in the refusal (run ``ln-to-rmsnorm`` on the LayerNorm model).
3. Writers drop their last output channel (W[..., :-1], b[:-1], E[:, :-1], Conv W[:-1]);
   Reshape/Expand shape constants on the stream that spell the width d become d-1.
4. Each norm becomes CRMSNorm with the original d and eps. gamma/beta are folded into linear
   readers (as ``fold-ln-affine``), whose weights then become W[:-1] - W[-1:]. A norm whose
   output is a graph output or reaches a non-linear reader keeps its width: the last
   coordinate is rebuilt as -sum of the others (Concat), then gamma/beta; same output shape.

Exact in exact arithmetic. Run it in fp32 or wider: the (sum z)^2 term loses precision to
cancellation in fp16/bf16 (techniques.md §2).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from edgekit.passes import _ir
from edgekit.passes import _residual as rs
from edgekit.passes.core import Pass, PassContext, PassRefused, PassReport
from edgekit.passes.fold_ln_affine import Reader, fold_into, linear_readers

# the ops between "ReduceMean(x^2) + eps" and the final op that reads x again
_INVERSE_ROOTS = {("Sqrt", "Div"), ("Sqrt", "Reciprocal", "Mul"), ("Pow", "Mul")}


@dataclass
class Norm:
    first: ir.Node  # the node everything new is inserted before
    x: ir.Value
    y: ir.Value  # the final output (after gamma/beta)
    width: int
    eps: float
    reads: list[ir.Node]  # the nodes that read x
    values: list[ir.Value] = field(default_factory=list)  # every value the norm computes
    gamma: np.ndarray | None = None
    beta: np.ndarray | None = None


def _scalar(value: ir.Value | None) -> float | None:
    arr = _ir.const_array(value)
    return float(arr.reshape(-1)[0]) if arr is not None and arr.size == 1 else None


def _only_use(value: ir.Value) -> ir.Node | None:
    uses = list(value.uses())
    return uses[0].node if len(uses) == 1 and not value.is_graph_output() else None


def match_norm(node: ir.Node) -> Norm | None:
    """The RMSNorm starting at ``node`` (RMSNormalization or the decomposition's ReduceMean)."""
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "RMSNormalization":
        x, scale = node.inputs[0], _ir.const_array(node.inputs[1])
        width, rank = _ir.dims(x)[-1], len(_ir.dims(x))
        if (_ir.attr(node, "axis", -1) % rank != rank - 1 or scale is None
                or scale.size != width or len(node.outputs) != 1):
            return None
        norm = Norm(node, x, node.outputs[0], width, _ir.attr(node, "epsilon", 1e-5), [node],
                    [node.outputs[0]], None if np.all(scale == 1) else scale.reshape(-1))
        return _affine_tail(norm)
    if node.op_type != "ReduceMean" or _ir.attr(node, "keepdims", 1) != 1:
        return None
    square = node.inputs[0].producer()
    if square is None or _only_use(square.outputs[0]) is not node:
        return None
    x = square.inputs[0]
    if not ((square.op_type == "Pow" and _scalar(square.inputs[1]) == 2)
            or (square.op_type == "Mul" and square.inputs[1] is x)):
        return None
    width, rank = _ir.dims(x)[-1], len(_ir.dims(x))
    add = _only_use(node.outputs[0])
    if (not isinstance(width, int) or _ir.axes_of(node, rank) != [rank - 1] or add is None
            or add.op_type != "Add"):
        return None
    eps = _scalar(add.inputs[1] if add.inputs[0] is node.outputs[0] else add.inputs[0])
    chain, v = [square, node, add], add.outputs[0]
    while eps is not None and len(chain) < 6:
        nxt = _only_use(v)
        if nxt is None or v not in nxt.inputs[:2]:
            return None
        chain.append(nxt)
        ops = tuple(n.op_type for n in chain[3:])
        if ops in _INVERSE_ROOTS and x in nxt.inputs[:2] and (ops[-1] == "Mul" or
                                                            nxt.inputs[0] is x):
            values = [n.outputs[0] for n in chain]
            return _affine_tail(Norm(square, x, nxt.outputs[0], width, eps,
                                     [square, nxt], values))
        if nxt.op_type == "Pow" and _scalar(nxt.inputs[1]) != -0.5:
            return None
        v = nxt.outputs[0]
    return None


def _affine_tail(norm: Norm) -> Norm:
    """Absorb a following Mul(gamma) and/or Add(beta) with constant per-channel vectors."""
    for op in ("Mul", "Add"):
        nxt = _only_use(norm.y)
        if nxt is None or nxt.op_type != op or nxt.domain not in ("", "ai.onnx"):
            continue
        other = nxt.inputs[1] if nxt.inputs[0] is norm.y else nxt.inputs[0]
        arr = _ir.const_array(other)
        if arr is None or arr.size != norm.width or arr.shape[-1] != norm.width:
            continue
        if op == "Mul":
            norm.gamma = arr.reshape(-1) * (1 if norm.gamma is None else norm.gamma)
        else:
            norm.beta = arr.reshape(-1)
        norm.y = nxt.outputs[0]
        norm.values.append(norm.y)
    return norm


def zero_mean_error(slot: rs.Slot) -> float:
    """max |sum_c w| / sum_c |w| over the rows of a writer (inf: uniform and non-zero)."""
    arr = _ir.const_array(slot.node.inputs[slot.index]).astype(np.float64)
    if slot.axis is None:
        return float("inf") if np.any(arr) else 0.0
    total, scale = np.abs(arr.sum(axis=slot.axis)), np.abs(arr).sum(axis=slot.axis)
    return float(np.max(total / np.where(scale > 0, scale, 1.0), initial=0.0))


def _narrow_shapes(nodes: list[ir.Node], axis_of) -> list[tuple[ir.Node, np.ndarray]]:
    """New shape constants for Reshape/Expand whose output has the width on ``axis_of(out)``."""
    edits = []
    for node in nodes:
        if node.op_type not in ("Reshape", "Expand"):
            continue
        out = node.outputs[0]
        axis, width = axis_of(out)
        shape = _ir.const_array(node.inputs[1])
        if shape is None:
            raise PassRefused(f"{node.name!r} ({node.op_type}) has a computed shape, so the "
                              "normalized width cannot be narrowed", node.name)
        pos = axis - (len(_ir.dims(out)) - shape.size)
        if pos >= 0 and shape[pos] == width:
            new = shape.copy()
            new[pos] = width - 1
            edits.append((node, new))
    return edits


def _narrow(b: _ir.Builder, edits, values: dict[ir.Value, tuple[int, int]]) -> None:
    for node, shape in edits:
        b.set_const(node, 1, shape)
    for value, (axis, width) in values.items():
        if value.shape is not None:
            value.shape = ir.Shape([width - 1 if i == axis else d
                                    for i, d in enumerate(value.shape)])


def emit_crms(b: _ir.Builder, norm: Norm, opset: int) -> ir.Value:
    x, at, hint = norm.x, norm.first, norm.first.name
    dtype, shape = x.dtype.numpy(), x.shape
    red = [*shape[:-1], 1] if shape is not None else None

    def op(op_type: str, *inputs: ir.Value, out_shape=red) -> ir.Value:
        return b.op(op_type, list(inputs), at=at, hint=hint, like=x, shape=out_shape)

    sum_sq = b.reduce("ReduceSum", op("Pow", x, b.scalar(2, dtype, "two"), out_shape=shape),
                      opset, at=at, hint=hint, shape=red)
    total = b.reduce("ReduceSum", x, opset, at=at, hint=hint, shape=red)
    mean_sq = op("Div", op("Add", sum_sq, op("Mul", total, total)),
                 b.scalar(norm.width, dtype, "width"))
    rms = op("Sqrt", op("Add", mean_sq, b.scalar(norm.eps, dtype, "eps")))
    return op("Div", x, rms, out_shape=shape)


def _narrow_readers(b: _ir.Builder, norm: Norm, readers: list[Reader], opset: int) -> None:
    path = list(dict.fromkeys(n for r in readers for n in r.path))  # unique, in order
    edits = _narrow_shapes(path, lambda v: (len(_ir.dims(v)) - 1, norm.width))
    if norm.gamma is not None or norm.beta is not None:
        gamma = np.ones(norm.width) if norm.gamma is None else norm.gamma
        fold_into(b, readers, gamma, norm.beta)
    for r in readers:
        w = _ir.const_array(r.node.inputs[1])
        wide = w.astype(np.float64)
        last = np.take(wide, [norm.width - 1], axis=r.axis)
        narrow = np.take(wide, range(norm.width - 1), axis=r.axis) - last
        b.set_const(r.node, 1, narrow.astype(w.dtype))
    _narrow(b, edits, {n.outputs[0]: (len(_ir.dims(n.outputs[0])) - 1, norm.width) for n in path})
    b.redirect(norm.y, emit_crms(b, norm, opset))


def _rebuild(b: _ir.Builder, norm: Norm, opset: int) -> None:
    z = emit_crms(b, norm, opset)
    at, hint = norm.first, norm.first.name
    last = b.reduce("ReduceSum", z, opset, at=at, hint=hint)
    last = b.op("Neg", [last], at=at, hint=hint, like=z)
    y = b.op("Concat", [z, last], {"axis": -1}, at=at, hint=hint, like=z)
    if norm.gamma is not None:
        y = b.op("Mul", [y, b.const(norm.gamma, f"{hint}_scale")], at=at, hint=hint, like=z)
    if norm.beta is not None:
        y = b.op("Add", [y, b.const(norm.beta, f"{hint}_bias")], at=at, hint=hint, like=z)
    b.redirect(norm.y, y)


def apply(model: ir.Model, ctx: PassContext, zero_mean_tol: float = 1e-4) -> PassReport:
    report = PassReport()
    _ir.ensure_shapes(model)
    graph = model.graph
    norms = [n for n in map(match_norm, list(graph)) if n is not None]
    if not norms:
        raise PassRefused("no RMSNorm found (RMSNormalization, or x / sqrt(ReduceMean(x^2, -1) "
                          "+ eps)); run ln-to-rmsnorm on a Pre-LN model first")
    stream: rs.Stream = rs.trace_stream(
        [(n.x, n.width) for n in norms], {r for n in norms for r in n.reads},
        {v: n.first for n in norms for v in n.values}, "an RMSNorm")
    worst = 0.0
    for slot in stream.slots:
        err = zero_mean_error(slot)
        if err > zero_mean_tol:
            raise PassRefused(
                f"writer {slot.label} is not zero-mean over the normalized axis "
                f"(|sum| / sum|.| = {err:.3g} > {zero_mean_tol:g}): CRMSNorm needs a "
                "recentred stream (ln-to-rmsnorm produces one)", slot.node.name)
        worst = max(worst, err)
    b = _ir.Builder(graph)
    _narrow(b, _narrow_shapes(stream.nodes, stream.axes.__getitem__), stream.axes)
    for slot in stream.slots:
        arr = _ir.const_array(slot.node.inputs[slot.index])
        if slot.axis is not None:
            b.set_const(slot.node, slot.index, np.take(arr, range(slot.width - 1), slot.axis))
    report.change("narrow-writer", len(stream.slots))
    opset, rebuilt = _ir.onnx_opset(model), []
    for norm in norms:
        readers, why = linear_readers(norm.y, norm.width)
        if not why:
            try:
                _narrow_readers(b, norm, readers, opset)
                report.change("narrow-reader", len(readers))
            except PassRefused as refusal:
                why = refusal.reason
        if why:
            _rebuild(b, norm, opset)
            rebuilt.append(norm.first.name)
            report.skip(norm.first.name, f"width {norm.width} kept after the norm by "
                        f"rebuilding the last coordinate as -sum of the others: {why}")
        report.change("crmsnorm")
    RemoveUnusedNodesPass()(model)
    report.details.update({
        "width": sorted({f"{n.width} -> {n.width - 1}" for n in norms}),
        "zero_mean_max": worst,
        "rebuilt": rebuilt,
    })
    return report


PASS = Pass(
    name="rmsnorm-to-crmsnorm",
    summary="Pre-RMSNorm -> Pre-CRMSNorm: residual stream one channel narrower (exact)",
    exact=True,
    apply=apply,
    params={"zero_mean_tol": 1e-4},
)
