"""Cut tokens out of a residual stream and re-shape everything downstream (for token-prune).

``follow_tokens`` inserts the gather of kept tokens after one node and walks the graph in
topological order, tracking which axes of each value are token axes (length N before, k after).
Per op it rewrites what spells N: Reshape / Expand shape constants, Slice ends; a value without
the token axis that meets a pruned one with N on the same axis is gathered with the same
indices (e.g. an additive attention mask). Ops it cannot follow raise ``PassRefused`` naming
the node. The result is shape-inferred again, so the next cut sees the new shapes.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from edgekit.errors import first_line
from edgekit.onnx_nodes import attr as _attr
from edgekit.passes._wpr import Emitter
from edgekit.passes.core import PassRefused

ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Where", "Equal", "Less", "LessOrEqual",
               "Greater", "GreaterOrEqual", "And", "Or", "Xor", "Max", "Min", "Sum", "Mean",
               "Mod", "PRelu"}
PER_TOKEN = {"Softmax", "LayerNormalization", "RMSNormalization", "SkipLayerNormalization",
             "SimplifiedLayerNormalization", "Gelu", "FastGelu", "Erf", "Tanh", "Relu",
             "Sigmoid", "Cast", "Sqrt", "Reciprocal", "Neg", "Exp", "Log", "Identity", "Dropout",
             "Abs", "HardSigmoid", "HardSwish", "Clip", "Softplus", "Not", "Mish", "Elu",
             "LeakyRelu", "Selu", "Sin", "Cos", "Floor", "Ceil", "Round", "Sign", "IsNaN"}
REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2",
          "ReduceL1", "ReduceSumSquare", "ReduceLogSumExp"}


@dataclass
class GraphInfo:
    model: onnx.ModelProto
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    consts: dict[str, np.ndarray] = field(default_factory=dict)
    producer: dict[str, onnx.NodeProto] = field(default_factory=dict)
    consumers: dict[str, list[onnx.NodeProto]] = field(default_factory=dict)
    order: dict[int, int] = field(default_factory=dict)
    opset: int = 18

    def shape(self, name: str) -> tuple[int, ...] | None:
        return self.shapes.get(name)

    def is_const(self, name: str) -> bool:
        return name in self.consts

    def position(self, node: onnx.NodeProto) -> int:
        return self.order[id(node)]


def graph_info(model: onnx.ModelProto) -> GraphInfo:
    """A shape-inferred copy of ``model`` with lookup tables."""
    model = copy.deepcopy(model)
    del model.graph.value_info[:]
    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except onnx.shape_inference.InferenceError as exc:
        raise PassRefused(f"shape inference failed: {first_line(exc)}") from None
    g = model.graph
    info = GraphInfo(model, opset=next((o.version for o in model.opset_import
                                        if o.domain in ("", "ai.onnx")), 18))
    for vi in [*g.input, *g.value_info, *g.output]:
        t = vi.type.tensor_type
        if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
            info.shapes[vi.name] = tuple(d.dim_value for d in t.shape.dim)
    for init in g.initializer:
        info.consts[init.name] = numpy_helper.to_array(init)
        info.shapes[init.name] = tuple(init.dims)
    for i, node in enumerate(g.node):
        info.order[id(node)] = i
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            info.consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        for out in node.output:
            info.producer[out] = node
        for x in node.input:
            info.consumers.setdefault(x, []).append(node)
    return info


class _Walk:
    def __init__(self, info: GraphInfo, e: Emitter, idx: str, n: int, k: int, b: int):
        self.info, self.e, self.idx, self.n, self.k, self.b = info, e, idx, n, k, b
        self.tok: dict[str, set[int]] = {}
        self.alias: dict[str, str] = {}  # new value -> the value it stands for (its old shape)

    def old_shape(self, name: str) -> tuple[int, ...] | None:
        return self.info.shape(self.alias.get(name, name))

    def refuse(self, node: onnx.NodeProto, why: str):
        raise PassRefused(f"{node.op_type} node {node.name!r} {why}", node.name)

    def const_input(self, node: onnx.NodeProto, i: int) -> np.ndarray:
        if i >= len(node.input) or node.input[i] not in self.info.consts:
            self.refuse(node, f"needs a constant input {i} to follow the token count")
        return self.info.consts[node.input[i]]

    def set_const(self, node: onnx.NodeProto, i: int, value: np.ndarray) -> None:
        node.input[i] = self.e.const(value, "shape")

    def gather_side(self, node: onnx.NodeProto, i: int, axes: set[int], rank: int) -> None:
        """Gather input ``i`` along the token axes (output coordinates) where it spells N."""
        name = node.input[i]
        shape = list(self.old_shape(name) or ())
        have = self.tok.get(name, set())
        off = rank - len(shape)
        for t in sorted(axes):
            a = t - off
            if a < 0 or a in have or shape[a] == 1:
                continue
            if shape[a] != self.n or off or a == 0 or shape[0] not in (1, self.b):
                self.refuse(node, f"meets the pruned tokens with input {name!r} shaped "
                                  f"{tuple(shape)}, which it cannot gather")
            old = self.alias.get(name, name)
            name = self.e.gather_tokens(name, tuple(shape), a, self.idx, self.b)
            self.alias[name] = old
            shape[a], shape[0] = self.k, max(shape[0], self.b)
            have = have | {a}
        node.input[i] = name

    def visit(self, node: onnx.NodeProto) -> list[set[int]]:
        op, ins = node.op_type, list(node.input)
        t = [self.tok.get(x, set()) for x in ins]
        rank = [len(self.old_shape(x) or ()) for x in ins]
        if op in PER_TOKEN:
            if any(t[1:]):
                self.refuse(node, "reads pruned tokens in a parameter input")
            return [set(t[0])] + [set() for _ in node.output[1:]]
        if op in ELEMENTWISE or op == "Concat":
            r = max(rank)
            axes = set().union(*({a + r - rk for a in ta} for ta, rk in zip(t, rank, strict=True)))
            if op == "Concat" and (_attr(node, "axis") % r) in axes:
                self.refuse(node, "concatenates along the token axis")
            for i in range(len(ins)):
                if ins[i]:
                    self.gather_side(node, i, axes, r)
            return [axes]
        if op == "Transpose":
            perm = _attr(node, "perm") or list(range(rank[0]))[::-1]
            return [{j for j, p in enumerate(perm) if p in t[0]}]
        if op == "MatMul":
            return [self.matmul(node, t, rank)]
        if op == "Reshape":
            return [self.reshape(node, t[0])]
        if op == "Flatten":
            old = self.old_shape(ins[0])
            axis = _attr(node, "axis", 1) % max(len(old), 1)
            return [self.map_reshape(node, old, [math.prod(old[:axis]), math.prod(old[axis:])],
                                     t[0])]
        if op == "Gemm":
            if any(t[1:]) or _attr(node, "transA", 0) or t[0] != {0}:
                self.refuse(node, "reads pruned tokens other than as rows of A")
            return [{0}]
        if op in ("Unsqueeze", "Squeeze"):
            return [self.squeeze(node, t[0], rank[0])]
        if op == "Gather":
            return [self.gather(node, t, rank)]
        if op == "Slice":
            return [self.slice(node, t[0], rank[0])]
        if op in REDUCE:
            return [self.reduce(node, t[0], rank[0])]
        if op == "Expand":
            shape = self.const_input(node, 1).copy()
            r = max(rank[0], len(shape))
            axes = {a + r - rank[0] for a in t[0]}
            for a in axes:
                if a - (r - len(shape)) >= 0 and shape[a - (r - len(shape))] == self.n:
                    shape[a - (r - len(shape))] = self.k
            self.set_const(node, 1, shape)
            return [axes]
        if op == "Split":
            axis = _attr(node, "axis", 0) % rank[0]
            if axis in t[0]:
                self.refuse(node, "splits along the token axis")
            return [set(t[0]) for _ in node.output]
        self.refuse(node, "reads the pruned tokens and token-prune cannot follow it")
        return []

    def matmul(self, node, t, rank) -> set[int]:
        ra, rb = rank
        if min(ra, rb) < 2:
            self.refuse(node, "is a vector product over pruned tokens")
        r = max(ra, rb)
        out = {a + r - ra for a in t[0] if a < ra - 2} | {a + r - rb for a in t[1] if a < rb - 2}
        out |= {r - 2} if ra - 2 in t[0] else set()
        out |= {r - 1} if rb - 1 in t[1] else set()
        if (ra - 1 in t[0]) != (rb - 2 in t[1]):
            side = 1 if ra - 1 in t[0] else 0
            self.gather_side(node, side, {rank[side] - (1 if side else 2)}, rank[side])
        return out

    def reshape(self, node, axes: set[int]) -> set[int]:
        old_in = self.old_shape(node.input[0])
        target = [int(v) for v in self.const_input(node, 1)]
        if old_in is None:
            self.refuse(node, "has an input of unknown shape")
        out = [old_in[i] if v == 0 else v for i, v in enumerate(target)]
        if -1 in out:
            rest = math.prod(v for v in out if v != -1)
            out[out.index(-1)] = math.prod(old_in) // rest
        new_axes = self.map_reshape(node, old_in, out, axes)
        self.set_const(node, 1, np.array([self.k if j in new_axes else v
                                          for j, v in enumerate(out)], np.int64))
        return new_axes

    def map_reshape(self, node, old_in, out: list[int], axes: set[int]) -> set[int]:
        """Where each token axis of ``old_in`` lands in ``out`` (same leading element count)."""
        new_axes = set()
        for a in axes:
            prefix = math.prod(old_in[:a])
            j = next((j for j in range(len(out)) if out[j] == self.n
                      and math.prod(out[:j]) == prefix and j not in new_axes), None)
            if j is None:
                self.refuse(node, "merges the token axis with another axis")
            new_axes.add(j)
        return new_axes

    def _axes(self, node, rank: int, input_index: int) -> list[int] | None:
        if len(node.input) > input_index and node.input[input_index]:
            return [int(a) % rank for a in self.const_input(node, input_index).reshape(-1)]
        axes = _attr(node, "axes")
        return None if axes is None else [int(a) % rank for a in axes]

    def squeeze(self, node, axes: set[int], rank: int) -> set[int]:
        if node.op_type == "Unsqueeze":
            raw = self._raw_axes(node)
            added = {a % (rank + len(raw)) for a in raw}
            kept = [j for j in range(rank + len(raw)) if j not in added]
            return {kept[a] for a in axes}
        removed = self._axes(node, rank, 1)
        if removed is None:
            removed = [i for i, d in enumerate(self.old_shape(node.input[0]) or ()) if d == 1]
        if set(removed) & axes:
            self.refuse(node, "squeezes the token axis")
        kept = [i for i in range(rank) if i not in removed]
        return {kept.index(a) for a in axes}

    def _raw_axes(self, node) -> list[int]:
        if len(node.input) > 1 and node.input[1]:
            return [int(a) for a in self.const_input(node, 1).reshape(-1)]
        return list(_attr(node, "axes", []))

    def gather(self, node, t, rank) -> set[int]:
        axis = _attr(node, "axis", 0) % rank[0]
        if t[1]:
            self.refuse(node, "gathers with pruned indices")
        q = rank[1]
        if axis in t[0]:
            indices = self.const_input(node, 1)
            if indices.size and (indices.min() < 0 or indices.max() >= self.k):
                self.refuse(node, f"reads token positions beyond the {self.k} kept")
        return {a if a < axis else a + q - 1 for a in t[0] if a != axis}

    def slice(self, node, axes: set[int], rank: int) -> set[int]:
        starts, ends = self.const_input(node, 1), self.const_input(node, 2).copy()
        sliced = self._axes(node, rank, 3) or list(range(len(starts)))
        steps = (self.const_input(node, 4) if len(node.input) > 4 and node.input[4]
                 else np.ones_like(starts))
        out = set(axes)
        for i, a in enumerate(sliced):
            if a not in axes:
                continue
            st, en = int(starts[i]) % (self.n + 1), int(ends[i])
            if steps[i] == 1 and st == 0 and en >= self.n:
                ends[i] = np.iinfo(np.int64).max
            elif steps[i] == 1 and st >= 0 and 0 < en <= self.k:
                out.discard(a)
            else:
                self.refuse(node, "slices token positions beyond the kept ones")
        self.set_const(node, 2, ends)
        return out

    def reduce(self, node, axes: set[int], rank: int) -> set[int]:
        index = 1 if node.op_type == "ReduceSum" and self.info.opset >= 13 or \
            self.info.opset >= 18 else 99
        reduced = self._axes(node, rank, index)
        reduced = reduced if reduced else list(range(rank))
        if _attr(node, "keepdims", 1):
            return axes - set(reduced)
        kept = [i for i in range(rank) if i not in reduced]
        return {kept.index(a) for a in axes if a in kept}


def follow_tokens(info: GraphInfo, at: onnx.NodeProto, e: Emitter, idx: str, n: int, k: int,
                  b: int) -> GraphInfo:
    """Gather tokens ``idx`` out of ``at``'s (B, N, D) output; re-shape the rest of the graph."""
    g = info.model.graph
    stream = at.output[0]
    pruned = e.gather_tokens(stream, info.shape(stream), 1, idx, b)
    walk = _Walk(info, e, idx, n, k, b)
    walk.tok[pruned] = {1}
    walk.alias[pruned] = stream
    start = info.position(at) + 1
    before, after = list(g.node[:start]), list(g.node[start:])
    emitted = len(e.nodes)
    tail: list[onnx.NodeProto] = []
    for node in after:
        node.input[:] = [pruned if x == stream else x for x in node.input]
        if any(x in walk.tok for x in node.input):
            mark = len(e.nodes)
            outs = walk.visit(node)
            tail.extend(e.nodes[mark:])
            for name, axes in zip(node.output, outs, strict=False):
                if axes:
                    walk.tok[name] = axes
        tail.append(node)
    for out in g.output:
        if out.name in walk.tok or out.name == stream:
            raise PassRefused(f"graph output {out.name!r} carries the tokens; pruning would "
                              "change its shape")
    del g.node[:]
    g.node.extend(before + e.nodes[:emitted] + tail)
    g.initializer.extend(e.inits)
    e.nodes.clear()
    e.inits.clear()
    return graph_info(info.model)
