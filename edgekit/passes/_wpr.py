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

Every count is static: TopK, GatherElements and Slice only, so TVM compiles the result. The
nodes are written through the passes' ``Builder`` (onnx-ir), wherever the builder stands.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgekit.passes._ir import Builder

BIG = 1e9
F32 = np.dtype(np.float32)

Keys = tuple[ir.Value, str, tuple[int, ...]]  # (value, layout bhdn | bhnd | bnd, shape)


def _i64(values) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def _f32(b: Builder, number: float) -> ir.Value:
    return b.scalar(number, F32, f"{b.hint}_c")


def _topk(b: Builder, x: ir.Value, k: int, largest: int) -> tuple[ir.Value, ir.Value]:
    values, indices = b.op_multi("TopK", [x, b.const(_i64([k]), f"{b.hint}_k")],
                                 {"axis": -1, "largest": largest, "sorted": 1}, 2)
    return values, indices


def _slice1(b: Builder, x: ir.Value, start: int, end: int) -> ir.Value:
    """``x[:, start:end]``."""
    starts, ends, axes, steps = (b.const(_i64([v]), f"{b.hint}_s") for v in (start, end, 1, 1))
    return b.op("Slice", [x, starts, ends, axes, steps])


def gather_tokens(b: Builder, x: ir.Value, shape: tuple[int, ...], axis: int, idx: ir.Value,
                  batch: int) -> ir.Value:
    """``x`` (dim ``axis`` = tokens, dim 0 = batch or 1) restricted to ``idx`` (B, k)."""
    target = list(shape)
    if target[0] == 1 and batch > 1:
        target[0] = batch
        x = b.op("Expand", [x, b.const(_i64(target), f"{b.hint}_shape")])
    view = [1] * len(shape)
    view[0] = batch
    view[axis] = -1
    col = b.op("Reshape", [idx, b.const(_i64(view), f"{b.hint}_view")])
    target[axis] = 1  # Expand keeps col's k along the token axis
    index = b.op("Expand", [col, b.const(_i64(target), f"{b.hint}_shape")])
    return b.op("GatherElements", [x, index], {"axis": axis})


def emit_select(b: Builder, probs: ir.Value, shape: tuple[int, int, int, int], k: int, r: int,
                cls: int, iters: int, vmin: float, vmax: float, method: str, seed: int,
                keys: Keys | None, eir: bool = True) -> ir.Value:
    """Nodes computing the sorted kept indices (B, k) int64 from ``probs`` (B, H, N, N).

    ``keys`` is (value, layout, shape) with layout ``bhdn`` (Kᵀ), ``bhnd`` or ``bnd``; None
    only when ``r == 0``."""
    bs, h, n, _ = shape
    if method == "random":
        rng = np.random.default_rng(seed)
        score = b.op("Expand", [b.const(rng.random((1, n), dtype=np.float32), f"{b.hint}_rand"),
                                b.const(_i64([bs, n]), f"{b.hint}_shape")])
    else:
        s = b.const(np.full((1, 1, 1, n), 1.0 / n, np.float32), f"{b.hint}_s0")
        for _ in range(1 if method == "colmean" else iters):
            s = b.op("MatMul", [s, probs])
        sh = b.op("Reshape", [s, b.const(_i64([bs, h, n]), f"{b.hint}_shape")])
        if method == "wpr":
            score = _heads_wpr(b, sh, n, vmin, vmax, eir)
        else:
            score = b.reduce("ReduceSum", sh, [1], keepdims=False)
    protect = np.arange(n) < cls
    score = b.op("Where", [b.const(protect, f"{b.hint}_cls"), _f32(b, BIG), score])
    vals, order = _topk(b, score, k + r, largest=1)
    if r > 0:
        k_i = k + r
        n_a = min(k_i - cls, max(r, k_i - k_i // 2))
        n_b = k_i - n_a
        kv, layout, kshape = keys
        if layout == "bhdn":
            km = b.op("Transpose", [b.reduce("ReduceMean", kv, [1], keepdims=False)],
                      {"perm": [0, 2, 1]})
        elif layout == "bhnd":
            km = b.reduce("ReduceMean", kv, [1], keepdims=False)
        else:
            km = kv
        norm = b.op("Sqrt", [b.reduce("ReduceSum", b.op("Mul", [km, km]), [-1], keepdims=True)])
        kn = b.op("Div", [km, b.op("Add", [norm, _f32(b, 1e-6)])])
        d = kshape[2] if layout == "bhdn" else kshape[-1]
        ks = gather_tokens(b, kn, (bs, n, d), 1, order, bs)
        sim = b.op("MatMul", [_slice1(b, ks, n_b, k_i),
                              b.op("Transpose", [_slice1(b, ks, 0, n_b)], {"perm": [0, 2, 1]})])
        best = b.reduce("ReduceMax", sim, [-1], keepdims=False)
        pad = b.op("Cast", [b.op("LessOrEqual", [_slice1(b, vals, n_b, k_i), _f32(b, 0)])],
                   {"to": ir.DataType.FLOAT})
        prio = b.op("Add", [best, b.op("Mul", [pad, _f32(b, 3)])])
        _, low = _topk(b, prio, n_a - r, largest=0)
        kept_a = b.op("GatherElements", [_slice1(b, order, n_b, k_i), low], {"axis": 1})
        order = b.op("Concat", [_slice1(b, order, 0, n_b), kept_a], {"axis": 1})
    as_float = b.op("Cast", [order], {"to": ir.DataType.FLOAT})
    ascending, _ = _topk(b, as_float, k, largest=0)
    return b.op("Cast", [ascending], {"to": ir.DataType.INT64})


def _heads_wpr(b: Builder, sh: ir.Value, n: int, vmin: float, vmax: float,
               eir: bool) -> ir.Value:
    """(B, N) importance from per-head WPR scores ``sh`` (B, H, N): head filter, then RMS (EIR)
    or mean over the kept heads."""
    dev = b.op("Sub", [b.op("Mul", [sh, _f32(b, n)]), _f32(b, 1)])
    var = b.reduce("ReduceMean", b.op("Mul", [dev, dev]), [-1], keepdims=True)
    ok = b.op("And", [b.op("GreaterOrEqual", [var, _f32(b, vmin)]),
                      b.op("LessOrEqual", [var, _f32(b, vmax)])])
    w = b.op("Cast", [ok], {"to": ir.DataType.FLOAT})
    count = b.reduce("ReduceSum", w, [1], keepdims=True)
    any_ok = b.op("Greater", [count, _f32(b, 0)])
    w = b.op("Where", [any_ok, w, _f32(b, 1)])
    count = b.reduce("ReduceSum", w, [1], keepdims=False)  # (B, 1), at least 1
    per_head = b.op("Mul", [sh, sh]) if eir else sh
    total = b.reduce("ReduceSum", b.op("Mul", [per_head, w]), [1], keepdims=False)
    mean = b.op("Div", [total, count])
    return b.op("Sqrt", [mean]) if eir else mean
