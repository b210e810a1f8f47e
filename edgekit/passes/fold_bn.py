"""fold-bn: remove inference BatchNormalization by folding it into a neighbouring linear op.

An inference BN is a per-channel affine on axis 1: ``y = s*x + t`` with ``s = γ/√(σ²+ε)`` and
``t = β − μ·s``. Each BN is folded (exactly, in float64 math) into the first of:

1. the op producing ``x`` (through Transpose/Reshape that keep the channel): Conv and
   ConvTranspose (``W' = s·W``, ``B' = s·B + t``), Gemm, MatMul with a constant weight
   (output columns scaled; the bias Add after it updated, or one created);
2. every op reading ``y``: Conv (``W'[o,i] = W[o,i]·s_i``, ``B' = B + Σ W·t``; exact only
   when the Conv does not pad, or ``t == 0``), Gemm or MatMul with a constant weight;
3. else, with ``decompose`` (default), ``Mul(x, s) + t`` with constant per-channel vectors.

Left alone, with the reason: training-mode BN (``training_mode=1`` or more than one output),
non-constant parameters, ``spatial=0``. Parameters that are computed from constants but not
yet constants (the onnx zoo builds every weight with ``ConstantOfShape``) are reported with
the fix, ``--passes fold-constants,fold-bn``, rather than folded here: a pass never runs
another pass, so there is one constant folder (fold-constants, with its onnxruntime fallback)
and each rewrite keeps its own ledger entry. When any BatchNorm (or the neighbour it would
fold into) is blocked that way the pass is refused with that message: after fold-constants
every one folds exactly, where a partial fold now would leave Mul+Add behind. A fold is also
refused when the weight it would rewrite is read by another node, or when the producer's
output has other readers. Biases may be shared: the rewritten node gets a fresh bias
initializer. The Mul+Add fallback lists why each fold was refused. Only the main graph is
rewritten (not If/Loop bodies).
"""

from __future__ import annotations

import onnx_ir as ir

from edgekit.passes._bn_utils import FOLD_FIRST, ChannelAffine, bn_scale_shift, fold_affine
from edgekit.passes._ir import Builder
from edgekit.passes.core import Pass, PassContext, PassRefused, PassReport


def apply(model: ir.Model, ctx: PassContext, *, decompose: bool = True) -> PassReport:
    graph, report = model.graph, ctx.report  # exact: the samples are not needed
    bns = [n for n in graph if n.op_type == "BatchNormalization"]
    if not bns:
        raise PassRefused("the model has no BatchNormalization node")
    builder = Builder(graph)
    for bn in bns:
        params = bn_scale_shift(bn)
        if isinstance(params, str):
            report.skip(bn.name, params)
            continue
        aff = ChannelAffine(bn.name, bn.inputs[0], bn.outputs[0], 1, *params, [bn])
        fold_affine(builder, aff, report, decompose)
    blocked = sum(FOLD_FIRST in reason for _, reason in report.skipped)
    if blocked:  # folding the constants first folds them exactly; a partial fold is worse
        raise PassRefused(f"{blocked} of {len(bns)} BatchNormalization nodes are blocked by "
                          f"values computed from constants (not yet constants): {FOLD_FIRST}")
    return report


PASS = Pass(
    name="fold-bn",
    summary="fold inference BatchNormalization into the adjacent Conv/Gemm/MatMul (else Mul+Add)",
    exact=True,
    apply=apply,
)
