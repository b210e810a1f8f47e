"""convert-fp16: weights and activations to IEEE float16, with fp32 islands.

Every float32 node computes in float16 (1 sign, 5 exponent, 10 mantissa bits: unit roundoff
u = 2⁻¹¹ ≈ 4.9e-4, largest finite 65504) except the fp32 islands chosen by rule (norm
statistics, softmax, statistic reductions and sums over at least ``long_axis`` elements,
``edgekit.keep_fp32`` marks, ops without a float16 schema) and by measurement: a node whose
output, computed from its fp32 inputs rounded to float16, is more than ``op_error`` off in
relative L2 norm on a calibration sample (or overflows 65504) stays fp32 (``_half``). Float32
graph inputs and outputs keep their types through a Cast at the boundary; float32 weights
read by float16 nodes become float16 (half the bytes).

Preconditions: real calibration samples (``--calibration``; the per-op errors are measured on
them), no control-flow subgraphs. The check (core) runs the float16 graph in onnxruntime
(whose CPU provider computes an op without a float16 kernel in fp32 between Casts) against
the fp32 graph, within ``max_error`` norm-wise relative error on the calibration samples; the
ledger's ``locator`` is the per-op error table, largest first, and every island is a skipped
candidate with its reason.
"""

from __future__ import annotations

import onnx_ir as ir

from edgekit.passes import _half
from edgekit.passes.core import Pass, PassContext, PassRefused, PassReport


def apply(model: ir.Model, ctx: PassContext, *, op_error: float = 0.005, long_axis: int = 64,
          max_error: float = 0.01) -> PassReport:
    del max_error  # the core check's budget (budget_param)
    try:
        return _half.run(model, ctx, _half.FP16, op_error, long_axis)
    except _half.Refused as refusal:
        raise PassRefused(refusal.reason, refusal.node) from None


PASS = Pass(
    name="convert-fp16",
    summary="weights and activations to float16 with fp32 islands (norm statistics, softmax, "
            "long sums, ops measured to break), per-op error table",
    exact=False,
    apply=apply,
    fitted=True,
    budget=0.01,
    budget_param="max_error",
)
