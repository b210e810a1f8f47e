"""Small onnx-ir helpers shared by the rewrite passes: constants, shapes, attributes, Builder.

``Builder``, the one node builder of every pass, adds uniquely named initializers and nodes
(``op``, ``const``, ``scalar``, ``reduce``) where it is told, and moves readers from one value
to another (``redirect``) while graph outputs keep their names. The other helpers read
constants, static dims and attributes, run shape inference when some output lacks a shape, and
map an axis through a reshape.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from edgekit.passes.core import PassRefused


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's array if it is a constant (initializer or Constant node), else None.

    A graph input that is also an initializer can be overridden at run time: not a constant.
    """
    if value is None or value.is_graph_input():
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


_RANDOM = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
           "Multinomial", "Bernoulli"}


def computed_from_constants(value: ir.Value, limit: int = 256) -> bool:
    """Whether a non-constant ``value`` is computed from constants only (no graph input, no
    random op upstream): ``fold-constants`` would turn it into a constant."""
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        if v in seen or const_array(v) is not None:
            continue
        seen.add(v)
        node = v.producer()
        if node is None or node.op_type in _RANDOM or node.graph is None or len(seen) > limit:
            return False
        stack.extend(x for x in node.inputs if x is not None)
    return True


def dims(value: ir.Value) -> tuple[int | str, ...]:
    """Static-or-symbolic dims; refuses when the shape is unknown."""
    if value.shape is None:
        raise PassRefused(f"the shape of {value.name!r} is unknown", value.name or "")
    return tuple(d if isinstance(d, int) else str(d) for d in value.shape)


def static_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    """The value's dims when every one is a known number, else None."""
    if value is None or value.shape is None or not value.shape.is_static():
        return None
    return tuple(value.shape.numpy())


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
    """The one node builder of the passes: uniquely named initializers and nodes.

    A node goes where ``op`` is told (``at=node``, before it or ``after``), else at the
    builder's own position: ``b.at(node)`` returns a builder (sharing names and constants)
    whose nodes go before ``node``, or after it in the order written with ``after=True``; a
    builder without a position appends. ``like`` gives new values its type (``hint`` names
    them); ``scalar`` defaults to its dtype.
    """

    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self.opset = graph.opset_imports.get("", graph.opset_imports.get("ai.onnx", 1))
        self._names = set(graph.initializers) | {v.name for v in graph.inputs}
        self._names |= {v.name for n in ir.traversal.RecursiveGraphIterator(graph)
                        for v in n.outputs}
        self._names |= {n.name for n in graph}
        self._small: dict[tuple, ir.Value] = {}
        self._at: ir.Node | None = None
        self._after = False
        self.hint = ""
        self.like: ir.Value | None = None

    def at(self, node: ir.Node | None, *, after: bool = False, hint: str | None = None,
           like: ir.Value | None = None) -> Builder:
        """A builder writing before ``node`` (after it, in order, with ``after``)."""
        b = copy.copy(self)  # shares the name set and the constant cache
        b._at, b._after = node, after
        b.hint = hint if hint is not None else (node.name or "") if node is not None else ""
        b.like = like
        return b

    @property
    def dtype(self) -> np.dtype:
        """The numpy dtype of ``like`` (float32 when it has none)."""
        dtype = self.like.dtype if self.like is not None else None
        return np.dtype(dtype.numpy()) if dtype is not None else np.dtype(np.float32)

    def fresh(self, hint: str | None) -> str:
        base = hint or "edgekit"
        name, i = base, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    def const(self, array: np.ndarray, hint: str | None = None) -> ir.Value:
        name = self.fresh(hint or f"{self.hint}_c")
        tensor = ir.tensor(np.array(array, order="C"), name=name)  # keeps 0-d
        value = ir.Value(name=name, shape=ir.Shape(tensor.shape.numpy()),
                         type=ir.TensorType(tensor.dtype), const_value=tensor)
        self.graph.register_initializer(value)
        return value

    def shared(self, array: np.ndarray, hint: str | None = None) -> ir.Value:
        """A constant shared by every reader asking for the same small array and hint."""
        array = np.asarray(array)
        key = (array.dtype.str, array.shape, array.tobytes(), hint)
        if key not in self._small:
            self._small[key] = self.const(array, hint)
        return self._small[key]

    def scalar(self, number: float, dtype: np.dtype | None = None,
               hint: str | None = None) -> ir.Value:
        """A shared 0-d constant (``like``'s dtype unless given)."""
        dtype = self.dtype if dtype is None else dtype
        return self.shared(np.array(number, dtype=dtype), hint or f"{self.hint}_c")

    def set_const(self, node: ir.Node, index: int, array: np.ndarray) -> None:
        """Give ``node`` its own new constant at ``index`` (never edits a shared one)."""
        old = node.inputs[index]
        node.replace_input_with(index, self.const(array, old.name if old else node.name))

    def op(self, op_type: str, inputs: Sequence[ir.Value | None], attrs: dict | None = None,
           *, at: ir.Node | None = None, after: bool = False, hint: str = "",
           like: ir.Value | None = None, shape: Sequence | None = None) -> ir.Value:
        """One node with one output, typed like ``like`` (else the builder's ``like``)."""
        out = self.op_multi(op_type, inputs, attrs, 1, at=at, after=after, hint=hint)[0]
        like = like if like is not None else self.like
        if like is not None and like.type is not None:
            out.type = like.type
        if shape is not None:
            out.shape = ir.Shape(shape)
        return out

    def op_multi(self, op_type: str, inputs: Sequence[ir.Value | None], attrs: dict | None,
                 outputs: int, *, at: ir.Node | None = None, after: bool = False,
                 hint: str = "") -> tuple[ir.Value, ...]:
        """One node with ``outputs`` untyped outputs."""
        anchor = at if at is not None else self._at
        base = hint or self.hint or (anchor.name if anchor is not None else "")
        name = self.fresh(f"{base}_{op_type}")
        node = ir.node(op_type, list(inputs), attrs or {}, num_outputs=outputs, name=name)
        for out in node.outputs:
            out.name = self.fresh(name)
        if at is not None:
            (self.graph.insert_after if after else self.graph.insert_before)(at, node)
        elif self._at is None:
            self.graph.append(node)
        elif self._after:
            self.graph.insert_after(self._at, node)
            self._at = node  # the next node goes after this one: written order is kept
        else:
            self.graph.insert_before(self._at, node)
        return tuple(node.outputs)

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

    def reduce(self, op_type: str, x: ir.Value, axes: int | Sequence[int] = -1, *,
               keepdims: bool = True, at: ir.Node | None = None, hint: str = "",
               shape: Sequence | None = None) -> ir.Value:
        """``op_type`` over ``axes``; the axes are an input from opset 18 (ReduceSum: 13)."""
        listed = [axes] if isinstance(axes, int) else list(axes)
        attrs: dict = {"keepdims": int(keepdims)}
        inputs = [x]
        if self.opset >= (13 if op_type == "ReduceSum" else 18):
            inputs.append(self.shared(np.array(listed, dtype=np.int64), "axes"))
        else:
            attrs["axes"] = listed
        return self.op(op_type, inputs, attrs, at=at, hint=hint, like=x, shape=shape)


def index_of(node: ir.Node, i: int) -> bool:
    return len(node.inputs) > i and node.inputs[i] is not None
