"""Outlier reparameterizations for per-tensor activation quantization (exact in real arithmetic).

Both act on a last-axis LayerNormalization ``y = γ ⊙ n + β`` read by at least one linear layer
with a constant weight (``y·W + b``, through row-picking ops; ``_norm_affine``'s matcher), and
both are a per-channel affine ``y' = (y + t) / r`` written into the LN's γ, β and undone in
the linear readers by ``_norm_affine.fold_into`` (``W' = diag(r)·W``, ``b' = b − t·W``), so
``y'·W' + b' = y·W + b`` exactly; only the range of ``y'`` changes. Every other reader (the
residual Add of a post-LN BERT, where each LN output is also the residual stream) reads the
compensated ``y = y'·r − t`` instead: one Mul and one Add (no Add when ``t = 0``) on its own
branch, elementwise, which a compiler fuses into that reader; the linear readers' branch
still sees ``y'``, which is the one that is quantized:

* ``reparam_layernorm`` (RepQ-ViT eq. 5–6 / RepQuant): channel c's calibrated range
  [lo_c, hi_c] has asymmetric scale ``s_c = (hi_c − lo_c)/255`` and zero point
  ``z_c = −lo_c/s_c``; with ``s̃ = mean(s)``, ``z̃ = mean(z)``, ``r1 = s/s̃``, ``r2 = z − z̃``:
  ``γ' = γ/r1``, ``β' = (β + s⊙r2)/r1``, ``W' = diag(r1)·W``, ``b' = b − (s⊙r2)·W``. Every
  channel of ``y'`` then spans [−z̃·s̃, (255 − z̃)·s̃]: one per-tensor scale fits them all.
* ``smooth_layernorm`` (SmoothQuant migration): with per-channel activation absmax ``a_j``
  and weight row absmax ``w_j`` (over all readers), ``s_j = a_j^α / w_j^(1−α)``:
  ``γ' = γ/s``, ``β' = β/s``, ``W' = diag(s)·W``: activation outliers move into the weights,
  which are quantized per output channel.

Preconditions (else ``foldable`` gives the reason): constant γ (β optional) over the last
axis only, unused mean/inv-std outputs, at least one linear reader, the LN output itself not
a graph output, no graph output on a linear reader's row-picking path, weights not shared
with other nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from edgekit.passes._ir import Builder, const_array
from edgekit.passes._norm_affine import (
    Reader,
    _contraction_axis,
    _keeps_last_axis,
    fold_into,
    layer_norm_affine,
    linear_readers,
    shared_weight,
)


@dataclass(frozen=True)
class Readers:
    """Who reads a LayerNorm's output: linear layers (folded) and the rest (compensated)."""

    linear: list[Reader]
    others: list[tuple[ir.Node, int]]  # (node, input index) uses of the LN output


def _split(y: ir.Value, width: int) -> Readers:
    """Each direct use of ``y``: a linear layer, a row-picking path to linear layers only, or
    another reader (the whole use is compensated then)."""
    linear, others = [], []
    for use in y.uses():
        node = use.node
        axis = _contraction_axis(node, width) if use.idx == 0 else None
        if isinstance(axis, int):
            linear.append(Reader(node, axis, ()))
            continue
        # a row-picking op needs y's shape to be seen keeping the last axis; unknown: other
        if use.idx == 0 and axis is None and y.shape is not None \
                and _keeps_last_axis(node, y):
            below, why = linear_readers(node.outputs[0], width)
            if not why:
                linear += [Reader(r.node, r.axis, (node, *r.path)) for r in below]
                continue
        others.append((node, use.idx))
    return Readers(linear, others)


