"""INT8 quantization machinery of ``quantize-int8``: observers, ranges, scales, QDQ emission.

Affine quantization of a real ``x`` with scale ``s > 0`` and zero point ``z``::

    q = clip(round(x / s) + z, qmin, qmax),    x̂ = (q − z) · s

(round half to even, as ONNX QuantizeLinear). Activations are per tensor: uint8 asymmetric on
a calibrated range ``[lo, hi]`` widened to hold 0 (``s = (hi − lo) / 255``,
``z = round(−lo / s)``), or int8 symmetric (``s = max(|lo|, |hi|) / 127``, ``z = 0``). Weights
are int8 symmetric, per output channel (``s_c = max|W_c| / 127``) or per tensor, stored as
int8 initializers read through DequantizeLinear.

Calibration ranges of an activation come from an ``Observer`` that streams over the samples
(exact min/max, per-channel min/max/absmax on the last axis, an evenly strided subsample of at
most ``KEEP`` values): ``minmax`` uses the extremes, ``percentile`` the p-th percentiles of the
subsample, ``mse`` the shrink factor ``t`` of the min-max range minimising the mean squared
quantization error of the subsample (a grid of ``t`` in [0.2, 1]).

SQNR of a tensor and its quantized copy is ``10·log10(Σx² / Σ(x − x̂)²)`` dB.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from edgekit.errors import EdgekitError, first_line
from edgekit.passes._ir import Builder
from edgekit.verify import ort_session

METHODS = ("minmax", "percentile", "mse")
KEEP = 1 << 18  # values an observer keeps for percentile / mse
UINT8, INT8 = (0, 255), (-128, 127)


@dataclass(frozen=True)
class Affine:
    """Scale(s) and zero point(s) of an affine quantizer; ``axis`` is None per tensor."""

    scale: np.ndarray  # float32, 0-d or one per channel
    zero_point: np.ndarray  # uint8 or int8, the shape of scale
    axis: int | None = None

    @property
    def limits(self) -> tuple[int, int]:
        return UINT8 if self.zero_point.dtype == np.uint8 else INT8

    def fake(self, x: np.ndarray) -> np.ndarray:
        """``x`` quantized and dequantized (float64), as QuantizeLinear→DequantizeLinear."""
        shape = [-1 if i == self.axis else 1 for i in range(x.ndim)] if self.axis is not None \
            else []
        s = self.scale.astype(np.float64).reshape(shape)
        z = self.zero_point.astype(np.float64).reshape(shape)
        q = np.clip(np.round(x / s) + z, *self.limits)
        return (q - z) * s


class Observer:
    """Streaming statistics of one activation over the calibration samples."""

    def __init__(self) -> None:
        self.lo, self.hi = np.inf, -np.inf
        self.ch_lo: np.ndarray | None = None  # per channel of the last axis
        self.ch_hi: np.ndarray | None = None
        self.kept: list[np.ndarray] = []
        self.seen = 0

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32)
        self.lo, self.hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))
        flat = x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)
        lo, hi = flat.min(0), flat.max(0)
        self.ch_lo = lo if self.ch_lo is None else np.minimum(self.ch_lo, lo)
        self.ch_hi = hi if self.ch_hi is None else np.maximum(self.ch_hi, hi)
        self.kept.append(x.reshape(-1))
        self.seen += x.size
        if sum(k.size for k in self.kept) > 2 * KEEP:
            self.kept = [self.values()]

    def values(self) -> np.ndarray:
        """An evenly strided subsample of at most ``KEEP`` of the observed values."""
        allv = np.concatenate(self.kept)
        return allv[:: max(1, allv.size // KEEP)]

    @property
    def ch_absmax(self) -> np.ndarray:
        return np.maximum(np.abs(self.ch_lo), np.abs(self.ch_hi))


def observe(model: ir.Model, values: Sequence[ir.Value],
            samples: Sequence[dict[str, np.ndarray]]) -> list[Observer]:
    """One ``Observer`` per value, fed by onnxruntime runs of ``model`` on ``samples``."""
    proto = ir.to_proto(model)
    inputs = {v.name for v in proto.graph.input}
    known = {o.name for o in proto.graph.output}
    for v in values:
        if v.name not in known and v.name not in inputs:
            elem = v.dtype.value if v.dtype is not None else onnx.TensorProto.FLOAT
            proto.graph.output.append(onnx.helper.make_tensor_value_info(v.name, elem, None))
            known.add(v.name)
    order = [o.name for o in proto.graph.output]
    session = ort_session(proto)
    observers = [Observer() for _ in values]
    for sample in samples:
        try:
            outs = dict(zip(order, session.run(None, dict(sample)), strict=True))
        except Exception as exc:  # ORT raises several unrelated types
            raise EdgekitError(
                f"onnxruntime failed on a calibration sample: {first_line(exc)}") from exc
        for obs, v in zip(observers, values, strict=True):
            obs.update(sample[v.name] if v.name in inputs else outs[v.name])
    return observers


def activation_range(obs: Observer, method: str, percentile: float,
                     symmetric: bool) -> tuple[float, float]:
    """The clip range ``[lo, hi]`` (holding 0) of an observed activation, by ``method``."""
    lo, hi = min(obs.lo, 0.0), max(obs.hi, 0.0)
    if method == "percentile":
        x = obs.values()
        if symmetric:
            hi = float(np.percentile(np.abs(x), percentile))
            lo = -hi
        else:
            lo = min(float(np.percentile(x, 100 - percentile)), 0.0)
            hi = max(float(np.percentile(x, percentile)), 0.0)
    elif method == "mse":
        x = obs.values().astype(np.float64)
        best = (np.inf, lo, hi)
        for t in np.linspace(1.0, 0.2, 41):
            q = activation_params(lo * t, hi * t, symmetric)
            err = float(np.mean((q.fake(x) - x) ** 2))
            if err < best[0]:
                best = (err, lo * t, hi * t)
        lo, hi = best[1], best[2]
    elif method != "minmax":
        raise EdgekitError(f"unknown calibration method {method!r} (methods: {', '.join(METHODS)})")
    return lo, hi


def activation_params(lo: float, hi: float, symmetric: bool) -> Affine:
    """uint8 asymmetric (or int8 symmetric) per-tensor parameters for the range [lo, hi]."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        scale = max(-lo, hi) / 127 or 1.0
        return Affine(np.array(scale, np.float32), np.array(0, np.int8))
    scale = (hi - lo) / 255 or 1.0
    zp = int(np.clip(np.round(-lo / np.float32(scale)), *UINT8))
    return Affine(np.array(scale, np.float32), np.array(zp, np.uint8))


