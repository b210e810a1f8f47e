"""ONNX tidy-up: the integer ops TVM's ONNX importer lacks, rewritten into the QDQ form it
imports (``frontend.tidy_onnx`` calls ``to_qdq``; ``qdq.LowerQDQ`` then makes them integer).

Exact in real arithmetic (each op's ONNX definition written out):

- ``QLinearMatMul(a, sa, za, b, sb, zb, sy, zy)`` = ``Q(MatMul(DQ(a, sa, za), DQ(b, sb, zb)),
  sy, zy)``; a 1-D ``sb`` is per column of ``b`` (DQ axis ``rank(b) - 1``), a 1-D ``sa`` per
  row of ``a`` (axis ``rank(a) - 2``, needs ``a``'s rank);
- ``QLinearConv(x, sx, zx, w, sw, zw, sy, zy[, B])`` = ``Q(Conv(DQ(x, sx, zx), DQ(w, sw, zw,
  axis 0), DQ(B, sx * sw, axis 0)), sy, zy)`` (the int32 bias has scale ``sx * sw``);
- ``ConvInteger(x, w[, zx, zw])`` = ``Cast<int32>(Conv(DQ(x, 1, zx), DQ(w, 1, zw, axis 0)))``:
  the float conv of integer values is exact while every partial sum stays below 2^24 (then
  ``LowerQDQ`` makes it an int32 conv again; its float rescale by 1 is exact to the same
  bound).

onnxruntime rounds the requantization of QLinear* once from the int32 sum, the QDQ form
from a float sum; the two can land one step apart (``qdq_check`` allows it).
``MatMulInteger`` is left to TVM's own converter (it handles per-row/per-column zero points).

Preconditions: a node whose scales are not float32 or whose ranks are unknown where needed
is left as it is (and ``frontend.unsupported_nodes`` names it).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

CONVERTED = ("QLinearMatMul", "QLinearConv", "ConvInteger")


def _const(graph: ir.Graph, array: np.ndarray, name: str) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array))
    graph.register_initializer(value)
    return value


def _rank(value: ir.Value | None) -> int | None:
    shape = value.shape if value is not None else None
    return None if shape is None else len(shape)


def _size(value: ir.Value | None) -> int | None:
    """Element count of a scale / zero point with a known shape (1 for a scalar)."""
    shape = value.shape if value is not None else None
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    return int(np.prod(shape, dtype=np.int64))


def _dq(inputs: list, name: str, axis: int | None = None) -> ir.Node:
    attrs = [ir.AttrInt64("axis", axis)] if axis is not None else []
    return ir.Node("", "DequantizeLinear", inputs, attrs, name=name)


def _qlinear_matmul(graph: ir.Graph, node: ir.Node, name: str) -> list[ir.Node] | None:
    a, sa, za, b, sb, zb, sy, zy = node.inputs
    a_axis = b_axis = None
    if _size(sa) != 1:
        rank = _rank(a)
        if rank is None or rank < 2:
            return None
        a_axis = rank - 2
    if _size(sb) != 1:
        rank = _rank(b)
        if rank is None:
            return None
        b_axis = rank - 1
    da, db = _dq([a, sa, za], f"{name}__dqa", a_axis), _dq([b, sb, zb], f"{name}__dqb", b_axis)
    mm = ir.Node("", "MatMul", [da.outputs[0], db.outputs[0]], name=f"{name}__matmul")
    q = ir.Node("", "QuantizeLinear", [mm.outputs[0], sy, zy], name=name)
    return [da, db, mm, q]


def _qlinear_conv(graph: ir.Graph, node: ir.Node, name: str) -> list[ir.Node] | None:
    x, sx, zx, w, sw, zw, sy, zy, *rest = list(node.inputs) + [None]
    bias = rest[0]
    dx = _dq([x, sx, zx], f"{name}__dqx")
    dw = _dq([w, sw, zw], f"{name}__dqw", 0)
    nodes = [dx, dw]
    conv_inputs = [dx.outputs[0], dw.outputs[0]]
    if bias is not None:
        scale = ir.Node("", "Mul", [sx, sw], name=f"{name}__bias_scale")
        db = _dq([bias, scale.outputs[0]], f"{name}__dqb", 0)
        nodes += [scale, db]
        conv_inputs.append(db.outputs[0])
    conv = ir.Node("", "Conv", conv_inputs, list(node.attributes.values()), name=f"{name}__conv")
    q = ir.Node("", "QuantizeLinear", [conv.outputs[0], sy, zy], name=name)
    return [*nodes, conv, q]


def _conv_integer(graph: ir.Graph, node: ir.Node, name: str) -> list[ir.Node] | None:
    x, w, *zps = list(node.inputs) + [None, None]
    zx, zw = zps[0], zps[1]
    one = _const(graph, np.array(1.0, np.float32), f"{name}__one")
    if zw is not None and _size(zw) != 1:
        scale = _const(graph, np.ones(_size(zw) or 1, np.float32), f"{name}__ones")
    else:
        scale = one
    dx = _dq([x, one, zx] if zx is not None else [x, one], f"{name}__dqx")
    dw = _dq([w, scale, zw] if zw is not None else [w, scale], f"{name}__dqw", 0)
    conv = ir.Node("", "Conv", [dx.outputs[0], dw.outputs[0]], list(node.attributes.values()),
                   name=f"{name}__conv")
    cast = ir.Node("", "Cast", [conv.outputs[0]], [ir.AttrInt64("to", ir.DataType.INT32)],
                   name=name)
    return [dx, dw, conv, cast]


_CONVERTERS = {"QLinearMatMul": _qlinear_matmul, "QLinearConv": _qlinear_conv,
               "ConvInteger": _conv_integer}


def to_qdq(graph: ir.Graph, replace) -> int:
    """Rewrite every ``CONVERTED`` node of ``graph`` (``replace(graph, old, new_nodes)`` puts
    the new nodes in; the last one's output takes over the old output). Returns how many."""
    done = 0
    for i, node in enumerate(list(graph)):
        convert = _CONVERTERS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if convert is None:
            continue
        nodes = convert(graph, node, node.name or f"{node.op_type}#{i}")
        if nodes:
            replace(graph, node, nodes)
            done += 1
    return done
