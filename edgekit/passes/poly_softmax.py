"""poly-softmax: Softmax as additions and multiplications only, calibrated on data.

Under HE there is no row max to subtract, and the softmax denominator of real attention
spans many orders of magnitude (peaked rows against flat ones), so a reciprocal by Newton
iterations from one fixed start diverges or needs dozens of iterations. The formulation here
keeps every quantity that is inverted inside a narrow, calibrated range:

    d = x − mean(x)                       (HE-compatible shift: a sum, not a max)
    q = P(d) ≈ exp(d / 2^k)               (Chebyshev fit on the calibrated range of d ± 25%)
    repeat k times:  s = q²;  q = s · R(mean(s))          (renormalised squaring)
    softmax(x) ≈ q · R(mean(q)) / L

Since exp(d)= exp(d/2^k)^(2^k), squaring k times rebuilds the exponential, and dividing by any
per-row positive scalar in between does not change the final normalised result: the
intermediate reciprocals ``R`` only have to keep ``q`` near 1 (a few Newton iterations on the
calibrated range of the row means, widened to the bound mean(q²) ≤ L·mean(q)², 10%
accuracy), and only the last one must be accurate —
its argument ``mean(q)`` sits in a narrow range because ``q`` was just renormalised. Each ``R``
is a tangent-line start below 1/s on its calibrated range followed by Newton ``y ← y(2 − sy)``
(monotone from below). ``L`` (the row length) is plaintext: it comes from the shape. When
``L`` is static the last step is written ``q·R_L(sum q)`` with ``R_L`` the same Newton iteration
rescaled to 1/(L·m): identical iterates, two multiplicative levels fewer.

The pass chooses ``k`` and the degree of ``P`` (unless given) as the cheapest design in
multiplicative depth whose simulated output error on the calibration rows is within ``tol``
(max abs error of the probabilities). Softmax inputs carrying an additive −∞-style mask are
skipped: no polynomial covers them (mask multiplicatively instead). Each replaced Softmax is
recorded in ``report.details`` with its calibrated range, degree, steps, iterations, depth.

NaN guards. A standard transformers export (PyTorch's scaled-dot-product attention) follows
each softmax ``p`` with ``Where(IsNaN(p), 0, p)``: a row masked entirely by −∞ gives
exp(−∞)/Σexp(−∞) = 0/0 = NaN, which the guard turns into zeros. The polynomial form cannot
produce that NaN: it has no exp and no division, only Add/Sub/Mul of the logits with finite
constants, so for finite logits its output is NaN only if an intermediate overflows — and a
row with a −∞ (or float-min) mask spans more than ``MAX_SPAN`` and is skipped, guard and
all. So the guard of every replaced Softmax is dead code and is removed (rule
``nan-guard``; ``IsNaN`` is a comparison, which HE cannot evaluate); overflow is left to the
check, which rolls back any pass whose output turns non-finite where the original is finite.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from edgekit.passes._ir import Builder, attr, const_array, dims, ensure_shapes
from edgekit.passes._poly import (
    Cheb,
    Newton,
    capture,
    newton,
    row_length,
    span,
    write_cheb,
    write_newton,
)
from edgekit.passes.core import Pass, PassContext, PassReport

MAX_SPAN = 1e3  # wider calibrated logit ranges mean an additive mask: not a polynomial's job


@dataclass
class Design:
    k: int
    exp: Cheb
    steps: list[Newton]
    final: Newton

    @property
    def depth(self) -> int:
        steps = sum(n.depth + 3 for n in self.steps)
        return 1 + self.exp.depth + steps + 1 + self.final.depth + 2

    def run(self, d: np.ndarray, exact_recip: bool = False, trace: list | None = None):
        """Simulate on centred rows ``d`` (last axis); ``trace`` collects the means inverted."""
        q = self.exp(d)
        for i in range(self.k):
            s = q * q
            m = s.mean(-1, keepdims=True)
            if trace is not None:
                trace.append(m)
            q = s / m if exact_recip else s * self.steps[i](m)
        m = q.mean(-1, keepdims=True)
        if trace is not None:
            trace.append(m)
        r = 1 / m if exact_recip else self.final(m)
        return q * r / d.shape[-1]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def design(rows: list[np.ndarray], tol: float, degree: int = -1, steps: int = -1,
           iters: int = -1, subsample: bool = True, margin: float = 0.25
           ) -> tuple[Design | None, float]:
    """Cheapest design whose simulated max abs error on ``rows`` is ≤ tol (or the best tried).

    The search runs on (up to) 8 of the samples; the chosen design is then checked on all.
    """
    if subsample and len(rows) > 8:
        found, _ = design(rows[:: len(rows) // 8 + 1], tol, degree, steps, iters, False, margin)
        if found is not None:
            full = design(rows, tol, found.exp.degree, found.k, iters, False, margin)
            if full[0] is not None and full[1] <= tol:
                return full
    centred = [r - r.mean(-1, keepdims=True) for r in rows]
    ref = [_softmax(r) for r in rows]
    lo, hi, _, _ = span(centred, margin)
    best: tuple[Design | None, float] = (None, float("inf"))
    for k in ([steps] if steps >= 0 else range(0, 9)):
        scale = 2.0 ** -k
        for deg in ([degree] if degree > 0 else range(4, 25, 2)):
            exp = Cheb.fit(lambda t, s=scale: np.exp(t * s), lo, hi, deg)
            if np.min(exp(np.linspace(lo, hi, 2001))) <= 0 and k == 0:
                continue  # without squaring a negative "exponential" would stay negative
            trial = Design(k, exp, [Newton("recip", 1, 1, 0, 1, 0)] * k,
                           Newton("recip", 1, 1, 0, 1, 0))
            means: list[list[np.ndarray]] = [[] for _ in range(k + 1)]
            for d in centred:
                trace: list = []
                trial.run(d, exact_recip=True, trace=trace)
                for i, m in enumerate(trace):
                    means[i].append(m)
            if any(np.min(m) <= 0 for ms in means for m in ms):
                continue
            # mean(q²) ≤ L·mean(q)², and mean(q) ≤ 1 after a Newton-from-below step: the
            # step reciprocals cover that bound, not just the calibrated means
            length = 2 * max(r.shape[-1] for r in rows)
            q0 = float(np.max(exp(np.linspace(lo, hi, 2001))))
            rough = [_recip(ms, 0.1, iters, length * (q0 * q0 if i == 0 else 1.0))
                     for i, ms in enumerate(means[:k])]
            trial = Design(k, exp, rough, _recip(means[k], tol / 4, iters))
            err = max(float(np.max(np.abs(trial.run(d) - r)))
                      for d, r in zip(centred, ref, strict=True))
            if not np.isfinite(err):
                continue
            better = err <= tol and (best[0] is None or best[1] > tol
                                     or trial.depth < best[0].depth)
            if better or (best[1] > tol and err < best[1]):
                best = (trial, err)
            if err <= tol:
                break  # a higher degree at this k only costs depth
    return best


def _recip(means: list[np.ndarray], tol: float, iters: int, bound: float = 0.0) -> Newton:
    lo = min(float(np.min(m)) for m in means)
    hi = max(float(np.max(m)) for m in means)
    return newton("recip", lo / 2, max(hi * 3, bound), tol, iters)


def apply(model: ir.Model, ctx: PassContext, *, degree: int = -1, steps: int = -1,
          iters: int = -1, tol: float = 2e-3) -> PassReport:
    report = ctx.report
    ensure_shapes(model)
    nodes = [n for n in model.graph if n.op_type == "Softmax" and n.domain in ("", "ai.onnx")]
    inputs = capture(model, [n.inputs[0] for n in nodes], ctx.samples)
    b = Builder(model.graph)
    replaced = {}
    for node, arrays in zip(nodes, inputs, strict=True):
        x = node.inputs[0]
        axis = attr(node, "axis", -1) % len(dims(x))
        rows = [np.moveaxis(a, axis, -1) for a in arrays]
        width = max(float(np.max(r.max(-1) - r.min(-1))) for r in rows)
        if width > MAX_SPAN:
            report.skip(node.name, f"its input spans {width:.3g} within a row (an additive "
                        "mask?); no polynomial covers that, mask by multiplication instead")
            continue
        found, err = design(rows, tol, degree, steps, iters, margin=ctx.margin(0.25))
        if found is None or err > tol:
            report.skip(node.name, f"no design reached max abs error {tol:g} on the "
                        f"calibration rows (best {err:.3g}); raise tol, steps or degree")
            continue
        guards = _nan_guards(node.outputs[0])
        folded = _emit(b, node, axis, found)
        for where in guards:  # its condition is never true now: readers take p itself
            b.redirect(where.outputs[0], where.inputs[2])
        if guards:
            report.change("nan-guard", len(guards))
        lo, hi, raw_lo, raw_hi = span(arrays)
        replaced[node.name] = {
            "calibrated_input": [round(raw_lo, 4), round(raw_hi, 4)],
            "exp": {"interval": [round(found.exp.lo, 4), round(found.exp.hi, 4)],
                    "degree": found.exp.degree, "scale": 2.0 ** -found.k},
            "squaring_steps": found.k,
            "step_reciprocals": [{"interval": [round(n.lo, 5), round(n.hi, 5)],
                                  "iterations": n.iters} for n in found.steps],
            "final_reciprocal": {"interval": [round(found.final.lo, 5),
                                              round(found.final.hi, 5)],
                                 "iterations": found.final.iters},
            "depth": found.depth - (2 if folded else 0),
            "calibration_max_abs_error": err,
            "nan_guards_removed": len(guards),
        }
        report.change("poly-softmax")
    report.details["replaced"] = replaced
    return report


def _nan_guards(p: ir.Value) -> list[ir.Node]:
    """The ``Where(IsNaN(p), c, p)`` nodes (``c`` a constant) reading the softmax output."""
    guards = []
    for use in p.uses():
        if use.node.op_type != "IsNaN":
            continue
        for u in use.node.outputs[0].uses():
            where = u.node
            if (where.op_type == "Where" and u.idx == 0 and where.inputs[2] is p
                    and const_array(where.inputs[1]) is not None):
                guards.append(where)
    return guards


def _emit(b: Builder, node: ir.Node, axis: int, d: Design) -> bool:
    """Write the design; True when the row length was static and 1/L got folded.

    With a static row length L the last normalisation ``q·R(mean q)/L`` is written as
    ``q·R_L(sum q)``, R_L being the same Newton iteration for 1/s on L·[lo, hi] (start
    a/L + (b/L²)·s): every iterate is exactly the original one divided by L, and the sum is
    free where the mean and the /L each cost a multiplicative level.
    """
    x, out = node.inputs[0], node.outputs[0]
    b = b.at(node, like=x)
    centred = b.op("Sub", [x, b.reduce("ReduceMean", x, axis)])
    q = write_cheb(b, centred, d.exp)
    for n in d.steps:
        s = b.op("Mul", [q, q])
        q = b.op("Mul", [s, write_newton(b, b.reduce("ReduceMean", s, axis), n)])
    n_row = dims(x)[axis]
    if isinstance(n_row, int):
        f = d.final
        scaled = Newton(f.kind, f.lo * n_row, f.hi * n_row, f.iters, f.a / n_row,
                        f.b / n_row**2)
        b.redirect(out, b.op("Mul", [q, write_newton(b, b.reduce("ReduceSum", q, axis),
                                                      scaled)]))
        return True
    q = b.op("Mul", [q, write_newton(b, b.reduce("ReduceMean", q, axis), d.final)])
    b.redirect(out, b.op("Div", [q, row_length(b, x, axis)], like=out, shape=out.shape))
    return False


PASS = Pass(
    name="poly-softmax",
    summary="Softmax by a calibrated exp polynomial, renormalised squaring and Newton "
            "reciprocals (HE-friendly)",
    exact=False,
    apply=apply,
    fitted=True,
    budget=0.05,
)
