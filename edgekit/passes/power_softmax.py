"""power-softmax: x^p / Σx^p for models trained with Power-Softmax, as polynomial + Newton.

Power-Softmax (techniques.md §3) is trained in its stable log form ``softmax(p·log|x|)``;
this pass finds that pattern (``Softmax(Mul(Log(Abs(x)), p))``, ``Abs`` optional, ``p`` a
constant even positive integer) and writes the HE form

    u = x^p (⌈log2 p⌉ squarings),   y = u · R(mean(u)) / L

where ``R`` is Newton's reciprocal iteration from a tangent-line start below 1/s, designed on
the calibrated range of ``mean(u)`` (widened by ``margin`` on each side), with the fewest
iterations reaching ``tol`` relative error (or ``iters``). ``L`` (row length) is plaintext.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgekit.passes._ir import Builder, attr, const_array, dims, ensure_shapes
from edgekit.passes._poly import capture, describe, newton, row_length, write_newton
from edgekit.passes.core import Pass, PassContext, PassReport


def _match(node: ir.Node) -> tuple[ir.Value, int] | str:
    """(x, p) of ``Softmax(p·log|x|)``, or the reason it is not that pattern."""
    mul = node.inputs[0].producer()
    if mul is None or mul.op_type != "Mul":
        return "its input is not p·log|x|"
    for i in (0, 1):
        p, log = const_array(mul.inputs[i]), mul.inputs[1 - i].producer()
        if p is not None and p.size == 1 and log is not None and log.op_type == "Log":
            e = float(p.reshape(-1)[0])
            if e <= 0 or e != int(e) or int(e) % 2:
                return f"its power p = {e:g} is not an even positive integer"
            src = log.inputs[0]
            absn = src.producer()
            return (absn.inputs[0] if absn is not None and absn.op_type == "Abs" else src), int(e)
    return "its input is not p·log|x| with a constant p"


def apply(model: ir.Model, ctx: PassContext, *, iters: int = -1, tol: float = 1e-4,
          margin: float = 2.0) -> PassReport:
    report = ctx.report
    ensure_shapes(model)
    found = []
    for node in [n for n in model.graph if n.op_type == "Softmax"]:
        m = _match(node)
        if isinstance(m, str):
            report.skip(node.name, m)
        else:
            found.append((node, *m))
    arrays = capture(model, [x for _, x, _ in found], ctx.samples)
    b = Builder(model.graph)
    replaced = {}
    for (node, x, p), xs in zip(found, arrays, strict=True):
        axis = attr(node, "axis", -1) % len(dims(x))
        means = [np.mean(np.abs(a) ** p, axis=axis) for a in xs]
        raw = (min(float(m.min()) for m in means), max(float(m.max()) for m in means))
        if raw[0] <= 0:
            report.skip(node.name, "a calibration row is all zeros (mean of x^p is 0)")
            continue
        wide = ctx.margin(margin)
        r = newton("recip", raw[0] / wide, raw[1] * wide, tol, iters)
        at = b.at(node, like=x)
        u, base, k = None, x, p
        while k:
            if k & 1:
                u = base if u is None else at.op("Mul", [u, base])
            k >>= 1
            base = at.op("Mul", [base, base]) if k else base
        y = at.op("Mul", [u, write_newton(at, at.reduce("ReduceMean", u, axis), r)])
        out = node.outputs[0]
        b.redirect(out, at.op("Div", [y, row_length(at, x, axis)], like=out, shape=out.shape))
        replaced[node.name] = {"power": p, "reciprocal": describe(r, raw),
                               "reciprocal_rel_error": r.rel_error(),
                               "depth": int(np.ceil(np.log2(p))) + 1 + r.depth + 2}
        report.change("power-softmax")
    report.details["replaced"] = replaced
    return report


PASS = Pass(
    name="power-softmax",
    summary="Power-Softmax softmax(p·log|x|) as x^p times a calibrated Newton reciprocal "
            "(HE-friendly)",
    exact=False,
    apply=apply,
    fitted=True,
    budget=1e-3,
)
