"""Outlier reparameterizations for per-tensor activation quantization (exact in real arithmetic).

Both act on a last-axis LayerNormalization ``y = γ ⊙ n + β`` whose every reader is a linear
layer with a constant weight (``y·W + b``, through row-picking ops; ``_norm_affine``'s matcher),
and both are a per-channel affine ``y' = (y + t) / r`` written into the LN's γ, β and undone in
the readers by ``_norm_affine.fold_into`` (``W' = diag(r)·W``, ``b' = b − t·W``), so
``y'·W' + b' = y·W + b`` exactly; only the range of ``y'`` changes:

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
axis only, unused mean/inv-std outputs, no graph output among the LN's readers, weights not
shared with other nodes.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgekit.passes._ir import Builder, const_array
from edgekit.passes._norm_affine import (
    Reader,
    fold_into,
    layer_norm_affine,
    linear_readers,
    shared_weight,
)


def foldable(ln: ir.Node) -> tuple[list[Reader], str]:
    """The linear readers of a LayerNormalization's output, or ([], why it is not foldable)."""
    gamma, _, why = layer_norm_affine(ln)
    if why:
        return [], why
    readers, why = linear_readers(ln.outputs[0], gamma.size)
    why = why or shared_weight(readers)
    return (readers, "") if not why else ([], why)


def _rewrite(b: Builder, ln: ir.Node, readers: list[Reader], r: np.ndarray,
             t: np.ndarray) -> None:
    """LN output ``y`` becomes ``(y + t) / r``; readers get ``W' = diag(r)·W``, ``b' = b − t·W``."""
    gamma = const_array(ln.inputs[1]).astype(np.float64)
    beta = const_array(ln.inputs[2]) if len(ln.inputs) > 2 and ln.inputs[2] is not None \
        else None
    beta = np.zeros_like(gamma) if beta is None else beta.astype(np.float64)
    dtype = const_array(ln.inputs[1]).dtype
    fold_into(b, readers, r, -t if np.any(t) else None)
    b.set_const(ln, 1, (gamma / r).astype(dtype))
    if len(ln.inputs) < 3:
        ln.resize_inputs(3)
    b.set_const(ln, 2, ((beta + t) / r).astype(dtype))


def reparam_layernorm(b: Builder, ln: ir.Node, readers: list[Reader], lo: np.ndarray,
                      hi: np.ndarray) -> dict:
    """RepQ-ViT: per-channel ranges [lo, hi] of the LN output brought to one per-tensor range."""
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    s = (hi - lo) / 255
    s = np.maximum(s, 1e-6 * max(float(s.max()), 1e-30))  # a constant channel keeps a scale
    z = -lo / s
    s_t, z_t = float(s.mean()), float(z.mean())
    r1, r2 = s / s_t, z - z_t
    _rewrite(b, ln, readers, r1, s * r2)
    return {"scale": s_t, "zero_point": z_t, "r1_range": [float(r1.min()), float(r1.max())]}


def smooth_layernorm(b: Builder, ln: ir.Node, readers: list[Reader], act_absmax: np.ndarray,
                     alpha: float) -> dict:
    """SmoothQuant: ``s_j = a_j^α / w_j^(1−α)`` folded into the LN and its readers."""
    a = np.asarray(act_absmax, np.float64)
    w = np.zeros_like(a)
    for r in readers:
        weight = np.abs(const_array(r.node.inputs[1]).astype(np.float64))
        w = np.maximum(w, weight.max(axis=1 - r.axis))
    ok = (a > 0) & (w > 0)
    s = np.ones_like(a)
    s[ok] = a[ok] ** alpha / w[ok] ** (1 - alpha)
    _rewrite(b, ln, readers, s, np.zeros_like(s))
    return {"alpha": alpha, "s_range": [float(s.min()), float(s.max())],
            "act_absmax_spread": float(a.max() / max(np.median(a), 1e-30))}
