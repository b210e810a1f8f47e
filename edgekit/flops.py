"""FLOPs of an ONNX graph: the compute-bound ops, counted from inferred static shapes.

Counted (one multiply-add = 2 FLOPs): MatMul (broadcast batch dims), Gemm, Conv and
ConvTranspose (groups and kernel size), Einsum of two operands (product of all distinct index
extents), and the fused attention ops (``Attention`` of opset 23 and ``com.microsoft``:
Q·Kᵀ plus A·V, projections included for the Microsoft op). Elementwise ops, norms, softmax
and data movement are not counted: they are memory-bound and a small share of transformer or
CNN cost. Shapes come from ONNX shape inference; a counted op whose shapes are not static
raises ``EdgekitError`` naming the node (give the input shapes with ``--input``).
"""

from __future__ import annotations

import math
from collections import Counter

import onnx

from edgekit.errors import EdgekitError
from edgekit.onnx_nodes import attr as _attr


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...] | None]:
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    g = inferred.graph
    out: dict[str, tuple[int, ...] | None] = {}
    for vi in [*g.input, *g.value_info, *g.output]:
        t = vi.type.tensor_type
        if not t.HasField("shape"):
            out[vi.name] = None
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        out[vi.name] = None if None in dims else tuple(dims)
    for init in g.initializer:
        out[init.name] = tuple(init.dims)
    return out


def _matmul(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    if len(a) == 1:
        a = (1, *a)
    if len(b) == 1:
        b = (*b, 1)
    batch_a, batch_b = a[:-2], b[:-2]
    n = max(len(batch_a), len(batch_b))
    batch = [max(x, y) for x, y in zip((1,) * (n - len(batch_a)) + batch_a,
                                       (1,) * (n - len(batch_b)) + batch_b, strict=True)]
    return 2 * math.prod(batch) * a[-2] * a[-1] * b[-1]


def node_flops(node: onnx.NodeProto, shapes: dict[str, tuple[int, ...] | None]) -> int:
    """FLOPs of one node (0 for the ops not counted)."""
    op = node.op_type
    if op not in ("MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum", "Attention"):
        return 0
    ins = [shapes.get(name) if name else None for name in node.input]
    outs = [shapes.get(name) for name in node.output]
    needed = ins[:2] + outs[:1] if op != "Attention" else ins[:1] + outs[:1]
    if any(s is None for s in needed):
        raise EdgekitError(f"cannot count FLOPs of {op} node {node.name!r}: its shapes are not "
                           "static (give the input shapes with --input)")
    if op == "MatMul":
        return _matmul(ins[0], ins[1])
    if op == "Gemm":
        m, k = ins[0][::-1] if _attr(node, "transA", 0) else ins[0]
        n = ins[1][0] if _attr(node, "transB", 0) else ins[1][1]
        return 2 * m * k * n
    if op == "Conv":
        w = ins[1]  # (M, C/group, k...)
        return 2 * math.prod(outs[0]) * math.prod(w[1:])
    if op == "ConvTranspose":
        w = ins[1]  # (C, M/group, k...)
        return 2 * math.prod(ins[0]) * math.prod(w[1:])
    if op == "Einsum":
        return _einsum(node, ins, outs[0])
    return _attention(node, ins, outs)


def _einsum(node: onnx.NodeProto, ins: list, out: tuple[int, ...]) -> int:
    """2 × the product of every index extent (× the ``...`` extent, read off the output)."""
    equation = _attr(node, "equation", b"").decode().replace(" ", "")
    lhs, _, rhs = equation.partition("->")
    extent: dict[str, int] = {}
    for term, shape in zip(lhs.split(","), ins, strict=True):
        letters = term.replace("...", "")
        tail = shape[len(shape) - len(letters):] if letters else ()
        for letter, dim in zip(letters, tail, strict=True):
            extent[letter] = max(extent.get(letter, 1), dim)
    ellipsis = 1
    if "..." in lhs:
        out_letters = rhs.replace("...", "") if rhs else ""
        ellipsis = math.prod(out[:len(out) - len(out_letters)])
    return 2 * math.prod(extent.values()) * ellipsis


def _attention(node: onnx.NodeProto, ins: list, outs: list) -> int:
    """Q·Kᵀ and A·V of a fused attention op (plus the QKV projection for com.microsoft)."""
    if node.domain == "com.microsoft":
        b, s, hidden_in = ins[0]
        if ins[1] is None:
            raise EdgekitError(f"cannot count FLOPs of Attention node {node.name!r}: no weights")
        qkv = ins[1][1]  # 3 × hidden
        return 2 * b * s * hidden_in * qkv + 2 * 2 * b * s * s * (qkv // 3)
    q, k = ins[0], ins[1]
    if q is None or k is None:
        raise EdgekitError(f"cannot count FLOPs of Attention node {node.name!r}: shapes unknown")
    if len(q) == 4:  # (B, H, S, d)
        b, h, sq, d = q
        sk = k[2]
        return 2 * 2 * b * h * sq * sk * d
    b, sq, hidden = q  # (B, S, hidden) with q_num_heads heads
    sk = k[1]
    return 2 * 2 * b * sq * sk * hidden


def count(model: onnx.ModelProto) -> int:
    """Total FLOPs of one inference of ``model`` (see the module docstring for what counts)."""
    return sum(by_op(model).values())


def by_op(model: onnx.ModelProto) -> dict[str, int]:
    """FLOPs per op type, for the op types that have any."""
    shapes = _shapes(model)
    totals: Counter = Counter()
    for node in model.graph.node:
        f = node_flops(node, shapes)
        if f:
            totals[node.op_type] += f
    return dict(totals)


def try_count(model: onnx.ModelProto) -> int | None:
    """``count`` or None when some counted op has no static shapes (for reports)."""
    try:
        return count(model)
    except (EdgekitError, onnx.shape_inference.InferenceError, onnx.checker.ValidationError,
            ValueError, TypeError, IndexError, KeyError):  # a report must not fail the run
        return None
