"""poly-gelu: GELU (the ``Gelu`` op, or the ``Erf`` inside an exported erf-GELU) as a
Chebyshev polynomial fitted on the input range seen on calibration data.

A polynomial has no business outside its interval, so the interval is the calibrated range
widened by 10% of its width on each side, and the report records both. Activations crowd
near zero with rare large tails, so the fit is least squares weighted by the calibration
values (plus a light uniform grid over the interval); the degree is the smallest meeting
``tol`` (RMS error relative to RMS of f on the data, see ``_poly.fit_on_data``), or
``degree`` if given. Depth: ``2 + ⌈log2 degree⌉`` (affine map, Chebyshev basis by doubling,
coefficients). The report gives the errors on the data and over the whole interval.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from edgekit.passes._poly import replace_unary
from edgekit.passes.core import Pass, PassContext, PassReport

_erf = np.vectorize(math.erf, otypes=[np.float64])


def gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + _erf(x / math.sqrt(2)))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def apply(model: ir.Model, ctx: PassContext, *, degree: int = -1, tol: float = 1e-3
          ) -> PassReport:
    report = ctx.report
    replace_unary(model, ctx, {"Gelu": gelu, "GeluTanh": gelu_tanh, "Erf": _erf}, degree, tol,
                  report, "poly-gelu")
    return report


PASS = Pass(
    name="poly-gelu",
    summary="GELU / Erf by a Chebyshev polynomial on the calibrated input range (HE-friendly)",
    exact=False,
    apply=apply,
    fitted=True,
    budget=0.1,
)
