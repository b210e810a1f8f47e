"""fold-ln-affine: move LayerNormalization's scale γ and bias β into the linear layers reading it.

``LN(x) = γ ⊙ n(x) + β`` with ``n(x) = (x − mean(x)) / sqrt(var(x) + ε)`` over the last axis.
When every reader of the LN output is linear along that axis, ``y = LN(x)·W + b`` (MatMul with a
constant weight and an optional constant bias Add, or Gemm), then

    y = n(x)·(diag(γ)·W) + (b + β·W)

so ``W' = diag(γ)·W`` (rows of W in ONNX's ``x @ W`` layout, columns for Gemm ``transB=1``),
``b' = b + β·W`` (a bias is added where there was none; Gemm's alpha/beta are honoured), and the
LN keeps scale 1 and no bias. Exact in exact arithmetic (one extra rounding of W' and b').

Readers may sit behind ops that only pick or move rows and keep the normalized axis last
(Gather/Slice on other axes, Reshape/Squeeze/Unsqueeze/Flatten keeping it, Transpose fixing
it, Identity): a cls-token Gather before a classifier head is fine.

Skipped, with the reason: an LN over more than the last axis or with non-constant γ/β; an LN
whose output is a graph output or has a reader that is not linear; a reader whose weight is
shared with another node (folding would change that node too; untying the weight would grow
the model, which is ``ln-to-rmsnorm``'s call to make, not this pass's).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgekit.passes import _ir
from edgekit.passes._norm_affine import (
    fold_into,
    layer_norm_affine,
    linear_readers,
    shared_weight,
)
from edgekit.passes.core import Pass, PassContext, PassReport


def apply(model: ir.Model, ctx: PassContext) -> PassReport:
    report = ctx.report
    _ir.ensure_shapes(model)
    b = _ir.Builder(model.graph)
    folded: dict[str, list[str]] = {}
    for ln in [n for n in model.graph if n.op_type == "LayerNormalization" and n.domain == ""]:
        gamma, beta, why = layer_norm_affine(ln)
        if not why and np.all(gamma == 1) and (beta is None or not np.any(beta)):
            why = "its affine is already the identity (scale 1, no bias)"
        readers, why = ([], why) if why else linear_readers(ln.outputs[0], gamma.size)
        why = why or shared_weight(readers)
        if why:
            report.skip(ln.name, why)
            continue
        fold_into(b, readers, gamma, beta)
        b.set_const(ln, 1, np.ones_like(gamma))
        ln.resize_inputs(2)
        folded[ln.name] = [r.node.name for r in readers]
        report.change("fold-ln-affine")
    report.details["folded_into"] = folded
    return report


PASS = Pass(
    name="fold-ln-affine",
    summary="fold LayerNorm scale/bias into the linear layers that read it (exact)",
    exact=True,
    apply=apply,
)
