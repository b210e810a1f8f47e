"""Recognising an RMSNorm in a graph, for the passes that rewrite one.

``match_norm(node)`` starts at an opset-23 RMSNormalization (last axis, constant scale) or at
the ReduceMean of the decomposition ``x / sqrt(ReduceMean(x², -1) + ε)``: the square as
``Pow(x, 2)`` or ``Mul(x, x)``, the inverse root as Sqrt+Div, Sqrt+Reciprocal+Mul or
Pow(-0.5)+Mul (what ``ln-to-rmsnorm`` emits and common exporters write), each intermediate
read only by the next step. A following ``Mul(γ)`` and/or ``Add(β)`` with constant
per-channel vectors is absorbed into the match. A candidate that is not such a norm gets the
reason back instead (as onnxscript's ``MatchResult.fail``), so the pass can report it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from edgekit.passes import _ir

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


def match_norm(node: ir.Node) -> Norm | str | None:
    """The RMSNorm starting at ``node`` (RMSNormalization or the decomposition's ReduceMean),
    else why it is none; None when ``node`` is neither op."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("RMSNormalization",
                                                                  "ReduceMean"):
        return None
    if node.op_type == "RMSNormalization":
        x, scale = node.inputs[0], _ir.const_array(node.inputs[1])
        width, rank = _ir.dims(x)[-1], len(_ir.dims(x))
        if _ir.attr(node, "axis", -1) % rank != rank - 1:
            return "it normalizes over more than the last axis"
        if scale is None or scale.size != width:
            return "its scale is not a constant vector over the last axis"
        if len(node.outputs) != 1:
            return f"it has {len(node.outputs)} outputs"
        norm = Norm(node, x, node.outputs[0], width, _ir.attr(node, "epsilon", 1e-5), [node],
                    [node.outputs[0]], None if np.all(scale == 1) else scale.reshape(-1))
        return _affine_tail(norm)
    if _ir.attr(node, "keepdims", 1) != 1:
        return "not an RMSNorm's mean square: keepdims=0"
    square = node.inputs[0].producer()
    if square is None or _only_use(square.outputs[0]) is not node:
        return (f"not an RMSNorm's mean square: its input {node.inputs[0].name!r} is not a "
                "square read only by it")
    x = square.inputs[0]
    if not ((square.op_type == "Pow" and _scalar(square.inputs[1]) == 2)
            or (square.op_type == "Mul" and square.inputs[1] is x)):
        return (f"not an RMSNorm's mean square: its input comes from {square.op_type} "
                f"{square.name!r}, not Pow(x, 2) or Mul(x, x)")
    width, rank = _ir.dims(x)[-1], len(_ir.dims(x))
    if not isinstance(width, int):
        return f"the normalized width of {x.name!r} is not static"
    if _ir.axes_of(node, rank) != [rank - 1]:
        return "it averages over more than (or other than) the last axis"
    add = _only_use(node.outputs[0])
    eps = None
    if add is not None and add.op_type == "Add":
        eps = _scalar(add.inputs[1] if add.inputs[0] is node.outputs[0] else add.inputs[0])
    if eps is None:
        return "the mean square is not followed by + eps (one Add of a constant scalar)"
    chain, v = [square, node, add], add.outputs[0]
    while len(chain) < 6:
        nxt = _only_use(v)
        if nxt is None or v not in nxt.inputs[:2]:
            return f"{v.name!r} is not read by one node of x / sqrt(mean(x^2) + eps)"
        chain.append(nxt)
        ops = tuple(n.op_type for n in chain[3:])
        if ops in _INVERSE_ROOTS and x in nxt.inputs[:2] and (ops[-1] == "Mul" or
                                                            nxt.inputs[0] is x):
            values = [n.outputs[0] for n in chain]
            return _affine_tail(Norm(square, x, nxt.outputs[0], width, eps,
                                     [square, nxt], values))
        if nxt.op_type == "Pow" and _scalar(nxt.inputs[1]) != -0.5:
            return f"Pow {nxt.name!r} after + eps does not raise to -0.5"
        v = nxt.outputs[0]
    chain_ops = ", ".join(n.op_type for n in chain[3:])
    return (f"+ eps is followed by {chain_ops}, not x divided by its root (Sqrt+Div, "
            "Sqrt+Reciprocal+Mul or Pow(-0.5)+Mul)")


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
