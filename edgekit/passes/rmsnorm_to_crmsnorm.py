"""rmsnorm-to-crmsnorm: Pre-RMSNorm -> Pre-CRMSNorm, a residual stream one channel narrower.

Precondition: the stream is zero-mean over its channel axis, so x_d = -sum_{i<d} x_i is redundant.
With z = x[:d-1], sum_i x_i^2 = sum z_i^2 + (sum z_i)^2, hence

    RMSNorm(x)[:d-1] = CRMSNorm(z) = z / sqrt((sum z^2 + (sum z)^2) / d + eps)
    RMSNorm(x) @ W   = CRMSNorm(z) @ (W[:-1] - W[-1:])       (ONNX x @ W layout)

1. Recognise the norms: opset-23 RMSNormalization (last axis, constant scale) or the
   decomposition x / sqrt(ReduceMean(x^2, -1) + eps), square as Pow(x, 2) or Mul(x, x), the
   inverse root as Sqrt+Div, Sqrt+Reciprocal+Mul or Pow(-0.5)+Mul, optionally followed by
   Mul(gamma) and Add(beta): what ``ln-to-rmsnorm`` emits and what common exporters write
   (``_rms_norm.match_norm``). Every other RMSNormalization / ReduceMean is skipped with the
   reason it is not one.
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

Exact in exact arithmetic. The (sum z)^2 term loses precision to cancellation in fp16/bf16
(techniques.md §2), so the statistics stay an fp32 island, as the official code keeps them:
every node that computes sum z^2, (sum z)^2, their mean and its root carries the ONNX node
metadata ``edgekit.keep_fp32`` (value: the reason), which ``convert-fp16``/``convert-bf16``
honour. A graph whose stream is already fp16/bf16 is refused: run this pass on the fp32
model, then convert it.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from edgekit.passes import _ir
from edgekit.passes import _residual as rs
from edgekit.passes._norm_affine import Reader, fold_into, linear_readers
from edgekit.passes._rms_norm import Norm, match_norm
from edgekit.passes.core import Pass, PassContext, PassRefused, PassReport


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


KEEP_FP32 = "edgekit.keep_fp32"  # node metadata: the precision converters leave it in fp32
ISLAND_REASON = ("CRMSNorm statistics: (sum z)^2 cancels against sum z^2 in fp16/bf16 "
                 "(rmsnorm-to-crmsnorm)")


def emit_crms(b: _ir.Builder, norm: Norm) -> ir.Value:
    x = norm.x
    dtype, shape = x.dtype.numpy(), x.shape
    red = [*shape[:-1], 1] if shape is not None else None
    b = b.at(norm.first, like=x)
    square = b.op("Pow", [x, b.scalar(2, dtype, "two")], shape=shape)
    sum_sq = b.reduce("ReduceSum", square, shape=red)
    total = b.reduce("ReduceSum", x, shape=red)
    total_sq = b.op("Mul", [total, total], shape=red)
    mean_sq = b.op("Div", [b.op("Add", [sum_sq, total_sq], shape=red),
                           b.scalar(norm.width, dtype, "width")], shape=red)
    with_eps = b.op("Add", [mean_sq, b.scalar(norm.eps, dtype, "eps")], shape=red)
    rms = b.op("Sqrt", [with_eps], shape=red)
    # the statistics are the fp32 island; the final x / rms is well conditioned in fp16
    for value in (square, sum_sq, total, total_sq, mean_sq.producer().inputs[0], mean_sq,
                  with_eps, rms):
        value.producer().metadata_props[KEEP_FP32] = ISLAND_REASON
    return b.op("Div", [x, rms], shape=shape)


def _narrow_readers(b: _ir.Builder, norm: Norm, readers: list[Reader]) -> None:
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
    b.redirect(norm.y, emit_crms(b, norm))


def _rebuild(b: _ir.Builder, norm: Norm) -> None:
    z = emit_crms(b, norm)
    at = b.at(norm.first, like=z)
    last = at.op("Neg", [at.reduce("ReduceSum", z)])
    y = at.op("Concat", [z, last], {"axis": -1})
    if norm.gamma is not None:
        y = at.op("Mul", [y, at.const(norm.gamma, f"{at.hint}_scale")])
    if norm.beta is not None:
        y = at.op("Add", [y, at.const(norm.beta, f"{at.hint}_bias")])
    b.redirect(norm.y, y)


def apply(model: ir.Model, ctx: PassContext, *, zero_mean_tol: float = 1e-4) -> PassReport:
    report = ctx.report
    _ir.ensure_shapes(model)
    graph = model.graph
    norms = []
    for node in list(graph):
        match = match_norm(node)
        if isinstance(match, str):
            report.skip(node.name, match)
        elif match is not None:
            norms.append(match)
    if not norms:
        raise PassRefused("no RMSNorm found (RMSNormalization, or x / sqrt(ReduceMean(x^2, -1) "
                          "+ eps)); run ln-to-rmsnorm on a Pre-LN model first")
    for n in norms:
        if n.x.dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
            raise PassRefused(
                f"the stream read by {n.first.name!r} is {n.x.dtype.name.lower()}: CRMSNorm's "
                "(sum z)^2 cancels in half precision; run this pass on the fp32 model (its "
                "statistics are then marked edgekit.keep_fp32 for convert-fp16)", n.first.name)
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
    rebuilt = []
    for norm in norms:
        readers, why = linear_readers(norm.y, norm.width)
        if not why:
            try:
                _narrow_readers(b, norm, readers)
                report.change("narrow-reader", len(readers))
            except PassRefused as refusal:
                why = refusal.reason
        if why:
            _rebuild(b, norm)
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
)