def foldable(ln: ir.Node) -> tuple[Readers, str]:
    """The readers of a LayerNormalization's output, or (no readers, why it is not foldable)."""
    none = Readers([], [])
    gamma, _, why = layer_norm_affine(ln)
    if why:
        return none, why
    if ln.outputs[0].is_graph_output():
        return none, f"its output {ln.outputs[0].name!r} is a graph output"
    readers = _split(ln.outputs[0], gamma.size)
    if not readers.linear:
        return none, "no linear layer with a constant weight reads it"
    why = shared_weight(readers.linear)
    return (readers, "") if not why else (none, why)


def _compensate(b: Builder, ln: ir.Node, others: list[tuple[ir.Node, int]], r: np.ndarray,
                t: np.ndarray, dtype: np.dtype) -> None:
    """The non-linear readers read ``y = y'·r − t`` (one Mul, one Add when ``t ≠ 0``)."""
    y = ln.outputs[0]
    at = b.at(ln, after=True, hint=f"{ln.name}_undo", like=y)
    x = at.op("Mul", [y, at.const(r.astype(dtype), f"{ln.name}_undo_scale")], shape=y.shape)
    if np.any(t):
        x = at.op("Add", [x, at.const((-t).astype(dtype), f"{ln.name}_undo_shift")],
                  shape=y.shape)
    for node, index in others:
        node.replace_input_with(index, x)


def _rewrite(b: Builder, ln: ir.Node, readers: Readers, r: np.ndarray, t: np.ndarray) -> None:
    """LN output ``y`` becomes ``(y + t) / r``; linear readers get ``W' = diag(r)·W``,
    ``b' = b − t·W``; the others read ``y'·r − t``."""
    gamma = const_array(ln.inputs[1]).astype(np.float64)
    beta = const_array(ln.inputs[2]) if len(ln.inputs) > 2 and ln.inputs[2] is not None \
        else None
    beta = np.zeros_like(gamma) if beta is None else beta.astype(np.float64)
    dtype = const_array(ln.inputs[1]).dtype
    others = list(readers.others)  # taken before the compensation adds its own reader
    fold_into(b, readers.linear, r, -t if np.any(t) else None)
    if others:
        _compensate(b, ln, others, r, t, dtype)
    b.set_const(ln, 1, (gamma / r).astype(dtype))
    if len(ln.inputs) < 3:
        ln.resize_inputs(3)
    b.set_const(ln, 2, ((beta + t) / r).astype(dtype))


def reparam_layernorm(b: Builder, ln: ir.Node, readers: Readers, lo: np.ndarray,
                      hi: np.ndarray) -> dict:
    """RepQ-ViT: per-channel ranges [lo, hi] of the LN output brought to one per-tensor range."""
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    s = (hi - lo) / 255
    s = np.maximum(s, 1e-6 * max(float(s.max()), 1e-30))  # a constant channel keeps a scale
    z = -lo / s
    s_t, z_t = float(s.mean()), float(z.mean())
    r1, r2 = s / s_t, z - z_t
    _rewrite(b, ln, readers, r1, s * r2)
    return {"scale": s_t, "zero_point": z_t, "r1_range": [float(r1.min()), float(r1.max())],
            "compensated": len(readers.others)}


def smooth_layernorm(b: Builder, ln: ir.Node, readers: Readers, act_absmax: np.ndarray,
                     alpha: float) -> dict:
    """SmoothQuant: ``s_j = a_j^α / w_j^(1−α)`` folded into the LN and its readers."""
    a = np.asarray(act_absmax, np.float64)
    w = np.zeros_like(a)
    for r in readers.linear:
        weight = np.abs(const_array(r.node.inputs[1]).astype(np.float64))
        w = np.maximum(w, weight.max(axis=1 - r.axis))
    ok = (a > 0) & (w > 0)
    s = np.ones_like(a)
    s[ok] = a[ok] ** alpha / w[ok] ** (1 - alpha)
    _rewrite(b, ln, readers, s, np.zeros_like(s))
    return {"alpha": alpha, "s_range": [float(s.min()), float(s.max())],
            "act_absmax_spread": float(a.max() / max(np.median(a), 1e-30)),
            "compensated": len(readers.others)}
