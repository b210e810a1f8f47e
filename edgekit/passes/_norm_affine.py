"""Folding a norm's per-channel affine into the linear layers that read the normalized tensor.

Shared by fold-ln-affine, ln-to-rmsnorm and rmsnorm-to-crmsnorm. With ``y = (γ ⊙ n + β)·W + b``
for every reader (MatMul ``x @ W`` with a constant W and an optional constant bias Add, or
Gemm), ``y = n·(diag(γ)·W) + (b + β·W)``:

* ``layer_norm_affine``: γ, β of a last-axis LayerNormalization, or why it has none usable;
* ``linear_readers``: every linear layer reading a value, through ops that only pick or move
  rows and keep the normalized axis last (Gather/Slice on other axes, Reshape/Squeeze/
  Unsqueeze/Flatten keeping it, Transpose fixing it, Identity), or the first reason one is
  not (a graph output, a non-linear reader, a weight that is not a constant matrix);
* ``shared_weight``: why folding would also change another node, if it would;
* ``fold_into``: the fold itself, with new constants (shared weights are untied, not edited):
  ``W' = diag(γ)·W`` and ``b' = b + β·W`` in float64, cast back to W's dtype; the bias joins an
  existing one (Gemm's C with its alpha/beta, a MatMul's bias Add) or is added after.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from edgekit.passes import _ir


@dataclass(frozen=True)
class Reader:
    """A linear layer reading a normalized tensor as its left operand."""

    node: ir.Node  # MatMul or Gemm
    axis: int  # the weight axis that contracts with the normalized axis
    path: tuple[ir.Node, ...]  # row-picking ops between the norm output and the layer


def layer_norm_affine(node: ir.Node) -> tuple[np.ndarray, np.ndarray | None, str]:
    """(γ, β or None, "") of a last-axis LayerNormalization, or (…, reason) if unusable."""
    rank = len(_ir.dims(node.inputs[0]))
    gamma = _ir.const_array(node.inputs[1])
    beta = _ir.const_array(node.inputs[2]) if _ir.index_of(node, 2) else None
    if _ir.attr(node, "axis", -1) % rank != rank - 1:
        return np.empty(0), None, "it normalizes over more than the last axis"
    if gamma is None or gamma.ndim != 1 or (_ir.index_of(node, 2) and beta is None):
        return np.empty(0), None, "its scale or bias is not a constant vector"
    if any(v.uses() or v.is_graph_output() for v in node.outputs[1:]):
        return np.empty(0), None, "its mean / inverse-std outputs are used"
    return gamma, beta, ""


def linear_readers(value: ir.Value, width: int) -> tuple[list[Reader], str]:
    """All linear readers of ``value`` (through row-picking ops), or ([], reason)."""
    readers: list[Reader] = []
    todo: list[tuple[ir.Value, tuple[ir.Node, ...]]] = [(value, ())]
    while todo:
        v, path = todo.pop()
        if v.is_graph_output():
            return [], f"{v.name!r} is a graph output"
        for use in v.uses():
            node = use.node
            axis = _contraction_axis(node, width) if use.idx == 0 else None
            if isinstance(axis, int):
                readers.append(Reader(node, axis, path))
            elif isinstance(axis, str):
                return [], axis
            elif use.idx == 0 and _keeps_last_axis(node, v):
                todo.append((node.outputs[0], (*path, node)))
            else:
                return [], (f"reader {node.name!r} ({node.op_type}) is not a linear layer "
                            "with a constant weight")
    return readers, ""


def shared_weight(readers: list[Reader]) -> str:
    """Reason if some reader's weight is also used by another node, else ""."""
    for r in readers:
        weight = r.node.inputs[1]
        others = [u.node for u in weight.uses() if u.node is not r.node]
        if others or weight.is_graph_output():
            other = others[0].name if others else "the graph outputs"
            return f"weight {weight.name!r} of {r.node.name!r} is shared with {other!r}"
    return ""


