"""ln-to-rmsnorm: a trained Pre-LN transformer becomes Pre-RMSNorm, exactly (techniques.md §2).

Two identities: ``LN(x) = LN(x − mean(x))`` (LN ignores the per-token mean), and
``LN(x) = RMSNorm(x)`` with the same ε when ``mean(x) = 0``. The rewrite:

1. Find the residual stream: the Add tree the LayerNorms read, ending at its writers
   (``_residual.trace_stream``: embedding tables, positional / cls constants, biases, MatMul /
   Gemm / Conv weights).
   A per-channel scale on a branch (LayerScale, ``(x·W + c) ⊙ s`` before the residual Add) is
   folded into its writer first: ``W·diag(s)``, ``c ⊙ s`` (one that cannot be is skipped, with
   the reason).
2. Recentre every writer over the normalized (channel) axis: constants ``c − mean(c)``, linear
   writers ``W − W.mean(output axis)`` (``x @ W`` layout: the last axis; Conv: output channels).
   The stream is then zero-mean per token and, by the first identity, no LN output changes.
3. Fold each LN's γ/β into the linear layers reading it (as ``fold-ln-affine``; a reader weight
   shared with another node is copied). Where a reader is not linear or the LN output is a graph
   output, γ/β stay as Mul/Add after the RMSNorm, which is still exact.
4. Replace each LN by RMSNorm with the same ε: ``x / sqrt(ReduceMean(x², -1) + ε)`` written as
   Pow, ReduceMean, Add, Sqrt, Div. Both onnxruntime (1.32) and TVM 0.27's Relax ONNX frontend
   also implement the opset-23 ``RMSNormalization`` op; with ``fused=True`` it is used when the
   model already imports opset ≥ 23. The pass never raises a model's opset (ops changed meaning
   between 18 and 23: DFT-20, GridSample-20, GroupNormalization-21), so exported opset-18/20
   models get the decomposition, which every backend converts.

Exact in exact arithmetic; in floating point only rounding differs. Tied weights: a constant a
writer shares with another node (GPT-2's token embedding is also its LM head) is copied before
it is recentred (the other node keeps the original), and its name is listed in
``details["untied"]``.

Refused (``PassRefused``, naming the node): Post-LN graphs such as BERT, where an LN output is
the stream itself; any read of a stream value that does not go through a LayerNormalization;
writers that are not linear with constant weights; LNs over more than the last axis.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgekit.passes import _ir
from edgekit.passes import _residual as rs
from edgekit.passes._norm_affine import fold_into, layer_norm_affine, linear_readers
from edgekit.passes.core import Pass, PassContext, PassRefused, PassReport

DECOMPOSED = "Pow, ReduceMean, Add, Sqrt, Div"


def recentre(b: _ir.Builder, stream: rs.Stream) -> list[str]:
    """Subtract each writer's mean over the channel axis; returns the constants it untied."""
    untied = []
    for slot in stream.slots:
        value = slot.node.inputs[slot.index]
        arr = _ir.const_array(value)
        if slot.axis is None:  # uniform along the channel: its centred version is zero
            new = np.zeros_like(arr)
        else:
            wide = arr.astype(np.float64)
            new = (wide - wide.mean(axis=slot.axis, keepdims=True)).astype(arr.dtype)
        if len(value.uses()) > 1 or value.is_graph_output():
            untied.append(value.name)
        b.set_const(slot.node, slot.index, new)
    return untied


def fold_layer_scales(b: _ir.Builder, graph: ir.Graph, report: PassReport) -> list[str]:
    """LayerScale ``(x·W + c) ⊙ s`` feeding an Add becomes ``x·(W·diag(s)) + c ⊙ s`` (exact).

    Recipe step 2: a per-channel scale on a branch would otherwise hide its writer. A
    per-channel Mul feeding an Add that cannot be folded is skipped, with the reason.
    """
    folded = []
    for mul in [n for n in graph if n.op_type == "Mul" and n.domain == ""]:
        if not any(u.node.op_type == "Add" for u in mul.outputs[0].uses()):
            continue
        i = next((i for i in (0, 1) if _per_channel(_ir.const_array(mul.inputs[1 - i]))), None)
        if i is None:
            continue  # scalars need no fold: they keep the stream's mean zero
        s = _ir.const_array(mul.inputs[1 - i]).reshape(-1).astype(np.float64)
        linear = _linear(mul.inputs[i])
        if not isinstance(linear, str):
            node, bias = linear
            w = _ir.const_array(node.inputs[1])
            axis = 0 if node.op_type == "Gemm" and _ir.attr(node, "transB", 0) else w.ndim - 1
            if w.shape[axis] != s.size:
                linear = (f"its {s.size} channels are not the {w.shape[axis]} outputs of "
                          f"{node.name!r}")
        if isinstance(linear, str):
            report.skip(mul.name, f"per-channel scale not folded into its writer: {linear}")
            continue
        shape = [-1 if a == axis else 1 for a in range(w.ndim)]
        b.set_const(node, 1, (w * s.reshape(shape)).astype(w.dtype))
        if bias is not None:
            c = _ir.const_array(bias[0].inputs[bias[1]])
            b.set_const(*bias, (c * s).astype(c.dtype))
        b.redirect(mul.outputs[0], mul.inputs[i])
        graph.remove(mul, safe=True)
        folded.append(mul.name)
    return folded


def _per_channel(scale: np.ndarray | None) -> bool:
    return scale is not None and 1 < scale.size == scale.shape[-1]


