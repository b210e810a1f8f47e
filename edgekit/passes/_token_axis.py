"""Cut tokens out of a residual stream and re-shape everything downstream (for token-prune).

``follow_tokens`` inserts the gather of kept tokens after one node and walks the graph in
topological order, tracking which axes of each value are token axes (length N before, k after).
Per op it rewrites what spells N: Reshape / Expand shape constants, Slice ends; a value without
the token axis that meets a pruned one with N on the same axis is gathered with the same
indices (e.g. an additive attention mask). Ops it cannot follow raise ``PassRefused`` naming
the node. ``infer_shapes`` then infers every shape again, so the next cut sees the new ones.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir

from edgekit.errors import first_line
from edgekit.passes._ir import Builder, attr, const_array, index_of, static_shape
from edgekit.passes._wpr import gather_tokens
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


class _Walk:
    """The token axes of every value downstream of the cut; the edits that keep them valid.

    Values keep the shapes inferred before the cut until the walk ends, so ``old_shape`` is
    the shape with N tokens (``alias`` maps a value the walk made to the one it stands for).
    """

    def __init__(self, b: Builder, idx: ir.Value, n: int, k: int, batch: int):
        self.b, self.idx, self.n, self.k, self.batch = b, idx, n, k, batch
        self.tok: dict[ir.Value, set[int]] = {}
        self.alias: dict[ir.Value, ir.Value] = {}

    def old_shape(self, value: ir.Value | None) -> tuple[int, ...] | None:
        return static_shape(self.alias.get(value, value))

    def refuse(self, node: ir.Node, why: str):
        raise PassRefused(f"{node.op_type} node {node.name!r} {why}", node.name or "")

    def const_input(self, node: ir.Node, i: int) -> np.ndarray:
        arr = const_array(node.inputs[i]) if i < len(node.inputs) else None
        if arr is None:
            self.refuse(node, f"needs a constant input {i} to follow the token count")
        return arr

    def set_const(self, node: ir.Node, i: int, value: np.ndarray) -> None:
        self.b.set_const(node, i, np.asarray(value))

    def gather_side(self, node: ir.Node, i: int, axes: set[int], rank: int) -> None:
        """Gather input ``i`` along the token axes (output coordinates) where it spells N."""
        value = node.inputs[i]
        shape = list(self.old_shape(value) or ())
        have = self.tok.get(value, set())
        off = rank - len(shape)
        for t in sorted(axes):
            a = t - off
            if a < 0 or a in have or shape[a] == 1:
                continue
            if shape[a] != self.n or off or a == 0 or shape[0] not in (1, self.batch):
                self.refuse(node, f"meets the pruned tokens with input {value.name!r} shaped "
                                  f"{tuple(shape)}, which it cannot gather")
            old = self.alias.get(value, value)
            value = gather_tokens(self.b, value, tuple(shape), a, self.idx, self.batch)
            self.alias[value] = old
            shape[a], shape[0] = self.k, max(shape[0], self.batch)
            have = have | {a}
        node.replace_input_with(i, value)

    def visit(self, node: ir.Node) -> list[set[int]]:
        op, ins = node.op_type, list(node.inputs)
        t = [self.tok.get(x, set()) for x in ins]
        rank = [len(self.old_shape(x) or ()) for x in ins]
        if op in PER_TOKEN:
            if any(t[1:]):
                self.refuse(node, "reads pruned tokens in a parameter input")
            return [set(t[0])] + [set() for _ in node.outputs[1:]]
        if op in ELEMENTWISE or op == "Concat":
            r = max(rank)
            axes = set().union(*({a + r - rk for a in ta} for ta, rk in zip(t, rank, strict=True)))
            if op == "Concat" and (attr(node, "axis", 0) % r) in axes:
                self.refuse(node, "concatenates along the token axis")
            for i in range(len(ins)):
                if ins[i] is not None:
                    self.gather_side(node, i, axes, r)
            return [axes]
        if op == "Transpose":
            perm = attr(node, "perm", None) or list(range(rank[0]))[::-1]
            return [{j for j, p in enumerate(perm) if p in t[0]}]
        if op == "MatMul":
            return [self.matmul(node, t, rank)]
        if op == "Reshape":
            return [self.reshape(node, t[0])]
        if op == "Flatten":
            old = self.old_shape(ins[0])
            axis = attr(node, "axis", 1) % max(len(old), 1)
            return [self.map_reshape(node, old, [math.prod(old[:axis]), math.prod(old[axis:])],
                                     t[0])]
        if op == "Gemm":
            if any(t[1:]) or attr(node, "transA", 0) or t[0] != {0}:
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
            axis = attr(node, "axis", 0) % rank[0]
            if axis in t[0]:
                self.refuse(node, "splits along the token axis")
            return [set(t[0]) for _ in node.outputs]
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
        old_in = self.old_shape(node.inputs[0])
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
        if index_of(node, input_index):
            return [int(a) % rank for a in self.const_input(node, input_index).reshape(-1)]
        axes = attr(node, "axes", None)
        return None if axes is None else [int(a) % rank for a in axes]

    def squeeze(self, node, axes: set[int], rank: int) -> set[int]:
        if node.op_type == "Unsqueeze":
            raw = self._raw_axes(node)
            added = {a % (rank + len(raw)) for a in raw}
            kept = [j for j in range(rank + len(raw)) if j not in added]
            return {kept[a] for a in axes}
        removed = self._axes(node, rank, 1)
        if removed is None:
            removed = [i for i, d in enumerate(self.old_shape(node.inputs[0]) or ()) if d == 1]
        if set(removed) & axes:
            self.refuse(node, "squeezes the token axis")
        kept = [i for i in range(rank) if i not in removed]
        return {kept.index(a) for a in axes}

    def _raw_axes(self, node) -> list[int]:
        if index_of(node, 1):
            return [int(a) for a in self.const_input(node, 1).reshape(-1)]
        return list(attr(node, "axes", []))

    def gather(self, node, t, rank) -> set[int]:
        axis = attr(node, "axis", 0) % rank[0]
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
        steps = self.const_input(node, 4) if index_of(node, 4) else np.ones_like(starts)
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
        index = 1 if node.op_type == "ReduceSum" and self.b.opset >= 13 or \
            self.b.opset >= 18 else 99
        reduced = self._axes(node, rank, index)
        reduced = reduced if reduced else list(range(rank))
        if attr(node, "keepdims", 1):
            return axes - set(reduced)
        kept = [i for i in range(rank) if i not in reduced]
        return {kept.index(a) for a in axes if a in kept}


def follow_tokens(b: Builder, at: ir.Node, idx: ir.Value, n: int, k: int, batch: int) -> None:
    """Gather tokens ``idx`` out of ``at``'s (B, N, D) output; re-shape the rest of the graph.

    ``b`` writes after ``at`` (the selection is already there); the gather comes next.
    """
    graph, stream = at.graph, at.outputs[0]
    pruned = gather_tokens(b, stream, static_shape(stream), 1, idx, batch)
    nodes = list(graph)
    after = nodes[nodes.index(pruned.producer()) + 1:]  # the graph's own nodes after ``at``
    walk = _Walk(b, idx, n, k, batch)
    walk.tok[pruned] = {1}
    walk.alias[pruned] = stream
    for node in after:
        for i, x in enumerate(node.inputs):
            if x is stream:
                node.replace_input_with(i, pruned)
        if any(x in walk.tok for x in node.inputs):
            walk.b = b.at(node, hint=b.hint)  # what the walk adds goes before the node
            outs = walk.visit(node)
            for value, axes in zip(node.outputs, outs, strict=False):
                if axes:
                    walk.tok[value] = axes
    for out in graph.outputs:
        if out in walk.tok or out is stream:
            raise PassRefused(f"graph output {out.name!r} carries the tokens; pruning would "
                              "change its shape")


def infer_shapes(model: ir.Model) -> None:
    """Forget the shape of every value a node computes and infer all again (strict, with data
    propagation): a cut leaves stale shapes downstream. Refuses when inference fails."""
    graph = model.graph
    outputs = set(graph.outputs)
    for node in graph:
        for value in node.outputs:
            if value not in outputs:
                value.shape = None
    try:
        inferred = onnx.shape_inference.infer_shapes(ir.to_proto(model), strict_mode=True,
                                                     data_prop=True)
    except onnx.shape_inference.InferenceError as exc:
        raise PassRefused(f"shape inference failed: {first_line(exc)}") from None
    found = ir.convenience.create_value_mapping(ir.from_proto(inferred).graph)
    for node in graph:
        for value in node.outputs:
            new = found.get(value.name)
            if new is not None and new.shape is not None:
                value.shape = new.shape
                value.dtype = new.dtype if new.dtype is not None else value.dtype


