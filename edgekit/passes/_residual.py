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

The IR helpers it uses (``Builder``, ``attr``, ``dims``, ...) live in ``_ir``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import onnx_ir as ir

from edgekit.passes._ir import (
    attr,
    axes_of,
    const_array,
    dims,
    index_of,
    map_reshape,
    sliced_axes,
)
from edgekit.passes.core import PassRefused

_LAYOUT = {"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"}


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
