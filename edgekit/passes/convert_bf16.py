"""convert-bf16: weights and activations to bfloat16, with fp32 islands.

Every float32 node computes in bfloat16 (fp32's 8 exponent bits, 7 mantissa bits: unit
roundoff u = 2⁻⁸ ≈ 3.9e-3, fp32's range, so no overflow) except the fp32 islands chosen by
rule (norm statistics, softmax, statistic reductions and sums over at least ``long_axis``
elements, ``edgekit.keep_fp32`` marks, ops whose ONNX schema at the model's opset has no
bfloat16 form: Conv before opset 22) and by measurement: a node whose output, computed from
its fp32 inputs rounded to bfloat16, is more than ``op_error`` off in relative L2 norm on a
calibration sample stays fp32 (``_half``). Float32 graph inputs and outputs keep their types
through a Cast at the boundary; float32 weights read by bfloat16 nodes become bfloat16, and
so do those of a Conv kept fp32 by its schema (a Cast to fp32 feeds it: bfloat16 bytes and
rounding, fp32 arithmetic).

onnxruntime's CPU provider lacks bfloat16 kernels for MatMul, Add and most ops, so the check
(core) and the per-op errors run ``_half.ort_form``: each bfloat16 value computed in fp32
and rounded to bfloat16 (nearest even) at every node output, a bfloat16 kernel that
accumulates in fp32; the graph written out is the real bfloat16 one.

Preconditions: real calibration samples (``--calibration``), no control-flow subgraphs. The
check holds the result within ``max_error`` norm-wise relative error on the calibration
samples.
"""

from __future__ import annotations

import onnx_ir as ir

from edgekit.passes import _half
from edgekit.passes.core import Pass, PassContext, PassRefused, PassReport


def apply(model: ir.Model, ctx: PassContext, *, op_error: float = 0.03, long_axis: int = 64,
          max_error: float = 0.05) -> PassReport:
    del max_error  # the core check's budget (budget_param)
    try:
        return _half.run(model, ctx, _half.BF16, op_error, long_axis)
    except _half.Refused as refusal:
        raise PassRefused(refusal.reason, refusal.node) from None


PASS = Pass(
    name="convert-bf16",
    summary="weights and activations to bfloat16 with fp32 islands (norm statistics, softmax, "
            "long sums, ops measured to break), per-op error table",
    exact=False,
    apply=apply,
    fitted=True,
    budget=0.05,
    budget_param="max_error",
)
