"""Shared math and IR helpers of the BatchNorm family (fold-bn, fold-repbn, merge-repvgg).

An inference BatchNormalization, a RepBN ``BN(x) + alpha*x`` and a per-channel Mul/Add are
all one thing: a per-channel affine ``out = a*src + b`` along one channel axis of ``src``
(``ChannelAffine``). ``fold_affine`` removes one, trying in this order:

- into the producer of ``src`` (Conv, ConvTranspose, Gemm, MatMul, MatMul+Add), reached
  through channel-preserving layout ops (Transpose, Reshape, Flatten, Squeeze, Unsqueeze):
  ``W' = diag(a)·W``, ``bias' = a*bias + b`` (a MatMul without bias gets an Add);
- into every consumer of ``out`` (MatMul/Gemm with a constant weight, Conv), reached through
  layout ops and ops that commute with a per-channel affine (ReduceMean, Gather, Slice over
  other axes): ``W' = W·diag(a)``, ``bias' = bias + W·b``. A Conv consumer needs zero pads
  (padding happens after the affine, so a padded border would be ``b``, not 0) or ``b == 0``;
- otherwise (if allowed) into ``Mul(src, a)`` + ``Add(., b)`` with constant vectors.

All math runs in float64 and is cast back to the weight's dtype. A weight read by another
node blocks a fold (rewriting it would change that node); a bias never does (the rewritten
node gets a fresh bias initializer). Every failed attempt returns a specific reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from edgekit.passes._channel_axis import RESHAPES, axis_backward, axis_forward, rank_of
from edgekit.passes._ir import Builder, computed_from_constants, const_array
from edgekit.passes.core import PassReport

# A pass never runs another pass (one constant folder, one ledger entry per rewrite), so a
# parameter that constant folding would produce (the onnx zoo's ConstantOfShape weights) is
# reported with the command that folds it.
FOLD_FIRST = "run fold-constants first (--passes fold-constants,fold-bn)"


def not_constant(value: ir.Value, what: str) -> str:
    """Why ``value`` blocks a fold: not a constant, or not yet one (then how to make it one)."""
    if computed_from_constants(value):
        return (f"{what} is computed from constants ({value.producer().op_type}) but not yet "
                f"one: {FOLD_FIRST}")
    return f"{what} is not a constant"

Plan = Callable[[], tuple[str, ir.Value]]  # applies a fold; returns (rule, value now == out)


@dataclass
class ChannelAffine:
    """``out = scale*src + shift`` along ``axis`` of ``src``, computed by ``nodes``."""

    name: str
    src: ir.Value
    out: ir.Value
    axis: int
    scale: np.ndarray
    shift: np.ndarray
    nodes: list[ir.Node]


def bn_scale_shift(node: ir.Node) -> tuple[np.ndarray, np.ndarray] | str:
    """``s = γ/√(σ²+ε)``, ``t = β − μ·s`` of an inference BatchNormalization, or why not."""
    if node.attributes.get_int("training_mode", 0):
        return "training_mode=1 (batch statistics, not a fixed affine)"
    if len(node.outputs) > 1:
        return f"{len(node.outputs)} outputs (training-mode running statistics)"
    if not node.attributes.get_int("spatial", 1):
        return "spatial=0 (per-element statistics) is not supported"
    params = [const_array(v) for v in node.inputs[1:5]]
    for value, arr in zip(node.inputs[1:5], params, strict=True):
        if arr is None:
            return not_constant(value, f"parameter {value.name!r}")
    gamma, beta, mean, var = (p.astype(np.float64).reshape(-1) for p in params)
    s = gamma / np.sqrt(var + node.attributes.get_float("epsilon", 1e-5))
    return s, beta - mean * s


def other_user(value: ir.Value, allowed: set[ir.Node]) -> str | None:
    """A reader of ``value`` outside ``allowed`` (or the graph output), described."""
    if value.is_graph_output():
        return "the graph output"
    for node, _ in value.uses():
        if node not in allowed:
            return f"{node.op_type} {node.name!r}"
    return None


def _weight(node: ir.Node, index: int) -> np.ndarray | str:
    """A constant weight only ``node`` reads, or why it cannot be rewritten."""
    value = node.inputs[index] if len(node.inputs) > index else None
    arr = const_array(value)
    if value is None:
        return f"the weight of {node.name!r} is not a constant"
    if arr is None:
        return not_constant(value, f"the weight of {node.name!r}")
    for user, _ in value.uses():
        if user is not node and user.op_type != "Shape":  # Shape reads no values
            return f"weight {value.name!r} is shared with node {user.name!r}"
    return arr


def _bias(node: ir.Node, index: int, channels: int) -> np.ndarray | str:
    if len(node.inputs) <= index or node.inputs[index] is None:
        return np.zeros(channels)
    arr = const_array(node.inputs[index])
    if arr is None:
        return not_constant(node.inputs[index], f"bias {node.inputs[index].name!r} of "
                            f"{node.name!r}")
    return arr.astype(np.float64)


def set_input(builder: Builder, node: ir.Node, index: int, arr: np.ndarray,
              base: str) -> None:
    """Make ``arr`` input ``index`` of ``node``: in place if only it reads it, else fresh."""
    old = node.inputs[index] if len(node.inputs) > index else None
    if old is not None and old.is_initializer() and not old.is_graph_input() \
            and all(user is node for user, _ in old.uses()):
        old.const_value = ir.tensor(np.ascontiguousarray(arr), name=old.name)
        old.shape = ir.Shape(arr.shape)
        return
    if len(node.inputs) <= index:
        node.resize_inputs(index + 1)
    node.replace_input_with(index, builder.const(arr, base))


def _add_bias_after(builder: Builder, node: ir.Node, bias: np.ndarray) -> ir.Value:
    """Insert ``Add(node's output, bias)`` and move every reader of the output onto it."""
    out = node.outputs[0]
    const = builder.const(bias, f"{node.name}_bias")
    biased = builder.op("Add", [out, const], at=node, after=True, hint=f"{node.name}_bias",
                        like=out, shape=out.shape)
    builder.redirect(out, biased)
    return biased


def _scale_output(node: ir.Node, w: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Scale the output channels of a Conv/ConvTranspose/Gemm/MatMul weight by ``a``."""
    if node.op_type == "Conv":
        return w * a.reshape((-1,) + (1,) * (w.ndim - 1))
    if node.op_type == "ConvTranspose":  # weight (Cin, Cout/g, k...): output channels per group
        g = node.attributes.get_int("group", 1)
        grouped = w.reshape(g, w.shape[0] // g, *w.shape[1:])
        return (grouped * a.reshape(g, 1, w.shape[1], *(1,) * (w.ndim - 2))).reshape(w.shape)
    trans_b = node.op_type == "Gemm" and node.attributes.get_int("transB", 0)
    return w * (a[:, None] if trans_b else a[None, :])


def _plan_producer(builder: Builder, p: ir.Node, axis: int, rank: int,
                   a: np.ndarray, b: np.ndarray) -> Plan | str:
    mm, bias_at = p, (p, 2)  # the node holding the weight, and where its bias lives
    if p.op_type == "Add":  # MatMul + constant bias
        for i in (0, 1):
            q = p.inputs[i].producer()
            if q is not None and q.op_type == "MatMul" and const_array(p.inputs[1 - i]) is not None:
                mm, bias_at = q, (p, 1 - i)
        if mm is p:
            return f"producer {p.name!r} is an Add, not MatMul + a constant bias"
        user = other_user(mm.outputs[0], {p})
        if user:
            return f"output of {mm.name!r} is also used by {user}"
    elif p.op_type == "MatMul":
        bias_at = None
    op = mm.op_type
    if op not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
        return f"producer {p.name!r} is a {op}, not Conv/ConvTranspose/Gemm/MatMul"
    # Gemm and MatMul put output channels last, convolutions on axis 1.
    if axis != (rank - 1 if op in ("Gemm", "MatMul") else 1) or (op == "Gemm" and rank != 2):
        return f"the channel axis is not the output-channel axis of {mm.name!r}"
    w = _weight(mm, 1)
    if isinstance(w, str):
        return w
    if op == "MatMul" and w.ndim != 2:
        return f"MatMul {mm.name!r} weight is not 2-D"
    bias = _bias(*bias_at, a.size) if bias_at else None
    if isinstance(bias, str):
        return bias

    def apply() -> tuple[str, ir.Value]:
        new_w = _scale_output(mm, w.astype(np.float64), a)
        set_input(builder, mm, 1, new_w.astype(w.dtype), f"{mm.inputs[1].name}_folded")
        if bias_at is None:
            return "into-matmul", _add_bias_after(builder, mm, b.astype(w.dtype))
        beta = p.attributes.get_float("beta", 1.0) if op == "Gemm" else 1.0
        if op == "Gemm":
            p.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        # a and b broadcast on the last axis, where a MatMul/Gemm bias has its channels
        new_b = (a * beta * bias + b).astype(w.dtype)
        set_input(builder, *bias_at, new_b, f"{mm.name}_bias_folded")
        return f"into-{op.lower()}", p.outputs[0]

    return apply


def plan_into_producer(builder: Builder, aff: ChannelAffine) -> Plan | str:
    """Fold ``aff`` into the linear op that produces ``src`` (through layout ops)."""
    value, axis, allowed = aff.src, aff.axis, set(aff.nodes)
    while True:
        user = other_user(value, allowed)
        if user:  # folding upstream would change what that reader sees
            return f"{value.name!r} is also used by {user}"
        p = value.producer()
        if p is None:
            return f"{value.name!r} is a graph input"
        if p.op_type not in ("Transpose", *RESHAPES):
            break
        axis = axis_backward(p, axis)
        if axis is None:
            return f"{p.op_type} {p.name!r} does not keep the channel axis"
        value, allowed = p.inputs[0], {p, *aff.nodes}  # pattern nodes die with the fold
    if rank_of(value) is None:
        return f"rank of {value.name!r} is unknown"
    plan = _plan_producer(builder, p, axis, rank_of(value), aff.scale, aff.shift)
    if isinstance(plan, str):
        return plan

    def apply() -> tuple[str, ir.Value]:
        rule, new_out = plan()
        return rule, new_out if aff.src is p.outputs[0] else aff.src

    return apply


def _plan_consumer(builder: Builder, node: ir.Node, index: int, rank: int,
                   axis: int, a: np.ndarray, b: np.ndarray) -> Callable[[], str] | str:
    op = node.op_type
    if index != 0 or op not in ("MatMul", "Conv", "Gemm") or node.attributes.get_int("transA", 0):
        return f"consumer {node.name!r} ({op}, input {index}) is not a linear layer"
    if axis != (rank - 1 if op == "MatMul" else 1) or (op == "Gemm" and rank != 2):
        return f"the channel axis is not the input-channel axis of {node.name!r}"
    w = _weight(node, 1)
    if isinstance(w, str):
        return w
    w64 = w.astype(np.float64)
    if op == "Conv":
        padded = any(node.attributes.get_ints("pads", [0])) or \
            node.attributes.get_string("auto_pad", "NOTSET").startswith("SAME")
        if padded and np.any(b != 0):
            return (f"Conv {node.name!r} pads its input: zero padding after the affine is "
                    "not zero padding before it")
        g = node.attributes.get_int("group", 1)
        spread = (w.shape[0], w.shape[1]) + (1,) * (w.ndim - 2)

        def per_out(v: np.ndarray) -> np.ndarray:  # output o reads its own group's inputs
            return np.repeat(v.reshape(g, w.shape[1]), w.shape[0] // g, axis=0).reshape(spread)

        new_w, delta = w64 * per_out(a), (w64 * per_out(b)).reshape(w.shape[0], -1).sum(axis=1)
    elif op == "MatMul":
        if w.ndim != 2:
            return f"MatMul {node.name!r} weight is not 2-D"
        new_w, delta = w64 * a[:, None], b @ w64
    else:
        trans_b = node.attributes.get_int("transB", 0)
        new_w = w64 * (a[None, :] if trans_b else a[:, None])
        delta = node.attributes.get_float("alpha", 1.0) * (b @ (w64.T if trans_b else w64))
    bias = _bias(node, 2, delta.size) if op != "MatMul" else None
    if isinstance(bias, str):
        return bias

    def apply() -> str:
        set_input(builder, node, 1, new_w.astype(w.dtype), f"{node.inputs[1].name}_folded")
        if op != "MatMul":
            beta = node.attributes.get_float("beta", 1.0) if op == "Gemm" else 1.0
            if op == "Gemm":
                node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
            set_input(builder, node, 2, (beta * bias + delta).astype(w.dtype),
                      f"{node.name}_bias_folded")
            return f"into-next-{op.lower()}"
        out = node.outputs[0]
        add = out.uses()[0].node if len(out.uses()) == 1 and not out.is_graph_output() else None
        k = next((i for i in (0, 1) if const_array(add.inputs[i]) is not None), None) \
            if add is not None and add.op_type == "Add" else None
        if k is None:
            _add_bias_after(builder, node, delta.astype(w.dtype))
        else:  # MatMul + bias: W·b joins the existing bias (any constant broadcasts the same)
            new_b = const_array(add.inputs[k]).astype(np.float64) + delta
            set_input(builder, add, k, new_b.astype(w.dtype), f"{add.name}_bias_folded")
        return "into-next-matmul"

    return apply


def plan_into_consumers(builder: Builder, aff: ChannelAffine) -> Plan | str:
    """Fold ``aff`` into every linear op reading ``out`` (through commuting ops)."""
    plans, stack = [], [(aff.out, aff.axis)]
    while stack:
        value, axis = stack.pop()
        if value.is_graph_output():
            return f"{value.name!r} is a graph output"
        for node, index in value.uses():
            out_axis = axis_forward(node, axis) if index == 0 else None
            if out_axis is not None:
                stack.append((node.outputs[0], out_axis))
                continue
            if rank_of(value) is None:
                return f"rank of {value.name!r} is unknown"
            plan = _plan_consumer(builder, node, index, rank_of(value), axis, aff.scale,
                                  aff.shift)
            if isinstance(plan, str):
                return plan
            plans.append(plan)
    if not plans:
        return "nothing reads the output"

    def apply() -> tuple[str, ir.Value]:
        return "+".join(sorted({plan() for plan in plans})), aff.src

    return apply


def replace_value(builder: Builder, old: ir.Value, new: ir.Value) -> None:
    """Move every reader of ``old`` to ``new``; a graph output keeps its name."""
    if old.is_graph_output() and not (new.is_graph_input() or new.is_initializer()):
        name = old.name
        old.name = builder.fresh(f"{name}_replaced")
        new.name = name
    old.replace_all_uses_with(new, replace_graph_outputs=True)


def remove_dead(graph: ir.Graph, nodes: list[ir.Node]) -> None:
    """Remove those of ``nodes`` nobody reads any more, so later use checks see the truth."""
    pending, changed = [n for n in nodes if n.graph is graph], True
    while changed:
        changed = False
        for node in list(pending):
            if not any(o.uses() or o.is_graph_output() for o in node.outputs):
                graph.remove(node, safe=True)
                pending.remove(node)
                changed = True


def decompose(builder: Builder, aff: ChannelAffine) -> ir.Value | str:
    """``Mul(src, a)`` then ``Add(., b)``, with ``a``/``b`` shaped to broadcast on the axis."""
    if rank_of(aff.src) is None:
        return f"rank of {aff.src.name!r} is unknown"
    dtype = aff.src.dtype.numpy() if aff.src.dtype is not None else np.float32
    shape = (-1,) + (1,) * (rank_of(aff.src) - 1 - aff.axis)
    at = builder.at(aff.out.producer(), hint=aff.name, like=aff.out)
    scale = at.const(aff.scale.reshape(shape).astype(dtype), f"{aff.name}_scale")
    shift = at.const(aff.shift.reshape(shape).astype(dtype), f"{aff.name}_shift")
    scaled = at.op("Mul", [aff.src, scale], shape=aff.out.shape)
    return at.op("Add", [scaled, shift], shape=aff.out.shape)


def cancel_transposes(builder: Builder, value: ir.Value) -> None:
    """Drop ``Transpose(Transpose(v))`` pairs that a fold left behind around ``value``."""
    first = value.producer()
    if first is None or first.op_type != "Transpose":
        return
    perm = list(first.attributes.get_ints("perm", []))
    for reader, _ in value.uses():
        back = list(reader.attributes.get_ints("perm", [])) if reader.op_type == "Transpose" \
            else None
        if perm and back and len(back) == len(perm) and [perm[i] for i in back] == sorted(perm):
            replace_value(builder, reader.outputs[0], first.inputs[0])
            remove_dead(builder.graph, [reader, first])


def fold_affine(builder: Builder, aff: ChannelAffine, report: PassReport,
                allow_decompose: bool) -> None:
    """Fold ``aff`` into its producer, else its consumers, else (if allowed) Mul+Add."""
    reasons = []
    for where, planner in (("producer", plan_into_producer), ("consumers", plan_into_consumers)):
        plan = planner(builder, aff)
        if isinstance(plan, str):
            reasons.append(f"{where}: {plan}")
            continue
        rule, new_src = plan()
        replace_value(builder, aff.out, new_src)
        remove_dead(builder.graph, aff.nodes)
        cancel_transposes(builder, new_src)
        report.change(rule)
        return
    why = "; ".join(reasons)
    if allow_decompose:
        new = decompose(builder, aff)
        if not isinstance(new, str):
            replace_value(builder, aff.out, new)
            remove_dead(builder.graph, aff.nodes)
            report.change("to-mul-add")
            report.skip(aff.name, f"not folded ({why}); replaced by Mul+Add")
            return
        why = f"{why}; {new}"
    report.skip(aff.name, f"not folded ({why})")
