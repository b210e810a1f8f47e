"""Residual-stream analysis and small IR-building helpers for the normalization passes.

The residual stream of a Pre-norm transformer is the tree of Adds that the norms read:
``h = E[ids] + P``, ``h = h + proj(attn(norm(h)))``, ``h = h + fc2(mlp(norm(h)))``. Walking
backwards from every norm input through that tree (Add/Sub, and layout ops that keep the
normalized axis whole: Transpose, Reshape, Concat, Gather, Slice, Expand, token-axis Reduce*)
ends at *writers*: constants (embedding tables, positions, cls token, biases) and linear layers
with a constant weight (MatMul, Gemm, ungrouped Conv). Every value on the stream is a sum of
writer outputs, so anything linear along the normalized ("channel") axis, such as removing
its mean, can be done writer by writer. ``trace_stream`` returns each writer as a ``Slot``:
the constant input of a node and the axis of that constant that lands on the channel axis.

It refuses (``PassRefused``, naming the node) when that picture does not hold: a writer that
is not linear, a norm output that is itself the stream (Post-LN, e.g. BERT), or any read of a
stream value that does not go through a norm (the rewrites change the stream itself, so every
other reader would see a different tensor).

``Builder`` (named constants and nodes, ``redirect``), ``attr``, ``dims`` and ``ensure_shapes``
are also used by the polynomial passes (``_poly``, ``poly_softmax``): keep their signatures.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from edgekit.passes.core import PassRefused

_LAYOUT = {"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"}


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's array if it is a constant (initializer or Constant node), else None."""
    if value is None or value.is_graph_input():
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if node is not None and node.op_type == "Constant" and "value" in node.attributes:
        return node.attributes["value"].as_tensor().numpy()
    return None


def dims(value: ir.Value) -> tuple[int | str, ...]:
    """Static-or-symbolic dims; refuses when the shape is unknown."""
    if value.shape is None:
        raise PassRefused(f"the shape of {value.name!r} is unknown", value.name or "")
    return tuple(d if isinstance(d, int) else str(d) for d in value.shape)


def attr(node: ir.Node, name: str, default):
    a = node.attributes.get(name)
    return default if a is None else a.value


def axes_of(node: ir.Node, rank: int, input_index: int = 1) -> list[int] | None:
    """Normalized ``axes`` of Reduce*/Slice/Squeeze (attribute or constant input)."""
    axes = attr(node, "axes", None)
    if axes is None and len(node.inputs) > input_index and node.inputs[input_index] is not None:
        arr = const_array(node.inputs[input_index])
        if arr is None:
            return None
        axes = arr.reshape(-1).tolist()
    return None if axes is None else [int(a) % rank for a in axes]


def sliced_axes(node: ir.Node, rank: int) -> list[int] | None:
    """The axes a Slice (opset >= 10) slices; None when they are not constant."""
    if index_of(node, 3):
        return axes_of(node, rank, 3)
    return list(range(dims(node.inputs[1])[0]))  # default: the first len(starts) axes


def onnx_opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))


def ensure_shapes(model: ir.Model) -> None:
    """Run ONNX shape inference when some node output has no shape (the walk needs them)."""
    if any(v.shape is None for n in model.graph for v in n.outputs):
        ShapeInferencePass()(model)


def map_reshape(src: Sequence, dst: Sequence, dst_axis: int) -> int | None:
    """Axis of ``src`` that a reshape to ``dst`` keeps whole as ``dst[dst_axis]``, or None.

    In row-major order an axis survives a reshape intact iff it has the same size and the
    same number of elements after it in both shapes.
    """

    def tail(shape: Sequence, i: int):
        rest = shape[i + 1:]
        return math.prod(rest) if all(isinstance(d, int) for d in rest) else tuple(rest)

    for j, d in enumerate(src):
        if d == dst[dst_axis] and tail(src, j) == tail(dst, dst_axis):
            return j
    return None


