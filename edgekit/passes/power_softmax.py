"""power-softmax: x^p / Σ w·x^p for models trained with Power-Softmax, as powers + Newton.

Power-Softmax (techniques.md §3) is ``PowerSoftmax(x)_i = w_i·x_i^p / Σ_j w_j·x_j^p`` with p
even (w = 1 unmasked). Trained models are exported in one of these forms, all matched:

- the stable log form ``Softmax(p·log|x|)`` (``Abs`` optional, p a constant even integer);
- masked: ``Softmax(p·log|x| + m)`` (additive mask: w = exp(m), so −∞ gives w = 0 and a
  finite bias its exact weight) or ``Softmax(Where(c, p·log|x|, f))`` / ``Where(c, f, …)``
  with every f ≤ ``MASKED`` (w = c or ¬c). A causal mask is a constant one (fold constants
  first if the export computes it); a runtime mask (a graph input) becomes ``Exp(m)`` or
  ``Cast(c)``, plaintext work on the client's mask;
- the direct form ``Div(u, ReduceSum(u, axis, keepdims=1))`` with ``u = Pow(x, p)``,
  optionally ``Mul(Pow(x, p), w)`` or ``Where(c, Pow(x, p), 0)``.

Each becomes the HE form

    u = w·(x/c)^p (⌈log2 p⌉ squarings),   y = u · R(mean(u)) / L

where ``R`` is Newton's reciprocal iteration from a tangent-line start below 1/s, designed on
the calibrated range of ``mean(u)`` (widened by ``margin`` on each side), with the fewest
iterations reaching ``tol`` relative error (or ``iters``); L (row length) is plaintext. A
masked position has w = 0, so its u and its y are exactly 0, as in the original.

Pre-scaling (``prescale``): c is the calibrated max |x|, so every term of u is at most w and
the Newton range ends near 1 instead of growing as the p-th power of the logit range
(|x| ≤ 40, p = 6: 4e9, beyond CKKS's message range and fp16). The ratio hi/lo of the range,
which sets the iteration count, is scale-free: pre-scaling bounds magnitudes, not iterations.
With c = 1 (the default) the graph keeps the trained scale. Rows that are all masked (0/0)
in calibration are refused, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from edgekit.passes._ir import Builder, attr, axes_of, const_array, dims, ensure_shapes
from edgekit.passes._poly import capture, describe, newton, row_length, write_newton
from edgekit.passes.core import Pass, PassContext, PassReport

MASKED = -1e4  # a fill at or below this is a masked position: exp(f − max) is 0 in fp32/fp64


@dataclass
class Mask:
    """The weight w of a masked form: exp(value) ("additive"), value or ¬value ("where"),
    value itself ("multiply")."""

    kind: str
    value: ir.Value
    keep_if_true: bool = True


@dataclass
class Match:
    out: ir.Value  # the probabilities, redirected to the new form
    x: ir.Value
    p: int
    axis: int
    mask: Mask | None
    form: str


def _even_power(value: ir.Value | None) -> int | str:
    arr = const_array(value)
    if arr is None or arr.size != 1:
        return "its power is not a constant scalar"
    e = float(arr.reshape(-1)[0])
    if e <= 0 or e != int(e) or int(e) % 2:
        return f"its power p = {e:g} is not an even positive integer"
    return int(e)


def _strip_abs(x: ir.Value) -> ir.Value:
    node = x.producer()
    return node.inputs[0] if node is not None and node.op_type == "Abs" else x


def _log_form(z: ir.Value) -> tuple[ir.Value, int] | str:
    """(x, p) of ``p·log|x|``, or why ``z`` is not that."""
    mul = z.producer()
    if mul is None or mul.op_type != "Mul":
        return "its input is not p·log|x|"
    for i in (0, 1):
        log = mul.inputs[1 - i].producer()
        if const_array(mul.inputs[i]) is not None and log is not None and log.op_type == "Log":
            p = _even_power(mul.inputs[i])
            return p if isinstance(p, str) else (_strip_abs(log.inputs[0]), p)
    return "its input is not p·log|x| with a constant p"


def _where_mask(where: ir.Node, fill_side: int) -> Mask | str:
    fill = const_array(where.inputs[fill_side])
    if fill is None or not np.all(fill <= MASKED):
        return f"its Where fill is not a mask (a constant <= {MASKED:g})"
    return Mask("where", where.inputs[0], keep_if_true=fill_side == 2)


def _match_softmax(node: ir.Node) -> Match | str:
    z, mask = node.inputs[0], None
    prod = z.producer()
    if prod is not None and prod.op_type == "Add":
        found = [(i, _log_form(prod.inputs[i])) for i in (0, 1)]
        hit = next(((i, f) for i, f in found if not isinstance(f, str)), None)
        if hit is not None:
            z, mask = prod.inputs[hit[0]], Mask("additive", prod.inputs[1 - hit[0]])
    elif prod is not None and prod.op_type == "Where":
        for side in (1, 2):
            if not isinstance(_log_form(prod.inputs[side]), str):
                mask = _where_mask(prod, 3 - side)
                if isinstance(mask, str):
                    return mask
                z = prod.inputs[side]
    form = _log_form(z)
    if isinstance(form, str):
        return form
    axis = attr(node, "axis", -1) % len(dims(form[0]))
    return Match(node.outputs[0], *form, axis, mask, f"log{'+' + mask.kind if mask else ''}")


def _match_direct(div: ir.Node) -> Match | str | None:
    """``Div(u, ReduceSum(u))``; None when ``div`` is not a division by a row sum of u."""
    u, s = div.inputs
    red = s.producer()
    if red is None or red.op_type != "ReduceSum" or red.inputs[0] is not u:
        return None
    rank = len(dims(u))
    axes = axes_of(red, rank)
    if axes is None or len(axes) != 1 or attr(red, "keepdims", 1) != 1:
        return "its row sum is not over one axis with keepdims=1"
    prod, mask = u.producer(), None
    if prod is not None and prod.op_type in ("Mul", "Where"):
        sides = (0, 1) if prod.op_type == "Mul" else (1, 2)
        side = next((i for i in sides if prod.inputs[i].producer() is not None
                     and prod.inputs[i].producer().op_type == "Pow"), None)
        if side is None:
            return "its numerator is not Pow(x, p) (masked or not)"
        if prod.op_type == "Mul":
            mask = Mask("multiply", prod.inputs[1 - side])
        else:
            fill = const_array(prod.inputs[3 - side])
            if fill is None or np.any(fill != 0):
                return "its Where fill is not 0"
            mask = Mask("where", prod.inputs[0], keep_if_true=side == 1)
        prod = prod.inputs[side].producer()
    if prod is None or prod.op_type != "Pow":
        return "its numerator is not Pow(x, p)"
    p = _even_power(prod.inputs[1])
    if isinstance(p, str):
        return p
    return Match(div.outputs[0], _strip_abs(prod.inputs[0]), p, axes[0], mask,
                 f"direct{'+' + mask.kind if mask else ''}")


def _weight(at: Builder, mask: Mask) -> ir.Value:
    """w as a constant when the mask is one, else computed from the runtime mask."""
    arr, dtype = const_array(mask.value), at.dtype
    if arr is not None:
        w = {"additive": lambda a: np.exp(a.astype(np.float64)),
             "where": lambda a: a.astype(bool) == mask.keep_if_true,
             "multiply": lambda a: a}[mask.kind](arr)
        return at.const(np.asarray(w, dtype), f"{at.hint}_weight")
    if mask.kind == "additive":
        return at.op("Exp", [mask.value])
    if mask.kind == "multiply":
        return mask.value
    cond = mask.value if mask.keep_if_true else at.op("Not", [mask.value], like=mask.value)
    return at.op("Cast", [cond], {"to": ir.DataType.from_numpy(dtype)})


def _power(at: Builder, x: ir.Value, p: int) -> ir.Value:
    u, base, k = None, x, p
    while k:
        if k & 1:
            u = base if u is None else at.op("Mul", [u, base])
        k >>= 1
        base = at.op("Mul", [base, base]) if k else base
    return u


def apply(model: ir.Model, ctx: PassContext, *, iters: int = -1, tol: float = 1e-4,
          margin: float = 2.0, prescale: bool = False) -> PassReport:
    report = ctx.report
    ensure_shapes(model)
    found: list[tuple[ir.Node, Match]] = []
    for node in list(model.graph):
        m = (_match_softmax(node) if node.op_type == "Softmax" else
             _match_direct(node) if node.op_type == "Div" else None)
        if isinstance(m, str):
            report.skip(node.name, m)
        elif m is not None:
            found.append((node, m))
    if not found:
        return report
    scales = [1.0] * len(found)
    if prescale:
        xs = capture(model, [m.x for _, m in found], ctx.samples)
        scales = [max(float(np.max(np.abs(a))) for a in arrays) or 1.0 for arrays in xs]
    b = Builder(model.graph)
    emitted = []  # (u, mean of u) per match, captured to design each reciprocal
    for (node, m), c in zip(found, scales, strict=True):
        at = b.at(node, like=m.x)
        x = at.op("Mul", [m.x, at.scalar(1.0 / c)]) if c != 1.0 else m.x
        u = _power(at, x, m.p)
        if m.mask is not None:
            u = at.op("Mul", [u, _weight(at, m.mask)])
        emitted.append((u, at.reduce("ReduceMean", u, m.axis)))
    means = capture(model, [mean for _, mean in emitted], ctx.samples)
    replaced = {}
    for (node, m), (u, mean), rows, c in zip(found, emitted, means, scales, strict=True):
        raw = (min(float(r.min()) for r in rows), max(float(r.max()) for r in rows))
        if raw[0] <= 0:
            report.skip(node.name, "a calibration row is all zeros or all masked (its mean of "
                                   "w·x^p is 0, so 0/0)")
            continue
        wide = ctx.margin(margin)
        r = newton("recip", raw[0] / wide, raw[1] * wide, tol, iters)
        at = b.at(node, like=m.x)
        y = at.op("Mul", [u, write_newton(at, mean, r)])
        b.redirect(m.out, at.op("Div", [y, row_length(at, m.x, m.axis)], like=m.out,
                                shape=m.out.shape))
        replaced[node.name] = {"form": m.form, "power": m.p, "prescale": c, "mean_range": raw,
                               "reciprocal": describe(r, raw),
                               "reciprocal_rel_error": r.rel_error(),
                               "depth": int(np.ceil(np.log2(m.p))) + 1 + r.depth + 2}
        report.change("power-softmax")
    report.details["replaced"] = replaced
    return report


PASS = Pass(
    name="power-softmax",
    summary="Power-Softmax (log form softmax(p·log|x|) or x^p/Σx^p; masked, causal) as x^p "
            "times a calibrated Newton reciprocal (HE-friendly)",
    exact=False,
    apply=apply,
    fitted=True,
    budget=1e-3,
)