def _linear(y: ir.Value) -> tuple[ir.Node, tuple[ir.Node, int] | None] | str:
    """``y`` = MatMul / Gemm with a constant weight (+ a constant bias), used only once; else
    why not."""
    node, bias = y.producer(), None
    if len(y.uses()) != 1:
        return f"{y.name!r} is also read by another node"
    if node is None:
        return f"{y.name!r} is not computed by a node"
    if node.op_type == "Add":
        i = next((i for i in (0, 1) if _ir.const_array(node.inputs[i]) is not None), None)
        inner = node.inputs[1 - i] if i is not None else None
        if inner is None:
            return f"Add {node.name!r} adds no constant bias"
        if len(inner.uses()) != 1 or inner.producer() is None:
            return f"{inner.name!r} is not a layer output read only by the bias Add"
        node, bias = inner.producer(), (node, i)
    if node.op_type == "Gemm" and _ir.index_of(node, 2):
        if bias:
            return f"Gemm {node.name!r} has a bias C and another bias Add after it"
        bias = (node, 2)
        if _ir.const_array(node.inputs[2]) is None:
            return f"the bias C of Gemm {node.name!r} is not a constant"
    if node.op_type not in ("MatMul", "Gemm") or _ir.const_array(node.inputs[1]) is None:
        return f"{node.op_type} {node.name!r} is not a MatMul/Gemm with a constant weight"
    return node, bias


def emit_rms(b: _ir.Builder, at: ir.Node, x: ir.Value, eps: float, gamma: np.ndarray | None,
             beta: np.ndarray | None, fused: bool, stash: int = 1) -> ir.Value:
    """``RMSNorm(x)·γ + β`` over the last axis, inserted before ``at``; γ/β may be None."""
    dtype = (gamma if gamma is not None else _ir.const_array(at.inputs[1])).dtype
    hint, shape = at.name, x.shape
    b = b.at(at, like=x)
    if fused and b.opset >= 23:
        scale = b.const(gamma if gamma is not None else np.ones(x.shape[-1], dtype),
                        f"{hint}_scale")
        stash = 11 if dtype == np.float64 else stash  # stash 1 would compute fp64 in fp32
        y = b.op("RMSNormalization", [x, scale], {"axis": -1, "epsilon": eps,
                                                  "stash_type": stash}, shape=shape)
    else:
        square = b.op("Pow", [x, b.scalar(2, dtype, "two")], shape=shape)
        mean = b.reduce("ReduceMean", square, -1,
                        shape=[*shape[:-1], 1] if shape is not None else None)
        mean = b.op("Add", [mean, b.scalar(eps, dtype, "eps")], shape=mean.shape)
        rms = b.op("Sqrt", [mean], shape=mean.shape)
        y = b.op("Div", [x, rms], shape=shape)
        if gamma is not None and not np.all(gamma == 1):
            y = b.op("Mul", [y, b.const(gamma, f"{hint}_scale")], shape=shape)
    if beta is not None and np.any(beta):
        y = b.op("Add", [y, b.const(beta, f"{hint}_bias")], shape=shape)
    return y


def apply(model: ir.Model, ctx: PassContext, *, fused: bool = True) -> PassReport:
    report = ctx.report
    _ir.ensure_shapes(model)
    graph = model.graph
    lns = [n for n in graph if n.op_type == "LayerNormalization" and n.domain in ("", "ai.onnx")]
    if not lns:
        raise PassRefused("the model has no LayerNormalization")
    affine = {}
    for ln in lns:
        gamma, beta, why = layer_norm_affine(ln)
        if why:
            raise PassRefused(f"LayerNormalization {ln.name!r}: {why}", ln.name)
        affine[ln] = (gamma, beta)
    b = _ir.Builder(graph)
    layer_scales = fold_layer_scales(b, graph, report)
    if layer_scales:
        report.change("fold-layer-scale", len(layer_scales))
    stream = rs.trace_stream([(ln.inputs[0], affine[ln][0].size) for ln in lns], set(lns),
                             {ln.outputs[0]: ln for ln in lns}, "a LayerNormalization")
    writers = [s.label for s in stream.slots]
    untied = recentre(b, stream)
    report.change("recentre-writer", len(stream.slots))
    opset = _ir.onnx_opset(model)
    kept = []
    for ln in lns:
        gamma, beta = affine[ln]
        readers, why = linear_readers(ln.outputs[0], gamma.size)
        if np.all(gamma == 1) and (beta is None or not np.any(beta)):
            gamma = beta = None  # nothing to fold
        elif why:
            kept.append(ln.name)
            report.skip(ln.name, f"affine kept as Mul/Add after the RMSNorm: {why}")
        else:
            untied += [w.name for r in readers if len((w := r.node.inputs[1]).uses()) > 1]
            fold_into(b, readers, gamma, beta)  # new constants: shared weights get untied
            report.change("fold-ln-affine")
            gamma = beta = None
        y = emit_rms(b, ln, ln.inputs[0], _ir.attr(ln, "epsilon", 1e-5), gamma, beta, fused,
                     _ir.attr(ln, "stash_type", 1))
        b.redirect(ln.outputs[0], y)
        graph.remove(ln, safe=True)
        report.change("ln-to-rmsnorm")
    report.details.update({
        "form": ("RMSNormalization (opset 23)" if fused and opset >= 23 else
                 f"decomposed: {DECOMPOSED} (model opset {opset}"
                 + (")" if not fused else "; RMSNormalization needs opset 23, not raised)")),
        "recentred_writers": writers,
        "untied": sorted(set(untied)),
        "affine_kept": kept,
    })
    return report


PASS = Pass(
    name="ln-to-rmsnorm",
    summary="Pre-LN -> Pre-RMSNorm: recentre residual writers, fold LN affine (exact)",
    exact=True,
    apply=apply,
)