def fold_into(b: _ir.Builder, readers: list[Reader], gamma: np.ndarray,
              beta: np.ndarray | None) -> None:
    """``W' = diag(γ)·W`` and ``b' = b + β·W`` for every reader (new constants)."""
    for r in readers:
        w0 = _ir.const_array(r.node.inputs[1])
        w = w0.astype(np.float64)
        scale = gamma.astype(np.float64).reshape([-1 if i == r.axis else 1 for i in range(2)])
        b.set_const(r.node, 1, (w * scale).astype(w0.dtype))
        if beta is not None and np.any(beta):
            _add_bias(b, r.node, np.tensordot(beta.astype(np.float64), w, ([0], [r.axis])))


def _add_bias(b: _ir.Builder, node: ir.Node, extra: np.ndarray) -> None:
    out = node.outputs[0]
    dtype = _ir.const_array(node.inputs[1]).dtype
    if node.op_type == "Gemm" and _ir.attr(node, "beta", 1.0) != 0:
        c_extra = extra * _ir.attr(node, "alpha", 1.0) / _ir.attr(node, "beta", 1.0)
        c = _ir.const_array(node.inputs[2]) if _ir.index_of(node, 2) else None
        if not _ir.index_of(node, 2):
            node.resize_inputs(3)
            b.set_const(node, 2, c_extra.astype(dtype))
            return
        if c is not None:
            b.set_const(node, 2, (c + c_extra).astype(c.dtype))
            return
    elif node.op_type == "MatMul":
        uses = list(out.uses())
        if len(uses) == 1 and uses[0].node.op_type == "Add" and not out.is_graph_output():
            add, i = uses[0].node, 1 - uses[0].idx
            bias = _ir.const_array(add.inputs[i])
            if bias is not None and np.broadcast_shapes(bias.shape, extra.shape) == bias.shape:
                b.set_const(add, i, (bias + extra).astype(bias.dtype))
                return
    extra *= _ir.attr(node, "alpha", 1.0) if node.op_type == "Gemm" else 1.0
    bias = b.const(extra.astype(dtype), f"{node.name}_bias")
    new = b.op("Add", [out, bias], at=node, after=True, like=out, shape=out.shape)
    b.redirect(out, new)


def _contraction_axis(node: ir.Node, width: int) -> int | str | None:
    """The weight axis a MatMul/Gemm contracts with the normalized axis, or why it cannot
    take a fold; None when ``node`` is no MatMul/Gemm at all."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm"):
        return None
    w = _ir.const_array(node.inputs[1])
    if w is None or w.ndim != 2:
        return f"the weight of {node.name!r} ({node.op_type}) is not a constant matrix"
    if node.op_type == "Gemm" and _ir.attr(node, "transA", 0):
        return f"Gemm {node.name!r} transposes the normalized input (transA=1)"
    axis = 1 if node.op_type == "Gemm" and _ir.attr(node, "transB", 0) else 0
    if w.shape[axis] != width:
        return (f"the weight of {node.name!r} ({node.op_type}) is {w.shape[0]}x{w.shape[1]}: "
                f"it does not contract a width of {width}")
    return axis


def _keeps_last_axis(node: ir.Node, value: ir.Value) -> bool:
    """Whether ``node`` only picks or moves rows of ``value`` (its input 0), last axis kept."""
    if node.domain not in ("", "ai.onnx") or not node.outputs:
        return False
    rank, op = len(_ir.dims(value)), node.op_type
    if op == "Identity":
        return True
    if op == "Transpose":
        return _ir.attr(node, "perm", list(reversed(range(rank))))[-1] == rank - 1
    if op == "Gather":
        return _ir.attr(node, "axis", 0) % rank != rank - 1
    if op == "Slice":
        axes = _ir.sliced_axes(node, rank)
        return axes is not None and rank - 1 not in axes
    if op in ("Reshape", "Squeeze", "Unsqueeze", "Flatten"):
        out = _ir.dims(node.outputs[0])
        return _ir.map_reshape(_ir.dims(value), out, len(out) - 1) == rank - 1
    return False
