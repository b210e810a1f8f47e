"""Zero-TPrune token selection written as static-shape ONNX nodes (techniques.md §5).

``emit_select`` turns one layer's attention probabilities ``A`` (B, H, N, N; row i = query i,
so ``A_ij`` is the attention token i pays to token j) into the sorted indices (B, k) of the
tokens to keep:

1. Importance. ``wpr``: Weighted PageRank on each head's attention graph, the paper's power
   iteration ``s⁰ = 1/N``, ``s^{t+1} = Aᵀ s^t`` (``s_j ← Σ_i A_ij s_i``: a token is important
   when important tokens attend to it). Rows of A sum to 1, so every ``s^t`` stays a
   distribution; the iteration count is fixed (one MatMul each).
   Variance-based head filter: head h counts only if var(N·s_h) (0 for a uniform
   distribution, N−1 for a one-hot one; N·s_h has mean 1, so the bound does not depend on N)
   lies in [vmin, vmax]: too flat heads rank nothing, too peaked ones (a sink) rank one token;
   if no head passes, all count. The paper's bounds are [0.01, 0.7] on a variance whose scale
   our sources do not state; the pass defaults to [0.01, ∞): on var(N·s), vmax=0.7 measured
   worse on digits-vit in 15 of 16 settings (KL) and rejects every MiniLM head (its [CLS]/[SEP]
   sinks give var 17–29), so it falls back to all heads (bench/token_prune.py).
   Emphasizing Informative Region (EIR, ``eir``): the kept heads are combined by the root
   mean square ``sqrt(Σ_h w_h s_h² / Σ_h w_h)`` instead of the mean, so a token that one head
   finds very important is not averaged away by heads that ignore it; without ``eir`` the
   (filtered) mean. ``colmean``: the column mean of A over heads and queries (one step from
   uniform, no head filter: the third-party "TokenRank"). ``random``: fixed seeded scores.
   The last two are the baselines.
2. The first ``cls`` tokens get a huge score (always kept).
3. I-stage: TopK keeps the ``k + r`` most important tokens.
4. S-stage (r > 0): the survivors, ranked by importance, split into the more important target
   set (first half) and the less important source set (the rest, at least r). Each source
   token's priority is its largest cosine similarity to a target token (head-mean keys);
   tokens with zero importance (padding: every query gives them zero attention) come first.
   The r source tokens with the highest priority are pruned.
5. The kept indices are sorted ascending, so token order (and the CLS position) is kept.

Every count is static: TopK, GatherElements and Slice only, so TVM compiles the result.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

BIG = 1e9


class Emitter:
    """Appends nodes and constants to lists, with names unique under ``prefix``."""

    def __init__(self, prefix: str, opset: int):
        self.prefix, self.opset = prefix, opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def _name(self, hint: str) -> str:
        self._n += 1
        return f"{self.prefix}/{hint}_{self._n}"

    def const(self, value, hint: str = "c", dtype=None) -> str:
        name = self._name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], outputs: int = 1, **attrs) -> str | list[str]:
        outs = [self._name(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self._name(op_type),
                                           **attrs))
        return outs[0] if outputs == 1 else outs

    def reduce(self, op_type: str, x: str, axes: list[int], keepdims: int) -> str:
        if op_type == "ReduceSum" and self.opset >= 13 or self.opset >= 18:
            return self.op(op_type, [x, self.const(axes, "axes", np.int64)], keepdims=keepdims)
        return self.op(op_type, [x], axes=axes, keepdims=keepdims)

    def topk(self, x: str, k: int, largest: int) -> list[str]:
        return self.op("TopK", [x, self.const([k], "k", np.int64)], outputs=2, axis=-1,
                       largest=largest, sorted=1)

    def slice1(self, x: str, start: int, end: int) -> str:
        """``x[:, start:end]``."""
        starts, ends, axes, steps = (self.const([v], "s", np.int64) for v in (start, end, 1, 1))
        return self.op("Slice", [x, starts, ends, axes, steps])

    def gather_tokens(self, x: str, shape: tuple[int, ...], axis: int, idx: str,
                      batch: int) -> str:
        """``x`` (dim ``axis`` = tokens, dim 0 = batch or 1) restricted to ``idx`` (B, k)."""
        target = list(shape)
        if target[0] == 1 and batch > 1:
            target[0] = batch
            x = self.op("Expand", [x, self.const(target, "shape", np.int64)])
        view = [1] * len(shape)
        view[0] = batch
        view[axis] = -1
        col = self.op("Reshape", [idx, self.const(view, "view", np.int64)])
        target[axis] = 1  # Expand keeps col's k along the token axis
        index = self.op("Expand", [col, self.const(target, "shape", np.int64)])
        return self.op("GatherElements", [x, index], axis=axis)


def emit_select(e: Emitter, probs: str, shape: tuple[int, int, int, int], k: int, r: int,
                cls: int, iters: int, vmin: float, vmax: float, method: str, seed: int,
                keys: tuple[str, str, tuple[int, ...]] | None, eir: bool = True) -> str:
    """Nodes computing the sorted kept indices (B, k) int64 from ``probs`` (B, H, N, N).

    ``keys`` is (value, layout, shape) with layout ``bhdn`` (Kᵀ), ``bhnd`` or ``bnd``; None
    only when ``r == 0``."""
    b, h, n, _ = shape
    if method == "random":
        rng = np.random.default_rng(seed)
        score = e.op("Expand", [e.const(rng.random((1, n), dtype=np.float32), "rand"),
                                e.const([b, n], "shape", np.int64)])
    else:
        s = e.const(np.full((1, 1, 1, n), 1.0 / n, np.float32), "s0")
        for _ in range(1 if method == "colmean" else iters):
            s = e.op("MatMul", [s, probs])
        sh = e.op("Reshape", [s, e.const([b, h, n], "shape", np.int64)])
        if method == "wpr":
            score = _heads_wpr(e, sh, n, vmin, vmax, eir)
        else:
            score = e.reduce("ReduceSum", sh, [1], 0)
    protect = np.arange(n) < cls
    score = e.op("Where", [e.const(protect, "cls"), e.const(np.float32(BIG)), score])
    vals, order = e.topk(score, k + r, largest=1)
    if r > 0:
        k_i = k + r
        n_a = min(k_i - cls, max(r, k_i - k_i // 2))
        n_b = k_i - n_a
        kv, layout, kshape = keys
        if layout == "bhdn":
            km = e.op("Transpose", [e.reduce("ReduceMean", kv, [1], 0)], perm=[0, 2, 1])
        elif layout == "bhnd":
            km = e.reduce("ReduceMean", kv, [1], 0)
        else:
            km = kv
        norm = e.op("Sqrt", [e.reduce("ReduceSum", e.op("Mul", [km, km]), [-1], 1)])
        kn = e.op("Div", [km, e.op("Add", [norm, e.const(np.float32(1e-6))])])
        d = kshape[2] if layout == "bhdn" else kshape[-1]
        ks = e.gather_tokens(kn, (b, n, d), 1, order, b)
        sim = e.op("MatMul", [e.slice1(ks, n_b, k_i),
                              e.op("Transpose", [e.slice1(ks, 0, n_b)], perm=[0, 2, 1])])
        best = e.reduce("ReduceMax", sim, [-1], 0)
        pad = e.op("Cast", [e.op("LessOrEqual", [e.slice1(vals, n_b, k_i),
                                                 e.const(np.float32(0))])],
                   to=TensorProto.FLOAT)
        prio = e.op("Add", [best, e.op("Mul", [pad, e.const(np.float32(3))])])
        _, low = e.topk(prio, n_a - r, largest=0)
        kept_a = e.op("GatherElements", [e.slice1(order, n_b, k_i), low], axis=1)
        order = e.op("Concat", [e.slice1(order, 0, n_b), kept_a], axis=1)
    as_float = e.op("Cast", [order], to=TensorProto.FLOAT)
    ascending, _ = e.topk(as_float, k, largest=0)
    return e.op("Cast", [ascending], to=TensorProto.INT64)


def _heads_wpr(e: Emitter, sh: str, n: int, vmin: float, vmax: float, eir: bool) -> str:
    """(B, N) importance from per-head WPR scores ``sh`` (B, H, N): head filter, then RMS (EIR)
    or mean over the kept heads."""
    dev = e.op("Sub", [e.op("Mul", [sh, e.const(np.float32(n))]), e.const(np.float32(1))])
    var = e.reduce("ReduceMean", e.op("Mul", [dev, dev]), [-1], 1)
    ok = e.op("And", [e.op("GreaterOrEqual", [var, e.const(np.float32(vmin))]),
                      e.op("LessOrEqual", [var, e.const(np.float32(vmax))])])
    w = e.op("Cast", [ok], to=TensorProto.FLOAT)
    count = e.reduce("ReduceSum", w, [1], 1)
    any_ok = e.op("Greater", [count, e.const(np.float32(0))])
    w = e.op("Where", [any_ok, w, e.const(np.float32(1))])
    count = e.reduce("ReduceSum", w, [1], 0)  # (B, 1), at least 1
    per_head = e.op("Mul", [sh, sh]) if eir else sh
    mean = e.op("Div", [e.reduce("ReduceSum", e.op("Mul", [per_head, w]), [1], 0), count])
    return e.op("Sqrt", [mean]) if eir else mean