class Builder:
    """Adds uniquely named initializers and nodes to a graph."""

    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self._names = set(graph.initializers) | {v.name for v in graph.inputs}
        self._names |= {v.name for n in ir.traversal.RecursiveGraphIterator(graph)
                        for v in n.outputs}
        self._names |= {n.name for n in graph}
        self._small: dict[tuple, ir.Value] = {}

    def fresh(self, hint: str | None) -> str:
        base = hint or "edgekit"
        name, i = base, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    def const(self, array: np.ndarray, hint: str | None) -> ir.Value:
        name = self.fresh(hint)
        tensor = ir.tensor(np.array(array, order="C"), name=name)  # keeps 0-d
        value = ir.Value(name=name, shape=ir.Shape(array.shape),
                         type=ir.TensorType(tensor.dtype), const_value=tensor)
        self.graph.register_initializer(value)
        return value

    def scalar(self, number: float, dtype: np.dtype, hint: str) -> ir.Value:
        """A shared scalar (or 1-element axes) constant."""
        array = np.array(number, dtype=dtype)
        key = (array.dtype.str, array.tobytes(), hint)
        if key not in self._small:
            self._small[key] = self.const(array.reshape(-1) if hint == "axes" else array, hint)
        return self._small[key]

    def set_const(self, node: ir.Node, index: int, array: np.ndarray) -> None:
        """Give ``node`` its own new constant at ``index`` (never edits a shared one)."""
        old = node.inputs[index]
        node.replace_input_with(index, self.const(array, old.name if old else node.name))

    def op(self, op_type: str, inputs: Sequence[ir.Value | None], attrs: dict | None = None,
           *, at: ir.Node, after: bool = False, hint: str = "", like: ir.Value | None = None,
           shape: Sequence | None = None) -> ir.Value:
        """Insert one node before (or after) ``at``; its output gets ``like``'s dtype."""
        name = self.fresh(f"{hint or at.name}_{op_type}")
        node = ir.node(op_type, list(inputs), attrs or {}, name=name)
        out = node.outputs[0]
        out.name = self.fresh(name)
        if like is not None and like.type is not None:
            out.type = like.type
        if shape is not None:
            out.shape = ir.Shape(shape)
        (self.graph.insert_after if after else self.graph.insert_before)(at, node)
        return out

    def redirect(self, old: ir.Value, new: ir.Value) -> None:
        """Readers of ``old`` (but ``new``'s producer) read ``new``; graph outputs keep names."""
        producer = new.producer()
        for use in list(old.uses()):
            if use.node is not producer:
                use.node.replace_input_with(use.idx, new)
        if old.is_graph_output():
            outputs = self.graph.outputs
            for i, v in enumerate(outputs):
                if v is old:
                    outputs[i] = new
            name = old.name
            old.name = self.fresh(f"{name}_inner")
            new.name = name
            new.type, new.shape = new.type or old.type, new.shape or old.shape

    def reduce(self, op_type: str, x: ir.Value, opset: int, *, at: ir.Node, hint: str,
               shape: Sequence | None = None) -> ir.Value:
        """Reduce over the last axis with keepdims (axes as input from opset 18 / 13)."""
        as_input = opset >= (13 if op_type == "ReduceSum" else 18)
        if as_input:
            axes = self.scalar(-1, np.dtype(np.int64), "axes")
            return self.op(op_type, [x, axes], {"keepdims": 1}, at=at, hint=hint, like=x,
                           shape=shape)
        return self.op(op_type, [x], {"axes": [-1], "keepdims": 1}, at=at, hint=hint, like=x,
                       shape=shape)


@dataclass(frozen=True)
class Slot:
    """A stream writer: constant ``node.inputs[index]``; ``axis`` is its channel axis.

    ``axis`` is None when the constant is broadcast along the channel (uniform across it).
    """

    node: ir.Node
    index: int
    axis: int | None
    width: int

    @property
    def label(self) -> str:
        value = self.node.inputs[self.index]
        return f"{value.name!r} of {self.node.name!r} ({self.node.op_type})"


@dataclass
class Stream:
    slots: list[Slot] = field(default_factory=list)
    axes: dict[ir.Value, tuple[int, int]] = field(default_factory=dict)  # value -> (axis, width)
    nodes: list[ir.Node] = field(default_factory=list)  # stream nodes, in walk order


