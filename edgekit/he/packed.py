"""Token-packed CKKS evaluation of transformer blocks: the sequence lives in the slots.

One ciphertext per element (``ckks.evaluate``) costs one ciphertext product per scalar
multiply-add of the model: a seq-8, width-32 attention block needs ~33,000 of them, about an
hour at ring 32768. Here a tensor with a token axis is an object array over its *other* axes,
each ciphertext holding all tokens in its slots, in one of three layouts over T² slots
(tiled over the ring, so every rotation by a multiple of T is cyclic), slot p = r·T + t:

* ``row``  (a tensor with a query-token axis):  slot (r, t) holds v[t];
* ``key``  (the same tensor read as keys):      slot (r, t) holds v[(t + r) mod T];
* ``pair`` (attention scores, axes query, key): slot (r, t) holds v[t, (t + r) mod T].

The client encrypts each input in the layouts the graph needs (a backward pass: the left
operand of QKᵀ is ``row``, its right operand ``key``; AV takes ``pair`` and ``key``; every
other op keeps its output's layout). Then, node by node:

* ops along non-token axes (MatMul / Add / Mul with plaintext weights, Reshape, Transpose)
  act on the object array as in the per-element runner: W·x is Σᵢ wᵢ·xᵢ with one rescale;
* QKᵀ is Σ_k q_k ⊙ k_k (row ⊙ key = every (query, key) pair in the slots): no rotation;
* a reduction over the key axis of a ``pair`` (softmax sums, means) is a rotate-and-sum by
  T, 2T, ..., T²/2: the result is replicated over r, i.e. already broadcast (keepdims);
* AV is, per output element, a ciphertext product and the same rotate-and-sum over r.

Depth is the checker's (rotations are free); Galois keys are made for the log2 T steps only.
T must be a power of two with T² ≤ the slot count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from edgekit.errors import EdgekitError
from edgekit.he.graph_walk import evaluate_graph
from edgekit.he.seal import Ct, Engine
from edgekit.onnx_nodes import attr as _attr

ROW, KEY, PAIR = "row", "key", "pair"


@dataclass
class Packed:
    """A ciphertext tensor: logical ``shape``; ``tok`` its token axes (negative indices)."""

    kind: str
    shape: tuple[int, ...]
    tok: tuple[int, ...]
    cts: np.ndarray  # object array over the logical axes other than ``tok``


def rotations(seq: int) -> list[int]:
    return [seq << i for i in range(int(math.log2(seq)))]


def _slots(seq: int) -> tuple[np.ndarray, np.ndarray]:
    p = np.arange(seq * seq)
    return p // seq, p % seq  # r, t


def _token_index(kind: str, seq: int) -> tuple[np.ndarray, ...]:
    r, t = _slots(seq)
    if kind == ROW:
        return (t,)
    if kind == KEY:
        return ((t + r) % seq,)
    return t, (t + r) % seq


def _outer_shape(shape: tuple[int, ...], tok: tuple[int, ...]) -> tuple[int, ...]:
    n = len(shape)
    return tuple(s for i, s in enumerate(shape) if i - n not in tok)


def _plain_slices(arr: np.ndarray, shape, tok, kind: str, seq: int) -> np.ndarray:
    """A plaintext broadcast to ``shape``, as per-ciphertext scalars or slot vectors."""
    full = np.broadcast_to(np.asarray(arr, dtype=np.float64), shape)
    n = len(shape)
    moved = np.moveaxis(full, [a + n for a in tok], list(range(n - len(tok), n)))
    outer = moved.shape[: n - len(tok)]
    idx = _token_index(kind, seq)
    out = np.empty(outer, dtype=object)
    for o in np.ndindex(*outer):
        block = moved[o]
        if np.all(block == block.reshape(-1)[0]):
            out[o] = float(block.reshape(-1)[0])
        else:
            sel = tuple(np.minimum(i, s - 1) for i, s in zip(idx, block.shape, strict=True))
            out[o] = block[sel]
    return out


def encrypt(engine: Engine, x: np.ndarray, kind: str, seq: int) -> Packed:
    """Client side: ``x`` (..., T, D) with its token axis at -2, in layout ``kind``."""
    x = np.asarray(x, dtype=np.float64)
    vectors = _plain_slices(x, x.shape, (-2,), kind, seq)
    cts = np.empty(vectors.shape, dtype=object)
    for o in np.ndindex(*vectors.shape):
        cts[o] = engine.encrypt(np.broadcast_to(vectors[o], (seq * seq,)))
    return Packed(kind, x.shape, (-2,), cts)


def decrypt(engine: Engine, v: Packed, seq: int) -> np.ndarray:
    n = len(v.shape)
    moved = np.empty(_outer_shape(v.shape, v.tok) + tuple(v.shape[a] for a in v.tok))
    idx = _token_index(v.kind, seq)
    r, _ = _slots(seq)
    for o in np.ndindex(*v.cts.shape):
        slots = engine.decrypt(v.cts[o])[: seq * seq]
        block = moved[o]
        pick = r == 0 if v.kind != PAIR else np.ones_like(r, dtype=bool)
        sel = tuple(np.minimum(i[pick], s - 1) for i, s in zip(idx, block.shape, strict=True))
        block[sel] = slots[pick]
    return np.moveaxis(moved, list(range(n - len(v.tok), n)), [a + n for a in v.tok])


def _rotsum(engine: Engine, x: Ct, seq: int) -> Ct:
    for step in rotations(seq):
        x = x + engine.rotate(x, step)
    return x


def _relayout(v: Packed, shape: tuple[int, ...], tok_pos: list[int], order=None) -> Packed:
    n = len(shape)
    tok = tuple(sorted(p - n for p in tok_pos))
    cts = v.cts if order is None else np.transpose(v.cts, order)
    return Packed(v.kind, tuple(shape), tok, cts.reshape(_outer_shape(tuple(shape), tok)))


def _reshape(v: Packed, shape: list[int]) -> Packed:
    shape = list(np.empty(v.shape, dtype=np.int8).reshape(
        [v.shape[i] if s == 0 else s for i, s in enumerate(shape)]).shape)
    n, pos = len(v.shape), []
    for a in v.tok:
        prefix = math.prod(v.shape[: a + n])
        found = [b for b in range(len(shape))
                 if math.prod(shape[:b]) == prefix and shape[b] == v.shape[a]]
        if not found:
            raise EdgekitError(f"a Reshape {v.shape} -> {tuple(shape)} splits or merges the "
                               "token axis: the token-packed runner cannot follow it")
        pos.append(found[0])
    return _relayout(v, tuple(shape), pos)


def _transpose(v: Packed, perm: list[int]) -> Packed:
    n = len(v.shape)
    tok_pos = [a + n for a in v.tok]
    new_pos = [perm.index(p) for p in tok_pos]
    if new_pos != sorted(new_pos):
        raise EdgekitError("a Transpose swaps the query and key axes of attention scores")
    outer_old = [i for i in range(n) if i not in tok_pos]
    order = [outer_old.index(p) for p in perm if p not in tok_pos]
    return _relayout(v, tuple(v.shape[p] for p in perm), new_pos, order)


def _elementwise(op: str, a, b, seq: int):
    pa, pb = isinstance(a, Packed), isinstance(b, Packed)
    ref = a if pa else b
    shape = np.broadcast_shapes(a.shape if pa else np.shape(a), b.shape if pb else np.shape(b))
    if pa and pb:
        if (a.kind, a.tok) != (b.kind, b.tok):
            raise EdgekitError(f"{op} of two ciphertexts in different token layouts "
                               f"({a.kind} {a.tok}, {b.kind} {b.tok})")
        x, y = a.cts, b.cts
    else:
        other = _plain_slices(b if pa else a, shape, ref.tok, ref.kind, seq)
        x, y = (a.cts, other) if pa else (other, b.cts)
    if op == "Div":
        if pb:
            raise EdgekitError("Div by a ciphertext is not HE-evaluable")
        y = np.vectorize(lambda p: 1.0 / p, otypes=[object])(y)
        op = "Mul"
    fn = {"Add": lambda p, q: p + q, "Sub": lambda p, q: p - q, "Mul": lambda p, q: p * q}[op]
    x, y = np.broadcast_arrays(x, y)
    out = np.empty(x.shape, dtype=object)
    for o in np.ndindex(*x.shape):
        out[o] = fn(x[o], y[o])
    return Packed(ref.kind, tuple(shape), ref.tok, out)


def _reduce(engine: Engine, node: onnx.NodeProto, v: Packed, axes_in, seq: int) -> Packed:
    axes = axes_in if axes_in is not None else _attr(node, "axes", None)
    n = len(v.shape)
    axes = list(range(n)) if axes is None or np.size(axes) == 0 else [
        int(a) % n for a in np.reshape(axes, -1)]
    if not _attr(node, "keepdims", 1):
        raise EdgekitError(f"{node.op_type} without keepdims in the token-packed runner")
    cts, shape, count = v.cts, list(v.shape), 1
    outer_axes = [i for i in range(n) if i - n not in v.tok]
    for a in axes:
        count *= shape[a]
        if a - n in v.tok:
            if v.kind != PAIR or a - n != v.tok[1]:
                raise EdgekitError(f"{node.op_type} over a query-token axis is not supported "
                                   "by the token-packed runner")
            cts = np.vectorize(lambda c: _rotsum(engine, c, seq), otypes=[object])(cts)
        else:
            cts = np.sum(cts, axis=outer_axes.index(a), keepdims=True)
        shape[a] = 1
    if node.op_type == "ReduceMean":
        cts = np.vectorize(lambda c: c * (1.0 / count), otypes=[object])(cts)
    return Packed(v.kind, tuple(shape), v.tok, np.asarray(cts, dtype=object))


def _matmul(engine: Engine, a, b, seq: int) -> Packed:
    if isinstance(a, Packed) and not isinstance(b, Packed):
        w = np.asarray(b, dtype=np.float64)
        if w.ndim != 2 or -1 in a.tok:
            raise EdgekitError("MatMul by a plaintext needs a 2-D weight on a non-token axis")
        lead = a.cts.shape[:-1]
        out = np.empty((*lead, w.shape[1]), dtype=object)
        for o in np.ndindex(*lead):
            row = list(a.cts[o])
            for j in range(w.shape[1]):
                out[(*o, j)] = engine.lincomb(row, list(w[:, j]))
        return Packed(a.kind, (*a.shape[:-1], w.shape[1]), a.tok, out)
    if not (isinstance(a, Packed) and isinstance(b, Packed)):
        raise EdgekitError("MatMul of a plaintext by a ciphertext is not supported (packed)")
    batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    if (a.kind, a.tok, b.kind, b.tok) == (ROW, (-2,), KEY, (-1,)):  # Q·Kᵀ
        x, y = a.cts, b.cts  # (batch, k) each
        x, y = np.broadcast_to(x, (*batch, x.shape[-1])), np.broadcast_to(y, (*batch, y.shape[-1]))
        out = np.empty(batch, dtype=object)
        for o in np.ndindex(*batch):
            out[o] = engine.dot(list(x[o]), list(y[o]))
        return Packed(PAIR, (*batch, a.shape[-2], b.shape[-1]), (-2, -1), out)
    if (a.kind, a.tok, b.kind, b.tok) == (PAIR, (-2, -1), KEY, (-2,)):  # A·V
        m = b.shape[-1]
        x = np.broadcast_to(a.cts, batch)
        y = np.broadcast_to(b.cts, (*batch, m))
        out = np.empty((*batch, m), dtype=object)
        for o in np.ndindex(*batch):
            for j in range(m):
                out[(*o, j)] = _rotsum(engine, engine.dot([x[o]], [y[(*o, j)]]), seq)
        return Packed(ROW, (*batch, a.shape[-2], m), (-2,), out)
    raise EdgekitError(f"a ciphertext MatMul of layouts {a.kind}{a.tok} x {b.kind}{b.tok} is "
                       "neither Q·Kᵀ (row x key) nor A·V (pair x key)")


def needed_layouts(model: onnx.ModelProto, encrypted: set[str]) -> dict[str, set[str]]:
    """Backward pass: the layouts each ciphertext value must be computed in."""
    ct = set(encrypted)
    for node in model.graph.node:
        if any(i in ct for i in node.input) and node.op_type not in ("Shape", "Size"):
            ct.update(o for o in node.output if o)
    need: dict[str, set[str]] = {o.name: {ROW} for o in model.graph.output if o.name in ct}
    for node in reversed(model.graph.node):
        kinds = set().union(*(need.get(o, set()) for o in node.output))
        ins = [i for i in node.input if i in ct]
        if not kinds or not ins or node.op_type in ("Shape", "Size"):
            continue
        if node.op_type == "MatMul" and len(ins) == 2:
            for k in kinds:
                left = ROW if k == PAIR else PAIR
                need.setdefault(node.input[0], set()).add(left)
                need.setdefault(node.input[1], set()).add(KEY)
        else:
            for i in ins:
                need.setdefault(i, set()).update(kinds)
    return need


def evaluate(engine: Engine, model: onnx.ModelProto, feeds: dict[str, Any], seq: int,
             need: dict[str, set[str]], trace=None) -> list[Any]:
    """Server side. ``feeds``: plaintext arrays, or {layout: Packed} for encrypted inputs."""

    def node_in_layouts(node: onnx.NodeProto, args: list) -> dict[str, Packed]:
        out = {}
        for kind in need.get(node.output[0], set()):
            picked = []
            for pos, a in enumerate(args):
                if not isinstance(a, dict):
                    picked.append(a)
                    continue
                want = kind
                if node.op_type == "MatMul" and all(isinstance(x, dict) for x in args[:2]):
                    want = (ROW if kind == PAIR else PAIR) if pos == 0 else KEY
                picked.append(a[want])
            out[kind] = _node(engine, node, picked, seq)
        return out

    return evaluate_graph(model, feeds, lambda v: isinstance(v, dict),
                          lambda v: next(iter(v.values())).shape, node_in_layouts, trace)


def _node(engine: Engine, node: onnx.NodeProto, args: list, seq: int) -> Packed:
    op, x = node.op_type, args[0]
    if op in ("Identity", "Cast", "Dropout"):
        return x
    if op in ("Add", "Sub", "Mul", "Div"):
        return _elementwise(op, args[0], args[1], seq)
    if op == "Neg":
        return Packed(x.kind, x.shape, x.tok, np.vectorize(lambda c: -c, otypes=[object])(x.cts))
    if op == "MatMul":
        return _matmul(engine, args[0], args[1], seq)
    if op in ("ReduceSum", "ReduceMean"):
        return _reduce(engine, node, x, args[1] if len(args) > 1 else None, seq)
    if op == "Reshape":
        return _reshape(x, [int(s) for s in args[1]])
    if op == "Transpose":
        perm = _attr(node, "perm", None) or list(range(len(x.shape)))[::-1]
        return _transpose(x, list(perm))
    if op in ("Squeeze", "Unsqueeze"):
        axes = args[1] if len(args) > 1 and args[1] is not None else _attr(node, "axes", None)
        probe = np.empty(x.shape, dtype=np.int8)
        if op == "Squeeze":
            probe = np.squeeze(probe, None if axes is None else tuple(int(a) for a in axes))
        else:
            n = len(x.shape) + len(axes)
            probe = np.expand_dims(probe, tuple(int(a) % n for a in axes))
        return _reshape(x, list(probe.shape))
    raise EdgekitError(f"the token-packed CKKS runner does not evaluate {op} "
                       f"(node {node.name!r})")
