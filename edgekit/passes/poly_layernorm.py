"""poly-layernorm: LayerNormalization with 1/√(var + ε) by calibrated Newton iterations.

    μ = mean(x);  d = x − μ;  v = mean(d²) + ε;  y = d · R(v) · γ + β

where ``R`` is Newton's iteration for the inverse square root, ``y ← y(3 − v·y²)/2``, from a
tangent-line start that lies below v^-1/2 on the interval, so it converges monotonically. The
interval is the range of ``v`` on the calibration data widened by ``margin`` (a factor on each
side); the iteration count is the smallest reaching ``tol`` relative error over the whole
interval (or ``iters``). Means are sums times a plaintext 1/n; everything else is Add/Mul.
The calibrated range, iterations and depth of every replaced node go into ``report.details``.
"""

from __future__ import annotations

import onnx_ir as ir

from edgekit.passes._ir import Builder, attr, const_array, dims, ensure_shapes, index_of
from edgekit.passes._poly import capture, describe, newton, write_newton
from edgekit.passes.core import Pass, PassContext, PassReport


def apply(model: ir.Model, ctx: PassContext, *, iters: int = -1, tol: float = 1e-4,
          margin: float = 2.0) -> PassReport:
    report = ctx.report
    ensure_shapes(model)
    nodes = [n for n in model.graph
             if n.op_type == "LayerNormalization" and n.domain in ("", "ai.onnx")]
    arrays = capture(model, [n.inputs[0] for n in nodes], ctx.samples)
    b = Builder(model.graph)
    replaced = {}
    for node, xs in zip(nodes, arrays, strict=True):
        rank = len(dims(node.inputs[0]))
        axes = list(range(attr(node, "axis", -1) % rank, rank))
        eps = float(attr(node, "epsilon", 1e-5))
        if any(v.uses() or v.is_graph_output() for v in node.outputs[1:]):
            report.skip(node.name, "its mean / inverse-std outputs are used")
            continue
        if const_array(node.inputs[1]) is None:
            report.skip(node.name, "its scale is not a constant")
            continue
        var = [x.var(axis=tuple(axes)) + eps for x in xs]
        raw = (min(float(v.min()) for v in var), max(float(v.max()) for v in var))
        wide = ctx.margin(margin)
        r = newton("rsqrt", raw[0] / wide, raw[1] * wide, tol, iters)
        if r.rel_error() > tol and iters < 0:
            report.skip(node.name, f"1/sqrt over the calibrated [{raw[0]:.3g}, {raw[1]:.3g}] "
                        f"needs more than {r.iters} Newton iterations")
            continue
        _emit(b, node, axes, eps, r)
        replaced[node.name] = describe(r, raw) | {"rsqrt_rel_error": r.rel_error()}
        report.change("poly-layernorm")
    report.details["replaced"] = replaced
    return report


def _emit(b: Builder, node: ir.Node, axes: list[int], eps: float, r) -> None:
    x, out = node.inputs[0], node.outputs[0]
    b = b.at(node, like=x)
    d = b.op("Sub", [x, b.reduce("ReduceMean", x, axes)])
    v = b.op("Add", [b.reduce("ReduceMean", b.op("Mul", [d, d]), axes), b.scalar(eps)])
    y = b.op("Mul", [b.op("Mul", [d, write_newton(b, v, r)]), node.inputs[1]])
    if index_of(node, 2):
        y = b.op("Add", [y, node.inputs[2]])
    b.redirect(out, y)


PASS = Pass(
    name="poly-layernorm",
    summary="LayerNorm with 1/sqrt(var+eps) by calibrated Newton iterations (HE-friendly)",
    exact=False,
    apply=apply,
    fitted=True,
    budget=0.02,
)
