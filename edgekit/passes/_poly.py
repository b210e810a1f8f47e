"""Shared machinery of the polynomial (HE-friendly) passes: calibration, fitting, emission.

Homomorphic encryption evaluates only additions and multiplications, so every non-polynomial
op is replaced by a polynomial valid on the range its input takes on calibration data:

* ``capture`` runs the model in onnxruntime on the context's samples with chosen
  intermediate tensors exposed as outputs, so a pass sees the real input of each op;
* ``Cheb`` is a Chebyshev interpolant on ``[lo, hi]``, evaluated in the graph through the
  Chebyshev recurrence ``T2m = 2Tm² − 1``, ``T2m+1 = 2TmTm+1 − T1`` (numerically stable, depth
  ``1 + ⌈log2 d⌉`` for the basis plus one for the coefficients; doubling is an Add, not a
  level);
* ``newton_recip`` / ``newton_rsqrt`` design Newton iterations for ``1/s`` and ``1/√s`` over a
  calibrated ``[lo, hi]``: the start is the tangent line that stays below the target over the
  whole range (so the iteration converges monotonically from below), and the iteration count
  is the smallest that reaches the tolerance over the range (checked on a dense log grid);
* ``write_cheb`` / ``write_newton`` write these as ONNX Add/Sub/Mul nodes through the passes'
  ``Builder`` (at a node, typed like its input); each design's ``depth`` is the
  multiplicative depth they add (ct×ct and ct×plaintext products each cost one level),
  mirroring edgekit.he.check.

Every design function has a numpy twin used to simulate the rewritten op in float64, so passes
choose degrees and iteration counts by measuring the error on calibration data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from edgekit.errors import EdgekitError
from edgekit.passes._ir import Builder, dims, ensure_shapes
from edgekit.verify import ort_session

MARGIN = 0.1  # fraction of the calibrated width added on each side of a fitted interval


def capture(model: ir.Model, values: Sequence[ir.Value],
            samples: Sequence[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    """For each value, its arrays over all samples (one onnxruntime run per sample)."""
    proto = ir.to_proto(model)
    known = {o.name for o in proto.graph.output}
    names = [v.name for v in values]
    for v in values:
        if v.name not in known:
            elem = v.dtype.value if v.dtype is not None else onnx.TensorProto.FLOAT
            proto.graph.output.append(onnx.helper.make_tensor_value_info(v.name, elem, None))
            known.add(v.name)
    order = [o.name for o in proto.graph.output]
    result: list[list[np.ndarray]] = [[] for _ in names]
    session = ort_session(proto)
    for sample in samples:
        try:
            arrays = session.run(None, dict(sample))
        except Exception as exc:  # ORT raises several unrelated types
            raise EdgekitError(f"onnxruntime failed on a calibration sample: {exc}") from exc
        outs = dict(zip(order, arrays, strict=True))
        for i, n in enumerate(names):
            result[i].append(np.asarray(outs[n], dtype=np.float64))
    return result


def span(arrays: Sequence[np.ndarray], margin: float = MARGIN) -> tuple[float, float, float, float]:
    """(lo, hi) widened by ``margin`` of the width, and the raw calibrated (min, max)."""
    lo = min(float(np.min(a)) for a in arrays)
    hi = max(float(np.max(a)) for a in arrays)
    w = max(hi - lo, 1e-3 * max(abs(lo), abs(hi), 1.0))
    return lo - margin * w, hi + margin * w, lo, hi


@dataclass(frozen=True)
class Cheb:
    """A degree-``len(coef)-1`` Chebyshev series of ``f`` on ``[lo, hi]``."""

    coef: np.ndarray
    lo: float
    hi: float

    @classmethod
    def fit(cls, f: Callable[[np.ndarray], np.ndarray], lo: float, hi: float,
            degree: int) -> Cheb:
        series = np.polynomial.Chebyshev.interpolate(f, degree, domain=[lo, hi])
        return cls(np.asarray(series.coef, dtype=np.float64), lo, hi)

    @property
    def degree(self) -> int:
        return len(self.coef) - 1

    @property
    def depth(self) -> int:
        return 2 + math.ceil(math.log2(self.degree)) if self.degree > 1 else 1

    def __call__(self, x: np.ndarray) -> np.ndarray:
        t = (2 * x - (self.hi + self.lo)) / (self.hi - self.lo)
        return np.polynomial.chebyshev.chebval(t, self.coef)

    def max_error(self, f: Callable[[np.ndarray], np.ndarray], n: int = 4001) -> float:
        x = np.linspace(self.lo, self.hi, n)
        return float(np.max(np.abs(self(x) - f(x))))


def fit_on_data(f: Callable[[np.ndarray], np.ndarray], xs: Sequence[np.ndarray], lo: float,
                hi: float, tol: float, degree: int = -1, max_degree: int = 40) -> Cheb:
    """Least squares on the calibration values (plus a light uniform grid on [lo, hi]).

    Activations are dense near zero and sparse in the tails; weighting the fit by the data
    spends the degree where the values are. The degree is the smallest whose RMS error on the
    data is ≤ tol × RMS(f) and whose worst error on the data is ≤ 20·tol × max|f| (or fixed).
    """
    data = np.concatenate([np.ravel(x) for x in xs])
    data = data[:: max(1, data.size // 50000)]
    grid = np.linspace(lo, hi, 2001)
    pts = np.concatenate([data, grid])
    weights = np.concatenate([np.ones(data.size),
                              np.full(grid.size, math.sqrt(0.05 * data.size / grid.size))])
    t = (2 * pts - (hi + lo)) / (hi - lo)
    y, fd = f(pts), f(data)
    rms, peak = float(np.sqrt(np.mean(fd**2))) or 1.0, float(np.max(np.abs(fd))) or 1.0
    best = None
    for d in [degree] if degree > 0 else range(3, max_degree + 1):
        best = Cheb(np.polynomial.chebyshev.chebfit(t, y, d, w=weights), lo, hi)
        err = best(data) - fd
        if float(np.sqrt(np.mean(err**2))) <= tol * rms and np.max(np.abs(err)) <= 20 * tol * peak:
            break
    assert best is not None
    return best


@dataclass(frozen=True)
class Newton:
    """Newton iterations for ``1/s`` (kind "recip") or ``1/√s`` ("rsqrt") on [lo, hi]."""

    kind: str
    lo: float
    hi: float
    iters: int
    a: float  # start y0 = a + b·s
    b: float

    @property
    def depth(self) -> int:
        return 1 + (2 if self.kind == "recip" else 3) * self.iters

    def __call__(self, s: np.ndarray) -> np.ndarray:
        y = self.a + self.b * s
        for _ in range(self.iters):
            y = y * (2 - s * y) if self.kind == "recip" else y * (1.5 - 0.5 * s * y * y)
        return y

    def rel_error(self, n: int = 2001) -> float:
        s = np.geomspace(self.lo, self.hi, n)
        exact = 1 / s if self.kind == "recip" else 1 / np.sqrt(s)
        return float(np.max(np.abs(self(s) / exact - 1)))


def newton(kind: str, lo: float, hi: float, tol: float, iters: int = -1,
           max_iters: int = 40) -> Newton:
    """Tangent-line start below the target on [lo, hi]; ``iters`` or the fewest reaching tol."""
    lo, hi = max(lo, 1e-30), max(hi, lo * (1 + 1e-6))
    if kind == "recip":  # tangent of 1/s at s0 = (lo+hi)/2: y0·s = 1 − (1 − s/s0)² ≤ 1
        s0 = (lo + hi) / 2
        a, b = 2 / s0, -1 / s0**2
    else:  # tangent of s^-1/2 at s0 > hi/3 (so y0 > 0), s0 maximising the worst y0·√s
        def worst(s0: float) -> float:
            u = np.array([lo, hi]) / s0
            return float(np.min(1.5 * np.sqrt(u) - 0.5 * u**1.5))

        s0 = max(np.geomspace(hi / 3 * 1.0001, hi * 3, 600), key=worst)
        a, b = 1.5 / math.sqrt(s0), -0.5 / s0**1.5
    if iters >= 0:
        return Newton(kind, lo, hi, iters, a, b)
    for n in range(max_iters + 1):
        design = Newton(kind, lo, hi, n, a, b)
        if design.rel_error() <= tol:
            return design
    return design


def affine(b: Builder, x: ir.Value, scale: float, shift: float) -> ir.Value:
    """``x·scale + shift``, leaving out a unit scale and a zero shift."""
    y = x if scale == 1 else b.op("Mul", [x, b.scalar(float(scale))])
    return y if shift == 0 else b.op("Add", [y, b.scalar(float(shift))])


def write_cheb(b: Builder, x: ir.Value, p: Cheb) -> ir.Value:
    """Σ c_k T_k(t), t = affine map of x onto [−1, 1]."""
    t = affine(b, x, 2 / (p.hi - p.lo), -(p.hi + p.lo) / (p.hi - p.lo))
    basis: dict[int, ir.Value] = {1: t}

    def T(k: int) -> ir.Value:
        if k not in basis:
            m = k // 2
            prod = b.op("Mul", [T(m), T(k - m)])
            twice = b.op("Add", [prod, prod])
            basis[k] = b.op("Sub", [twice, b.scalar(1.0) if k % 2 == 0 else t])
        return basis[k]

    total = None
    for k in range(1, p.degree + 1):
        if p.coef[k] != 0:
            term = b.op("Mul", [T(k), b.scalar(float(p.coef[k]))])
            total = term if total is None else b.op("Add", [total, term])
    if total is None:
        total = b.op("Mul", [t, b.scalar(0.0)])
    return b.op("Add", [total, b.scalar(float(p.coef[0]))]) if p.coef[0] != 0 else total


def write_newton(b: Builder, s: ir.Value, n: Newton) -> ir.Value:
    """``n``'s start ``a + b·s``, then its Newton steps for 1/s or 1/√s."""
    y = affine(b, s, n.b, n.a)
    half_s = b.op("Mul", [s, b.scalar(0.5)]) if n.kind == "rsqrt" and n.iters else s
    for _ in range(n.iters):
        if n.kind == "recip":
            y = b.op("Mul", [y, b.op("Sub", [b.scalar(2.0), b.op("Mul", [s, y])])])
        else:
            y = b.op("Mul", [y, b.op("Sub", [b.scalar(1.5),
                                             b.op("Mul", [b.op("Mul", [half_s, y]), y])])])
    return y