def weight_params(w: np.ndarray, axis: int, per_channel: bool, qmax: int = 127) -> Affine:
    """Symmetric int8 parameters: ``max|W| / qmax`` per slice along ``axis`` (or per tensor);
    ``qmax = 63`` is the 7-bit "reduce range" whose u8×s8 pair sums cannot saturate int16."""
    if not per_channel:
        scale = np.float32(np.abs(w).max() / qmax) or np.float32(1.0)
        return Affine(np.array(scale, np.float32), np.array(0, np.int8))
    other = tuple(i for i in range(w.ndim) if i != axis)
    scale = (np.abs(w).max(axis=other) / qmax).astype(np.float32)
    scale[scale == 0] = 1.0  # an all-zero channel quantizes to zeros at any scale
    return Affine(scale, np.zeros(scale.shape, np.int8), axis)


def quantize_weight(w: np.ndarray, q: Affine) -> np.ndarray:
    """The int8 array DequantizeLinear reads (symmetric: clipped to ±127)."""
    shape = [-1 if i == q.axis else 1 for i in range(w.ndim)] if q.axis is not None else []
    return np.clip(np.round(w / q.scale.reshape(shape)), -127, 127).astype(np.int8)


def sqnr_db(x: np.ndarray, x_hat: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when exact)."""
    x = np.asarray(x, np.float64)
    noise = float(np.sum((x - x_hat) ** 2))
    signal = float(np.sum(x ** 2))
    return float("inf") if noise == 0 else 10 * float(np.log10(max(signal, 1e-300) / noise))


def _typed(value: ir.Value, dtype: ir.DataType, like: ir.Value) -> ir.Value:
    value.type = ir.TensorType(dtype)
    value.shape = like.shape
    return value


def emit_activation(b: Builder, x: ir.Value, q: Affine | None, before: ir.Node) -> ir.Value:
    """``DequantizeLinear(QuantizeLinear(x))`` before ``before`` (dynamic: ``q`` is None,
    DynamicQuantizeLinear's uint8 per-tensor scale and zero point feed the DequantizeLinear)."""
    at = b.at(before, hint=f"{x.name}_q", like=x)
    if q is None:
        y, s, z = at.op_multi("DynamicQuantizeLinear", [x], None, 3)
        _typed(y, ir.DataType.UINT8, x)
        s.type, s.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape([])
        z.type, z.shape = ir.TensorType(ir.DataType.UINT8), ir.Shape([])
        return at.op("DequantizeLinear", [y, s, z], like=x, shape=x.shape)
    scale = at.shared(q.scale, f"{x.name}_scale")
    zp = at.shared(q.zero_point, f"{x.name}_zero_point")
    qx = at.op("QuantizeLinear", [x, scale, zp], like=x)
    _typed(qx, ir.DataType.UINT8 if q.zero_point.dtype == np.uint8 else ir.DataType.INT8, x)
    return at.op("DequantizeLinear", [qx, scale, zp], like=x, shape=x.shape)


def emit_weight(b: Builder, node: ir.Node, index: int, w: np.ndarray, q: Affine) -> None:
    """Input ``index`` of ``node`` becomes ``DequantizeLinear(int8 W)`` (per-channel axis)."""
    old = node.inputs[index]
    name = old.name or node.name
    at = b.at(node, hint=f"{name}_dq", like=old)
    wq = at.const(quantize_weight(w, q), f"{name}_int8")
    inputs = [wq, at.const(q.scale, f"{name}_scale"), at.const(q.zero_point, f"{name}_zero_point")]
    attrs = {"axis": q.axis} if q.axis is not None else None
    node.replace_input_with(index, at.op("DequantizeLinear", inputs, attrs, like=old,
                                         shape=old.shape))
    if not old.uses() and not old.is_graph_output() and old.name in b.graph.initializers:
        del b.graph.initializers[old.name]


def cosines(outs: Sequence[Sequence[np.ndarray]],
            refs: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
    """Cosine similarity of each float output (flattened) with its reference, per sample."""
    result = []
    for out, ref in zip(outs, refs, strict=True):
        for y, r in zip(out, ref, strict=True):
            r = np.asarray(r)
            if r.dtype.kind != "f":
                continue
            y64, r64 = np.asarray(y, np.float64).ravel(), r.astype(np.float64).ravel()
            den = float(np.linalg.norm(y64) * np.linalg.norm(r64))
            if den == 0:  # a zero vector matches only a zero vector
                result.append(1.0 if not y64.any() and not r64.any() else 0.0)
            else:
                result.append(float(y64 @ r64) / den)
    return np.array(result)


def relative_mse(outs: Sequence[Sequence[np.ndarray]],
                 refs: Sequence[Sequence[np.ndarray]]) -> float:
    """Mean over samples and float outputs of ``‖y − r‖² / ‖r‖²``: additive over small
    independent quantization noises, so per-node values give shares of the total."""
    errs = [float(np.sum((np.asarray(y, np.float64) - r) ** 2) / max(np.sum(r ** 2.0), 1e-30))
            for out, ref in zip(outs, refs, strict=True)
            for y, r in zip(out, ref, strict=True) if np.asarray(r).dtype.kind == "f"]
    return float(np.mean(errs)) if errs else 0.0


def run_all(proto: onnx.ModelProto | str, samples: Sequence[dict[str, np.ndarray]],
            fused: bool = False) -> list[list]:
    """Every output of ``proto`` (or the model file at that path) on each sample (one
    onnxruntime session): the QDQ math
    (``verify.ort_session(qdq_fusions=False)``), or with ``fused`` onnxruntime's integer
    kernels, which saturate int16 pair sums on x86 without VNNI."""
    session = ort_session(proto, qdq_fusions=fused)
    try:
        return [session.run(None, dict(s)) for s in samples]
    except Exception as exc:  # ORT raises several unrelated types
        raise EdgekitError(f"onnxruntime failed on the quantized model: {first_line(exc)}") \
            from exc
