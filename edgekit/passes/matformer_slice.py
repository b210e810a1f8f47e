"""matformer-slice: keep the first k hidden units of each nested (MatFormer) FFN.

A MatFormer FFN (``graphs/digits_matformer.py``) is trained so that its first k hidden units
are a working FFN on their own. In ONNX's x·W layout, with the hidden activation act applied
per unit,

    FFN(x)   = act(x·W1 + b1)·W2 + b2                      W1 (d, h), b1 (h), W2 (h, d')
    FFN_k(x) = act(x·W1[:, :k] + b1[:k])·W2[:k] + b2       (the sub-model, no retraining)

which is what the pass writes: W1's first k columns, b1's first k entries, W2's first k rows.
It is exactly the trained sub-model (the torch forward with ``units=k``), not an
approximation of the full model: the sub-model's accuracy is measured on data
(``bench/matformer.py``), and the ledger's error against the full model is bounded by
``budget`` only to catch a slice of an FFN that was never trained nested.

An FFN is ``MatMul(x, W1)`` (W1 a constant, or a Transpose of one), an optional bias ``Add``,
then only element-wise ops (their other operands scalar constants, or values of the same
path: a decomposed GELU) up to ``MatMul(h, W2)`` with W2 constant. ``ffn`` gives the width
per FFN in graph order, ``/``-separated (``0.5/0.25``), or one value for all; a value ≤ 1 is
a fraction of h (rounded to the nearest unit, at least 1), a value > 1 a unit count.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgekit.passes._ir import Builder, const_array
from edgekit.passes.core import Pass, PassContext, PassRefused, PassReport

ELEMENTWISE = {"Relu", "Gelu", "Erf", "Sigmoid", "Tanh", "Mul", "Add", "Sub", "Div", "Pow",
               "Sqrt", "Exp", "Neg", "Abs", "HardSigmoid", "HardSwish", "Softplus", "Elu",
               "LeakyRelu", "Selu", "Identity", "Cast", "Celu", "Mish"}


def _weight(value: ir.Value) -> np.ndarray | None:
    """A constant in x·W layout, also through ``Transpose`` (exports keep W[out, in]ᵀ)."""
    arr = const_array(value)
    node = value.producer()
    if arr is None and node is not None and node.op_type == "Transpose":
        inner = const_array(node.inputs[0])
        perm = list(node.attributes.get_ints("perm", [1, 0]))
        arr = None if inner is None or inner.ndim != 2 or perm != [1, 0] else inner.T
    return arr if arr is not None and arr.ndim == 2 else None


def _hidden_path(start: ir.Value, width: int) -> tuple[list[ir.Node], ir.Node] | str | None:
    """(element-wise nodes, fc2) from fc1's output; None when it reaches no constant MatMul."""
    path, frontier, fc2 = [], [start], None
    while frontier:  # the forward closure up to the first constant-weight MatMul
        value = frontier.pop()
        if value.is_graph_output():
            return f"hidden value {value.name!r} is a graph output"
        for use in value.uses():
            node = use.node
            if node in path or node is fc2:
                continue
            if node.op_type == "MatMul" and use.idx == 0 and _weight(node.inputs[1]) is not None:
                if fc2 is not None:
                    return None
                fc2 = node
            elif node.op_type in ELEMENTWISE:
                path.append(node)
                frontier.extend(node.outputs)
            else:
                return None
    if fc2 is None or _weight(fc2.inputs[1]).shape[0] != width:
        return None
    inside = {start, *(v for n in path for v in n.outputs)}
    for node in path:  # every other operand is a scalar constant (else it needs slicing too)
        for other in node.inputs:
            arr = const_array(other)
            if arr is None and other not in inside:
                return f"{node.name!r} ({node.op_type}) mixes in a non-constant value"
            if arr is not None and arr.size != 1:
                return f"{node.name!r} ({node.op_type}) has a per-unit constant"
    return path, fc2


def find_ffns(graph: ir.Graph) -> tuple[list[tuple], list[tuple[str, str]]]:
    """Nested-FFN candidates in graph order: (fc1, bias Add or None, path, fc2), and skips."""
    found, skipped = [], []
    for fc1 in [n for n in graph if n.op_type == "MatMul"]:
        w1 = _weight(fc1.inputs[1])
        if w1 is None:
            continue
        out, bias = fc1.outputs[0], None
        uses = list(out.uses())
        if len(uses) == 1 and uses[0].node.op_type == "Add":
            b = const_array(uses[0].node.inputs[1 - uses[0].idx])
            if b is not None and b.shape == (w1.shape[1],):
                bias, out = uses[0].node, uses[0].node.outputs[0]
        walk = _hidden_path(out, w1.shape[1])
        if isinstance(walk, str):
            skipped.append((fc1.name, walk))
        elif walk is not None and walk[0]:  # an activation between: an FFN, not two Linears
            found.append((fc1, bias, *walk))
    return found, skipped


def _widths(spec: str, hidden: list[int]) -> list[int]:
    items = [s for s in spec.split("/") if s.strip()]
    if len(items) == 1:
        items *= len(hidden)
    if len(items) != len(hidden):
        raise PassRefused(f"ffn={spec!r} gives {len(items)} widths for {len(hidden)} FFNs")
    out = []
    for item, h in zip(items, hidden, strict=True):
        try:
            v = float(item)
        except ValueError:
            raise PassRefused(f"ffn width {item!r} is not a number") from None
        k = max(1, round(v * h)) if 0 < v <= 1 else int(v)
        if v <= 0 or v != int(v) and v > 1 or k > h:
            raise PassRefused(f"ffn width {item!r} is not a fraction in (0, 1] or a unit count "
                              f"in 2..{h}")
        out.append(k)
    return out


def apply(model: ir.Model, ctx: PassContext, *, ffn: str = "0.5",
          budget: float = 1.0) -> PassReport:
    report, graph = ctx.report, model.graph
    found, skipped = find_ffns(graph)
    for node, reason in skipped:
        report.skip(node, reason)
    if not found:
        raise PassRefused("no FFN (MatMul -> element-wise activation -> MatMul with constant "
                          "weights) found")
    widths = _widths(ffn, [_weight(fc1.inputs[1]).shape[1] for fc1, *_ in found])
    b, sliced = Builder(graph), {}
    for (fc1, bias, path, fc2), k in zip(found, widths, strict=True):
        h = _weight(fc1.inputs[1]).shape[1]
        sliced[fc1.name] = {"fc2": fc2.name, "hidden": h, "kept": k}
        if k == h:
            continue
        b.set_const(fc1, 1, np.ascontiguousarray(_weight(fc1.inputs[1])[:, :k]))
        if bias is not None:
            i = 1 if bias.inputs[0] is fc1.outputs[0] else 0
            b.set_const(bias, i, const_array(bias.inputs[i])[:k])
        b.set_const(fc2, 1, np.ascontiguousarray(_weight(fc2.inputs[1])[:k]))
        for node in [fc1, *([bias] if bias else []), *path]:
            for v in node.outputs:
                if v.shape is not None and len(v.shape) and v.shape[-1] == h:
                    v.shape = ir.Shape([*v.shape[:-1], k])
        report.change("slice-ffn")
    report.details["ffns"] = sliced
    return report


PASS = Pass(
    name="matformer-slice",
    summary="MatFormer sub-model: keep the first k hidden units of each nested FFN "
            "(ffn=fraction or units, '/' per layer)",
    exact=False,
    apply=apply,
    budget=1.0,  # the default of its ``budget`` parameter, which sets the check's budget
    budget_param="budget",
)