def row_length(b: Builder, x: ir.Value, axis: int) -> ir.Value:
    """L, the length of ``x`` along ``axis``: a constant when static, else from the shape
    (plaintext either way)."""
    n = dims(x)[axis]
    if isinstance(n, int):
        return b.scalar(float(n))
    shape = b.op("Shape", [x], {"start": axis, "end": axis + 1})
    shape.type = ir.TensorType(ir.DataType.INT64)
    cast = b.op("Cast", [shape], {"to": ir.DataType.from_numpy(b.dtype)})
    cast.shape = ir.Shape([1])
    return cast


def describe(p: Cheb | Newton, raw: tuple[float, float] | None = None) -> dict:
    """The report entry of one fitted piece."""
    out: dict = {"interval": [round(p.lo, 6), round(p.hi, 6)], "depth": p.depth}
    if raw is not None:
        out["calibrated"] = [round(raw[0], 6), round(raw[1], 6)]
    if isinstance(p, Cheb):
        out["degree"] = p.degree
    else:
        out["iterations"] = p.iters
    return out


def replace_unary(model: ir.Model, ctx, functions: dict[str, Callable[[np.ndarray], np.ndarray]],
                  degree: int, tol: float, report, rule: str) -> None:
    """Replace every node whose op is in ``functions`` by a Chebyshev fit on its input range.

    The fit is weighted by the calibration data (``fit_on_data``); ``degree`` > 0 fixes it.
    """
    ensure_shapes(model)
    nodes = [n for n in model.graph if n.op_type in functions and n.domain in ("", "ai.onnx")]
    arrays = capture(model, [n.inputs[0] for n in nodes], ctx.samples)
    b = Builder(model.graph)
    replaced = report.details.setdefault("replaced", {})
    for node, xs in zip(nodes, arrays, strict=True):
        f = functions[node.op_type]
        if node.op_type == "Gelu" and node.attributes.get("approximate") is not None \
                and node.attributes["approximate"].value == "tanh":
            f = functions.get("GeluTanh", f)
        lo, hi, raw_lo, raw_hi = span(xs, ctx.margin(MARGIN))
        p = fit_on_data(f, xs, lo, hi, tol, degree)
        x = node.inputs[0]
        b.redirect(node.outputs[0], write_cheb(b.at(node, like=x), x, p))
        entry = describe(p, (raw_lo, raw_hi))
        err = np.concatenate([np.ravel(p(x) - f(x)) for x in xs])
        entry.update(op=node.op_type, max_abs_error_on_data=float(np.max(np.abs(err))),
                     max_abs_error_on_interval=p.max_error(f))
        replaced[node.name] = entry
        report.change(rule)