def trace_stream(starts: Iterable[tuple[ir.Value, int]], readers: set[ir.Node],
                 norm_outputs: dict[ir.Value, ir.Node], norm: str) -> Stream:
    """Walk back from each norm input ``(value, width)``; see the module docstring."""
    stream = Stream()
    todo = [(v, len(dims(v)) - 1, w) for v, w in starts]
    reads: set[tuple[ir.Node, int]] = set()

    def visit(node: ir.Node, index: int, axis: int | None, width: int) -> None:
        value = node.inputs[index]
        if const_array(value) is not None:
            stream.slots.append(Slot(node, index, axis, width))
        elif axis is None:
            raise PassRefused(f"{node.name!r} ({node.op_type}) broadcasts the stream input "
                              f"{value.name!r} along the normalized axis", node.name)
        else:
            reads.add((node, index))
            todo.append((value, axis, width))

    def broadcast(node: ir.Node, index: int, axis: int, width: int, out_rank: int) -> None:
        shape = dims(node.inputs[index])
        a = axis - (out_rank - len(shape))
        visit(node, index, a if a >= 0 and shape[a] == width else None, width)

    while todo:
        value, axis, width = todo.pop()
        if value in stream.axes:
            if stream.axes[value] != (axis, width):
                raise PassRefused(f"{value.name!r} is reached with two different normalized "
                                  "axes", value.name)
            continue
        stream.axes[value] = (axis, width)
        node = value.producer()
        if node is None:
            raise PassRefused(f"the stream starts at graph input {value.name!r}, which cannot "
                              "be rewritten", value.name)
        if value in norm_outputs:
            raise PassRefused(
                f"Post-LN: the output of {norm_outputs[value].name!r} is itself the residual "
                f"stream (a later residual Add reads it), so the stream is not read only "
                f"through {norm}", norm_outputs[value].name)
        stream.nodes.append(node)
        op, rank = node.op_type, len(dims(value))
        if node.domain not in ("", "ai.onnx"):
            op = f"{node.domain}.{op}"
        if op in ("Add", "Sub"):
            for i in (0, 1):
                broadcast(node, i, axis, width, rank)
        elif op == "Neg":
            visit(node, 0, axis, width)
        elif op in ("Mul", "Div"):
            c = [i for i in (0, 1) if const_array(node.inputs[i]) is not None]
            ci = c[-1] if c else None
            if ci is None or (op == "Div" and ci != 1) or _spans_channel(node, ci, axis, rank):
                raise PassRefused(f"{node.name!r} ({op}) scales the stream by a non-constant "
                                  "or per-channel factor (fold a LayerScale into its writer "
                                  "first, as ln-to-rmsnorm does)", node.name)
            visit(node, 1 - ci, axis, width)
        elif op in _LAYOUT:
            src = dims(node.inputs[0])
            if op == "Transpose":
                a = attr(node, "perm", list(reversed(range(rank))))[axis]
            else:
                a = map_reshape(src, dims(value), axis)
            _need(a is not None, node, "splits or merges the normalized axis")
            visit(node, 0, a, width)
        elif op == "Concat":
            _need(attr(node, "axis", 0) % rank != axis, node, "concatenates along the "
                  "normalized axis")
            for i in range(len(node.inputs)):
                visit(node, i, axis, width)
        elif op == "Expand":
            broadcast(node, 0, axis, width, rank)
        elif op == "Gather":
            data, r_i = dims(node.inputs[0]), len(dims(node.inputs[1]))
            g = attr(node, "axis", 0) % len(data)
            _need(axis < g or axis >= g + r_i, node, "gathers along the normalized axis")
            visit(node, 0, axis if axis < g else axis - r_i + 1, width)
        elif op == "Slice":
            sliced = sliced_axes(node, rank)
            _need(sliced is not None and axis not in sliced, node, "may slice the normalized axis")
            visit(node, 0, axis, width)
        elif op in ("ReduceMean", "ReduceSum"):
            src = dims(node.inputs[0])
            reduced = axes_of(node, len(src))
            _need(reduced is not None, node, "reduces over unknown axes")
            kept = list(range(len(src))) if attr(node, "keepdims", 1) else [
                i for i in range(len(src)) if i not in reduced]
            _need(kept[axis] not in reduced, node, "reduces over the normalized axis")
            visit(node, 0, kept[axis], width)
        elif op in ("MatMul", "Gemm", "Conv"):
            _writer(node, axis, rank, width, stream)
            if op == "Gemm" and index_of(node, 2):
                broadcast(node, 2, axis, width, rank)  # C: a constant bias or another writer
        else:
            raise PassRefused(f"{node.name!r} ({op}) writes to the residual stream but is not "
                              "a linear layer with a constant weight", node.name)
    for value in stream.axes:
        if value.is_graph_output():
            raise PassRefused(f"the residual stream value {value.name!r} is a graph output "
                              f"(read without {norm})", value.name)
        for use in value.uses():
            if use.node not in readers and (use.node, use.idx) not in reads:
                raise PassRefused(f"{use.node.name!r} ({use.node.op_type}) reads the residual "
                                  f"stream value {value.name!r} without going through {norm}",
                                  use.node.name)
    return stream


def index_of(node: ir.Node, i: int) -> bool:
    return len(node.inputs) > i and node.inputs[i] is not None


def _need(ok: bool, node: ir.Node, why: str) -> None:
    if not ok:
        raise PassRefused(f"{node.name!r} ({node.op_type}) on the residual stream {why}",
                          node.name)


def _spans_channel(node: ir.Node, index: int, axis: int, rank: int) -> bool:
    shape = dims(node.inputs[index])
    a = axis - (rank - len(shape))
    return a >= 0 and shape[a] != 1


def _writer(node: ir.Node, axis: int, rank: int, width: int, stream: Stream) -> None:
    """A linear writer: record its weight's output-channel axis as a slot."""
    weight = node.inputs[1]
    w = const_array(weight)
    if w is None:
        raise PassRefused(f"{node.name!r} ({node.op_type}) writes to the residual stream with "
                          f"a non-constant weight {weight.name!r}", node.name)
    if node.op_type == "MatMul":
        _need(axis == rank - 1 and w.ndim >= 2, node, "is a MatMul that does not produce the "
              "normalized axis from its weight")
        stream.slots.append(Slot(node, 1, w.ndim - 1, width))
    elif node.op_type == "Gemm":
        _need(axis == 1, node, "is a Gemm whose output rows are the normalized axis")
        stream.slots.append(Slot(node, 1, 0 if attr(node, "transB", 0) else 1, width))
    else:
        _need(axis == 1 and attr(node, "group", 1) == 1, node,
              "is a Conv that is grouped or not channel-first")
        stream.slots.append(Slot(node, 1, 0, width))
        if index_of(node, 2):
            stream.slots.append(Slot(node, 2, 0, width))
