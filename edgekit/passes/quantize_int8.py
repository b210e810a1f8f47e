"""quantize-int8: static W8A8 post-training quantization written as standard QDQ ONNX.

Quantized: MatMul with a constant 2-D weight ``W[K, N]`` (channel axis 1), Gemm with a
constant B (axis 1, or 0 with ``transB``), Conv with constant weights ``W[M, C/g, …]`` (axis
0). Each weight becomes an int8 initializer read through ``DequantizeLinear`` (symmetric,
zero point 0, ``s_c = max|W_c|/127`` per output channel; per tensor with
``per_channel=false``); biases stay float. The op's activation input ``x`` is read through
``DequantizeLinear(QuantizeLinear(x, s, z))`` with per-tensor ``s, z`` from the calibration
``method`` (``_quant``): uint8 asymmetric (what onnxruntime's and x86's u8×s8 dot products
take) or int8 symmetric (``symmetric=true``). ``mode=dynamic`` reads ``x`` through
``DynamicQuantizeLinear → DequantizeLinear`` (per-run uint8 range; onnxruntime and TVM's
Relax importer both convert these two ops, unlike ConvInteger); ``mode=weights`` quantizes
weights only. Activation × activation MatMuls (attention) stay float unless ``attention``.
Each constant 2-D Gather table (token embeddings) is stored as int8 with one scale per row,
read through ``DequantizeLinear(axis=0)``: weight-only, whatever the mode (the compiler
gathers the int8 rows and dequantizes only those, ``GatherDequantized``); not a table another
node also reads (a tied LM head would keep its float copy beside it); ``embeddings=false``
keeps tables float. On by default: MiniLM's word table is half its weights (0.65x -> 0.26x of
the fp32 library, held-out cosine 0.9957 / 0.9921 -> 0.9956 / 0.9918).

Before quantizing, ``smooth=α`` (SmoothQuant) and ``reparam`` (RepQ-ViT) rewrite each
LayerNormalization read by linear layers so its outliers fit a per-tensor scale
(``_quant_reparam``; exact in real arithmetic; other readers, the residual Add of a post-LN
BERT, read a compensated copy). Then every candidate node's sensitivity is measured: the
relative output MSE ``mean ‖y − r‖²/‖r‖²`` when only that node is quantized, on the first
``SENSITIVITY_SAMPLES`` samples (its share of the sum is the locator's ``error_share``).
Every score, like the core check, is of the QDQ math: onnxruntime without its QDQ fusions
(``verify.ort_session(qdq_fusions=False)``), what TVM computes exactly. onnxruntime's fused
int8 kernels (what a user running this ONNX in onnxruntime gets) are scored once more on the
result; when they trail the QDQ math by more than ``SATURATION_GAP`` in minimum cosine, the
ledger says so: on x86 without VNNI, u8×s8 pair sums saturate int16 (``symmetric=true``
avoids it: s8×s8 kernels; ``reduce_range=true`` quantizes weights to 7 bits, ±63, as
onnxruntime's option of that name). With ``min_cosine > 0`` the most
sensitive nodes are kept float, greedily, until the minimum cosine of every output against
the float model over the calibration samples is at least ``min_cosine``; if that needs every
node float the pass is refused with the best cosine found.

Preconditions: real calibration samples (``--calibration``; seeded inputs are not the model's
data and are never calibrated on), opset ≥ 13, float32 activations. The check (core) holds
the result to ``max_error`` norm-wise relative error on the calibration samples.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from edgekit.errors import EdgekitError
from edgekit.passes import _quant as q
from edgekit.passes._ir import Builder, attr, const_array, onnx_opset
from edgekit.passes._quant_reparam import foldable, reparam_layernorm, smooth_layernorm
from edgekit.passes.core import Pass, PassContext, PassRefused, PassReport

MODES = ("static", "dynamic", "weights")
SATURATION_GAP = 0.01  # min-cosine gap between ORT's fused kernels and the QDQ math
SENSITIVITY_SAMPLES = 8  # one model per node is run: sensitivity on the first few samples
# SmoothQuant α on by default: on all-MiniLM-L6-v2 (post-LN, every projection int8) held-out
# cosine 0.9959 / 0.9940 (mean / min) against 0.9939 / 0.9910 without (docs/quantization.md)
DEFAULT_SMOOTH = 0.5


@dataclass(frozen=True)
class Candidate:
    """A node to quantize: its position in graph order, activation inputs and weight."""

    index: int
    name: str
    op: str
    acts: tuple[int, ...]  # input indices quantized as activations
    weight: int | None  # input index of the constant weight
    axis: int | None  # the weight's output-channel axis


def _candidate(i: int, node: ir.Node, attention: bool) -> Candidate | str:
    """What to quantize in ``node``, or why it stays float."""
    op = node.op_type
    if op == "Gather":  # an embedding table: weight-only, one scale per row
        table = const_array(node.inputs[0])
        if table is None or table.ndim != 2:
            return "its table is not a constant 2-D tensor"
        if attr(node, "axis", 0) != 0:
            return f"a Gather along axis {attr(node, 'axis', 0)}, not the table's rows"
        if const_array(node.inputs[1]) is not None:
            return "its indices are constants (fold-constants first)"
        return Candidate(i, node.name, op, (), 0, 0)
    w = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if op == "MatMul" and w is None and const_array(node.inputs[0]) is None:
        if not attention:
            return "activation × activation MatMul (attention) stays float (attention=true)"
        return Candidate(i, node.name, op, (0, 1), None, None)
    if w is None:
        return f"its weight {node.inputs[1].name!r} is not a constant"
    if const_array(node.inputs[0]) is not None:
        return "its first operand is a constant (fold-constants first)"
    if op == "MatMul" and w.ndim != 2:
        return f"its weight has rank {w.ndim}, not 2"
    if op == "Gemm" and attr(node, "transA", 0):
        return "Gemm with transA=1"
    axis = 0 if op == "Conv" or (op == "Gemm" and attr(node, "transB", 0)) else 1
    return Candidate(i, node.name, op, (0,), 1, axis)


def _find(model: ir.Model, attention: bool, embeddings: bool,
          report: PassReport) -> list[Candidate]:
    ops = ("MatMul", "Gemm", "Conv", "Gather") if embeddings else ("MatMul", "Gemm", "Conv")
    found = []
    for i, node in enumerate(model.graph):
        if node.domain not in ("", "ai.onnx") or node.op_type not in ops:
            continue
        c = _candidate(i, node, attention)
        bad = [node.inputs[k].name for k in (c.acts if isinstance(c, Candidate) else ())
               if node.inputs[k].dtype != ir.DataType.FLOAT]
        if bad:
            c = f"its input {bad[0]!r} is not float32 (QuantizeLinear's float type here)"
        if isinstance(c, str):
            report.skip(node.name, c)
        else:
            found.append(c)
    nodes = list(model.graph)
    as_weight = {(id(nodes[c.index]), c.weight) for c in found if c.weight is not None}
    for c in [c for c in found if c.op == "Gather"]:
        table = nodes[c.index].inputs[0]
        other = [u.node.name for u in table.uses() if (id(u.node), u.idx) not in as_weight]
        if other:  # a tied head left float: an int8 copy would sit beside the float table
            report.skip(c.name, f"its table is also read by {other[0]!r}, which keeps it "
                                "float (tied weights): an int8 copy would add, not save")
            found.remove(c)
    return found


def _outlier_rewrites(model: ir.Model, ctx: PassContext, smooth: float, reparam: bool) -> None:
    """SmoothQuant migration, then RepQ-ViT reparameterization, on foldable LayerNorms."""
    report, b = ctx.report, Builder(model.graph)
    lns = [n for n in model.graph if n.op_type == "LayerNormalization" and n.domain == ""]
    steps = [step for step, on in (("smooth", smooth), ("reparam", reparam)) if on]
    for step in steps:
        usable = []  # found again per step: the first one's compensation is a new reader
        for ln in lns:
            readers, why = foldable(ln)
            if why and step == steps[0]:
                report.skip(ln.name, f"{step}: {why}")
            elif not why:
                usable.append((ln, readers))
        if not usable:
            continue
        obs = q.observe(model, [ln.outputs[0] for ln, _ in usable], ctx.real_samples)
        done = report.details.setdefault(step, {})
        for (ln, readers), o in zip(usable, obs, strict=True):
            if step == "smooth":
                done[ln.name] = smooth_layernorm(b, ln, readers, o.ch_absmax, smooth)
            else:
                done[ln.name] = reparam_layernorm(b, ln, readers, o.ch_lo, o.ch_hi)
            report.change(f"{step} LayerNorm")


def _emit(model: ir.Model, cands: list[Candidate], chosen: set[int], acts: dict,
          weights: dict, mode: str) -> None:
    """Write QDQ for the ``chosen`` candidates (by graph index) into ``model``."""
    nodes, b, dq = list(model.graph), Builder(model.graph), {}
    for c in cands:
        if c.index not in chosen:
            continue
        node = nodes[c.index]
        for k in c.acts if mode != "weights" else ():
            x = node.inputs[k]
            if x.name not in dq:
                dq[x.name] = q.emit_activation(b, x, acts.get(x.name), node)
            node.replace_input_with(k, dq[x.name])
        if c.weight is not None:
            q.emit_weight(b, node, c.weight, const_array(node.inputs[c.weight]), weights[c.index])


class _Trial:
    """Quantizes copies of the float model and scores them on the real samples (the QDQ
    math unless ``fused``: onnxruntime's integer kernels).

    The float weights are written once, as external data in a temporary folder; each copy
    is that small graph file loaded again (its weights stay references to the one file),
    quantized and saved beside it, so a trial copies only what it quantizes instead of the
    whole model (MiniLM: 90 MB, three times, per trial)."""

    def __init__(self, model: ir.Model, cands: list[Candidate], acts: dict, weights: dict,
                 mode: str, samples: list[dict]):
        self.cands, self.acts, self.weights = cands, acts, weights
        self.mode, self.samples = mode, samples
        self._dir = tempfile.TemporaryDirectory(prefix="edgekit-quantize-")
        self.float_path = Path(self._dir.name) / "float.onnx"
        onnx.save_model(ir.to_proto(model), self.float_path, save_as_external_data=True,
                        all_tensors_to_one_file=True, location="weights.bin",
                        size_threshold=1024)
        self.ref = q.run_all(str(self.float_path), samples)

    def close(self) -> None:
        self._dir.cleanup()

    def outputs(self, chosen: set[int], fused: bool = False, first: int | None = None
                ) -> list[list]:
        copy = ir.load(self.float_path)
        _emit(copy, self.cands, chosen, self.acts, self.weights, self.mode)
        path = self.float_path.with_name("trial.onnx")
        ir.save(copy, path)
        return q.run_all(str(path), self.samples[:first], fused)

    def cosine(self, chosen: set[int], fused: bool = False) -> np.ndarray:
        return q.cosines(self.outputs(chosen, fused), self.ref)

    def sensitivity(self, index: int) -> float:
        """Relative output MSE with only candidate ``index`` quantized (first few samples)."""
        first = SENSITIVITY_SAMPLES
        return q.relative_mse(self.outputs({index}, first=first), self.ref[:first])


def _mixed_precision(trial: _Trial, errors: dict[int, float], min_cosine: float,
                     cos: np.ndarray, report: PassReport) -> tuple[set[int], np.ndarray]:
    """Keep the most sensitive nodes float until the minimum cosine reaches ``min_cosine``;
    the nodes left int8 and their cosines (``cos``: every node int8)."""
    chosen = set(errors)
    for index in sorted(errors, key=errors.get, reverse=True):
        if cos.min() >= min_cosine:
            break
        chosen.discard(index)
        if not chosen:
            raise PassRefused(
                f"min_cosine {min_cosine:g} is not met even with only one node quantized "
                f"(best minimum cosine {cos.min():.4f}); lower min_cosine or use mode=weights")
        name = trial.cands[[c.index for c in trial.cands].index(index)].name
        report.details["float_nodes"][name] = (
            f"kept float: min cosine {cos.min():.4f} < {min_cosine:g} with it quantized "
            f"(error share rank {len(errors) - len(chosen)})")
        cos = trial.cosine(chosen)
    return chosen, cos


def apply(model: ir.Model, ctx: PassContext, *, mode: str = "static",
          method: str = "minmax", percentile: float = 99.99, per_channel: bool = True,
          symmetric: bool = False, reduce_range: bool = False, attention: bool = False,
          reparam: bool = False, smooth: float = DEFAULT_SMOOTH, min_cosine: float = 0.0,
          max_error: float = 1.0, embeddings: bool = True) -> PassReport:
    report = ctx.report
    if mode not in MODES:
        raise EdgekitError(f"quantize-int8: mode={mode!r}: expected one of {', '.join(MODES)}")
    if method not in q.METHODS:
        raise EdgekitError(f"quantize-int8: method={method!r}: expected one of "
                           f"{', '.join(q.METHODS)}")
    if not 0 <= min_cosine <= 1 or not 0 <= smooth <= 1 or not 50 < percentile <= 100:
        raise EdgekitError("quantize-int8: min_cosine and smooth must lie in [0, 1], "
                           "percentile in (50, 100]")
    samples = ctx.real_samples
    if not samples:
        raise PassRefused("int8 ranges are calibrated on real inputs only and none were given: "
                          "pass --calibration FILE.npz (seeded inputs are not the model's data)")
    if onnx_opset(model) < 13:
        raise PassRefused(f"opset {onnx_opset(model)} < 13: per-channel DequantizeLinear needs 13")
    if mode == "weights":  # the default smoothing goes without saying
        if reparam or smooth != DEFAULT_SMOOTH:
            report.skip("(model)", "reparam/smooth change activation ranges only: not with "
                                   "mode=weights")
    elif reparam or smooth:
        _outlier_rewrites(model, ctx, smooth, reparam)
    cands = _find(model, attention, embeddings, report)
    if mode == "weights":  # an activation × activation MatMul has no weight to quantize
        for c in [c for c in cands if c.weight is None]:
            report.skip(c.name, "activation × activation MatMul: no weight (mode=weights)")
        cands = [c for c in cands if c.weight is not None]
    if not cands:
        return report
    nodes = list(model.graph)
    values = list({nodes[c.index].inputs[k].name: nodes[c.index].inputs[k]
                   for c in cands for k in c.acts}.values())
    observers = dict(zip([v.name for v in values], q.observe(model, values, samples),
                         strict=True))
    acts = {name: q.activation_params(*q.activation_range(o, method, percentile, symmetric),
                                      symmetric) for name, o in observers.items()}
    weights = {c.index: q.weight_params(const_array(nodes[c.index].inputs[c.weight]), c.axis,
                                        per_channel,
                                        63 if reduce_range and c.op != "Gather" else 127)
               for c in cands if c.weight is not None}
    static_acts = acts if mode == "static" else {}
    trial = _Trial(model, cands, static_acts, weights, mode, samples)
    try:
        errors = {c.index: trial.sensitivity(c.index) for c in cands}
        report.details["float_nodes"] = {}
        chosen = set(errors)
        cos = trial.cosine(chosen)
        if min_cosine > 0:
            chosen, cos = _mixed_precision(trial, errors, min_cosine, cos, report)
        fused = trial.cosine(chosen, fused=True)
    finally:
        trial.close()
    report.details["cosine"] = {"mean": float(cos.mean()), "min": float(cos.min()),
                                "samples": len(samples),
                                "onnxruntime_fused_min": float(fused.min())}
    if cos.min() - fused.min() > SATURATION_GAP:
        report.skip("(model)", (
            f"onnxruntime's fused int8 kernels on this CPU give min cosine {fused.min():.4f} "
            f"where the QDQ math (what the check judges, what TVM computes) gives "
            f"{cos.min():.4f}: u8×s8 products saturate int16 on x86 without VNNI, so a user "
            "running this graph in onnxruntime here gets the worse numbers; symmetric=true "
            "(s8×s8 kernels) avoids it"))
    report.details["locator"] = _locator(cands, nodes, chosen, errors, observers, acts,
                                         weights, mode, method)
    _emit(model, cands, chosen, static_acts, weights, mode)
    for c in cands:
        if c.index in chosen:
            report.change(f"int8 {c.op}")
    return report


def _locator(cands: list[Candidate], nodes: list[ir.Node], chosen: set[int],
             errors: dict[int, float], observers: dict, acts: dict, weights: dict, mode: str,
             method: str) -> list[dict]:
    """Per candidate node: its quantizers, their SQNR and its share of the output error."""
    total = sum(errors.values()) or 1.0
    rows = []
    for c in cands:
        node = nodes[c.index]
        x = node.inputs[c.acts[0]].name if c.acts else None  # None: an embedding table
        a = acts[x] if x is not None else None
        static = mode == "static" and a is not None
        row = {"node": c.name, "op": c.op, "precision": "int8" if c.index in chosen else "float",
               "error_share": errors[c.index] / total, "rel_mse_alone": errors[c.index],
               "activation": x, "method": "none" if mode == "weights" or x is None else
               "dynamic" if mode == "dynamic" else method,
               "act_scale": float(a.scale) if static else None,
               "act_zero_point": int(a.zero_point) if static else None,
               "act_sqnr_db": None if mode == "weights" or x is None else
               q.sqnr_db(observers[x].values(), a.fake(observers[x].values()))}
        if c.weight is not None:
            w = const_array(node.inputs[c.weight]).astype(np.float64)
            wq = weights[c.index]
            row.update(weight_axis=wq.axis, weight_scale_min=float(wq.scale.min()),
                       weight_scale_max=float(wq.scale.max()),
                       weight_sqnr_db=q.sqnr_db(w, wq.fake(w)))
        rows.append(row)
    return sorted(rows, key=lambda r: -r["error_share"])


PASS = Pass(
    name="quantize-int8",
    summary="static W8A8 post-training quantization as QDQ ONNX (per-channel int8 weights, "
            "calibrated activations, outlier reparameterizations, mixed precision)",
    exact=False,
    apply=apply,
    fitted=True,
    budget=1.0,
    budget_param="max_error",
)
