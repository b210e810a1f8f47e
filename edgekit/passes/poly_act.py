"""poly-act: Tanh and Sigmoid as Chebyshev polynomials on their calibrated input ranges.

Same construction as poly-gelu (interval = calibrated range + 10% margin each side; smallest
degree with max abs error ≤ ``tol`` × max|f|, or a fixed ``degree``), for the other bounded
activations a trained model may carry (LSTM/GRU gates, tanh-GELU written out, gating).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgekit.passes._poly import replace_unary
from edgekit.passes.core import Pass, PassContext, PassReport


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def apply(model: ir.Model, ctx: PassContext, *, degree: int = -1, tol: float = 1e-3
          ) -> PassReport:
    report = ctx.report
    replace_unary(model, ctx, {"Tanh": np.tanh, "Sigmoid": sigmoid}, degree, tol, report,
                  "poly-act")
    return report


PASS = Pass(
    name="poly-act",
    summary="Tanh / Sigmoid by Chebyshev polynomials on the calibrated input range "
            "(HE-friendly)",
    exact=False,
    apply=apply,
    fitted=True,
    budget=0.02,
)
