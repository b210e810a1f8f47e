"""linear-attention-order: (Q·Kᵀ)·V -> Q·(Kᵀ·V) for linear attention, when it does less work.

Linear attention (SLAB's SLA, techniques.md §1; any kernelised attention φ(Q)φ(K)ᵀ with no
softmax) is a product of three activations, so matrix associativity applies:

    (Q·B)·V = Q·(B·V)                        Q (…, N, d), B = φ(K)ᵀ (…, d, M), V (…, M, e)
    ReduceSum(Q·B, -1, keepdims) = Q·ReduceSum(B, -1, keepdims)     (the normaliser Q·ΣK_j)

qk-first costs 2NdM + 2NMe FLOPs (plus the N×M product in memory), kv-first 2dMe + 2Nde
(+ 2Nd for the normaliser): linear instead of quadratic in the token count. The pass matches
``MatMul(MatMul(Q, B), V)`` whose inner product is read only by such MatMuls (as their left
operand) and by last-axis ``ReduceSum(keepdims=1)`` normalisers, and rewrites it when the
kv-first order has fewer FLOPs (N > d for square heads). Anything else reading the N×M
product (a Softmax, a graph output, a mask) leaves it alone, with the reason.

Exact in exact arithmetic; floating-point reassociation changes rounding only (SLAB's
reference: 1.3e-7 in fp32). Preconditions: static shapes on the three operands. The ledger
entry carries each rewrite's FLOPs before/after (and the graph's, from ``run_pass``).
"""

from __future__ import annotations

import math

import onnx_ir as ir

from edgekit.passes._ir import Builder, attr, axes_of, const_array, static_shape
from edgekit.passes.core import Pass, PassContext, PassReport


def _matmul_flops(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """2·batch·m·k·n for rank >= 2 operands with broadcast batch dims."""
    rank = max(len(a), len(b))
    a, b = (1,) * (rank - len(a)) + a, (1,) * (rank - len(b)) + b
    batch = math.prod(max(x, y) for x, y in zip(a[:-2], b[:-2], strict=True))
    return 2 * batch * a[-2] * a[-1] * b[-1]


def _is_normaliser(node: ir.Node, rank: int) -> bool:
    return (node.op_type == "ReduceSum" and axes_of(node, rank) == [rank - 1]
            and attr(node, "keepdims", 1) == 1)


def _match(outer: ir.Node) -> tuple[ir.Node, list[ir.Node], list[ir.Node]] | str | None:
    """(inner MatMul, readers as left operand, normalisers) of a reorderable product, the
    reason it is not one, or None when ``outer`` does not read a MatMul product at all."""
    inner = outer.inputs[0].producer()
    if inner is None or inner.op_type != "MatMul" or outer.inputs[0] is outer.inputs[1]:
        return None
    q, b = inner.inputs
    if any(const_array(v) is not None for v in (q, b, outer.inputs[1])):
        return "an operand is a constant weight: not an attention product"
    product = inner.outputs[0]
    shapes = [static_shape(v) for v in (q, b, product)]
    if any(s is None or len(s) < 2 for s in shapes):
        return "its operands have no static shapes of rank >= 2"
    if product.is_graph_output():
        return f"the product {product.name!r} is a graph output"
    left, norms = [], []
    for use in product.uses():
        if use.node.op_type == "MatMul" and use.idx == 0 and use.node.inputs[1] is not product:
            left.append(use.node)
        elif _is_normaliser(use.node, len(shapes[2])):
            norms.append(use.node)
        else:
            return (f"the product {product.name!r} is also read by {use.node.name!r} "
                    f"({use.node.op_type}, input {use.idx}): not linear attention")
    return inner, left, norms


def _cost(inner: ir.Node, left: list[ir.Node], norms: list[ir.Node]) -> tuple[int, int]:
    """FLOPs of (qk-first, kv-first) for this product and its readers."""
    q, b = (static_shape(v) for v in inner.inputs)
    before = _matmul_flops(q, b)
    after = _matmul_flops(q, (*b[:-1], 1)) if norms else 0
    for mm in left:
        v = static_shape(mm.inputs[1])
        before += _matmul_flops(static_shape(inner.outputs[0]), v)
        bv = _matmul_flops(b, v)
        after += bv + _matmul_flops(q, (*b[:-2], b[-2], v[-1]))
    return before, after


def apply(model: ir.Model, ctx: PassContext) -> PassReport:
    report, graph = ctx.report, model.graph  # exact: the samples are not needed
    builder, rewritten, seen = Builder(graph), {}, set()
    for outer in [n for n in graph if n.op_type == "MatMul"]:
        if outer in seen:
            continue
        match = _match(outer)
        if match is None:
            continue
        if isinstance(match, str):
            report.skip(outer.name, match)
            continue
        inner, left, norms = match
        seen.update(left)
        before, after = _cost(inner, left, norms)
        n, d = static_shape(inner.inputs[0])[-2:]
        if after >= before:
            report.skip(inner.name, f"qk-first already does less work (N={n}, d={d}: "
                        f"{before} FLOPs vs {after} kv-first)")
            continue
        q, b = inner.inputs
        at = builder.at(inner, like=q)
        for mm in left:  # Q·(B·V)
            bv = at.op("MatMul", [b, mm.inputs[1]], hint=f"{mm.name}_kv")
            builder.redirect(mm.outputs[0], at.op("MatMul", [q, bv], like=mm.outputs[0],
                                                  shape=mm.outputs[0].shape))
        for red in norms:  # Q·ΣK_j
            ksum = at.reduce("ReduceSum", b, -1, hint=f"{red.name}_ksum")
            builder.redirect(red.outputs[0], at.op("MatMul", [q, ksum], like=red.outputs[0],
                                                   shape=red.outputs[0].shape))
        rewritten[inner.name] = {"tokens": n, "dim": d, "flops_before": before,
                                 "flops_after": after, "normalisers": len(norms)}
        report.change("kv-first")
    report.details["rewritten"] = rewritten
    return report


PASS = Pass(
    name="linear-attention-order",
    summary="linear attention (Q·Kᵀ)·V -> Q·(Kᵀ·V) (and its normaliser) when it is fewer "
            "FLOPs (exact)",
    exact=True,
    apply=apply,
)
