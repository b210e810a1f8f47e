"""The rewrite layer: the Pass record, its report, and the checked pipeline runner.

A pass is one module exposing ``PASS = Pass(...)``. Its ``apply(model, ctx, *, ...)``
edits an ``onnx_ir.Model`` in place and returns ``ctx.report``, a ``PassReport``: counts per
rule of what changed and, for every candidate it left alone, the node name and the reason (a
matcher that gives up says why). A pass that cannot apply at all raises ``PassRefused``; the
candidates it skipped before that stay in the ledger with the refusal. The pass's parameters
are ``apply``'s keyword-only arguments: their annotations (bool, int, float or str) type the
CLI's strings, their defaults are the defaults; nothing repeats them.

``run_pipeline`` runs a plain list of passes. After each pass it checks the new graph
against the previous one in onnxruntime on seeded inputs (and the user's calibration
samples): exact passes must stay within ``EXACT_RTOL`` norm-wise relative error, approximate
passes within their declared ``budget``, and an output that turns non-finite where the
reference is finite fails the check whatever the budget. A pass that fails its check is rolled
back. Every run, kept or not, becomes one ledger entry.

A ``fitted`` pass (the polynomial passes) fits ranges to the samples it sees, so it refuses to
run on seeded noise alone: seeded N(0, 1) inputs are not the model's data, and a polynomial
evaluated outside its fitted range diverges (all-MiniLM-L6-v2 fitted on seeded inputs passed
its checks yet gave non-finite embeddings on real sentences). ``calibration`` says what the
samples are: "samples" (the user's), "seeded" (an explicit opt-in: ranges are widened by
``SEEDED_WIDEN`` and the ledger says so; widening does not make noise into data: MiniLM from
word embeddings still diverged on 40 of 40 real sentences) or "none" (fitted passes are
refused).

With the user's samples, a fitted pass's budget is judged on those samples only (the seeded
ones are marked ``SeededSample``): seeded N(0, 1) images or token ids are not the model's
data, and a pass fitted to real ranges (int8 saturates outside them by design) would be judged
on noise. The finite-output check still runs on every sample. A pass may take its budget from
one of its parameters (``budget_param``), so a user can loosen or tighten it per run.

Symbolic dims (``edgekit.shapes``): the seeded samples cover every ``shapes.check_points``
length of the model's bounds (``verify.model_dims``), so a rewrite is checked at the low end,
the high end and an odd length in between; the user's samples may have any lengths inside the
bounds (``calibration`` as a sequence of per-sample mappings, or an ``.npz`` with keys
``NAME/0``, ``NAME/1``, ...), each bound against the model's inputs first (``shapes.bind``:
one-line errors naming the dim and its bounds). A pass that needs a static dim raises
``PassRefused`` saying so (token-prune: a static token count).

A graph that quantizes activations (QuantizeLinear) is run without onnxruntime's QDQ fusions
(``verify.ort_session(qdq_fusions=False)``): its integer kernels saturate int16 pair sums on
x86 without AVX-512 VNNI, so with them the check would judge onnxruntime's kernels on this
CPU, not the rewritten graph's math (what TVM compiles exactly).
"""

from __future__ import annotations

import contextlib
import inspect
import time
import typing
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import (
    RemoveInitializersFromInputsPass,
    RemoveUnusedNodesPass,
    ShapeInferencePass,
    TopologicalSortPass,
)

from edgekit import flops, shapes
from edgekit.errors import EdgekitError, first_line
from edgekit.passes._half import ort_form
from edgekit.verify import (
    TensorSpec,
    compare,
    dims_of,
    model_dims,
    onnx_input_specs,
    ort_session,
    quantizes,
    resolve_dims,
    run_ort,
    seeded_at,
)

EXACT_RTOL = 1e-5
SEEDED_WIDEN = 3.0  # fitted margins are multiplied by this when fitting on seeded inputs
CALIBRATION_MODES = ("samples", "seeded", "none")
NEEDS_CALIBRATION = (
    "it fits polynomial ranges to data and no calibration samples were given: pass "
    "--calibration FILE.npz of real inputs (or --seeded-calibration to fit seeded inputs with "
    "widened ranges)")


class SeededSample(dict):
    """A seeded input sample (``load_samples`` puts these first): not the model's data."""


class PassRefused(Exception):
    """The pass does not apply to this model; ``node`` names where it found out why."""

    def __init__(self, reason: str, node: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.node = node


@dataclass
class PassReport:
    """What one pass did: ``changed`` counts per rule, ``skipped`` (node, reason) pairs."""

    changed: Counter = field(default_factory=Counter)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def change(self, rule: str, count: int = 1) -> None:
        self.changed[rule] += count

    def skip(self, node: str, reason: str) -> None:
        self.skipped.append((node, reason))

    @property
    def modified(self) -> bool:
        return sum(self.changed.values()) > 0


@dataclass
class PassContext:
    """What a pass may look at besides the graph: the samples the check will use; and the
    report it writes into (and returns), so what it skipped survives a later refusal."""

    samples: list[dict[str, np.ndarray]]
    report: PassReport = field(default_factory=PassReport)
    seeded: bool = False  # fitting on seeded inputs only (opt-in): widen fitted ranges

    @property
    def real_samples(self) -> list[dict[str, np.ndarray]]:
        """The user's calibration samples (the seeded ones left out); empty without them."""
        return [s for s in self.samples if not isinstance(s, SeededSample)]

    def margin(self, base: float) -> float:
        """A fitted range's margin: ``base``, or ``base × SEEDED_WIDEN`` on seeded inputs."""
        return base * SEEDED_WIDEN if self.seeded else base


PARAM_TYPES = (bool, int, float, str)


@dataclass(frozen=True)
class Pass:
    """A rewrite: its name, one-line summary, exactness and entry point.

    ``apply(model, ctx, *, name: type = default, ...)``: every parameter after ``model`` and
    ``ctx`` is keyword-only, annotated with one of ``PARAM_TYPES`` and has a default.
    """

    name: str
    summary: str
    exact: bool
    apply: Callable[..., PassReport]
    budget: float = EXACT_RTOL  # max norm-wise relative error its check allows
    fitted: bool = False  # fits ranges to the samples: needs real calibration data
    budget_param: str = ""  # when set, the budget is this parameter's value instead

    def __post_init__(self) -> None:
        types = self.param_types()  # a malformed signature fails where the pass is defined
        if self.budget_param and types.get(self.budget_param) is not float:
            raise TypeError(f"pass {self.name!r}: budget_param {self.budget_param!r} is not a "
                            "float parameter of apply")

    def param_types(self) -> dict[str, type]:
        """Each parameter's type, from ``apply``'s annotations."""
        hints = typing.get_type_hints(self.apply)
        types = {}
        for i, (key, p) in enumerate(inspect.signature(self.apply).parameters.items()):
            if i < 2 and p.kind is p.POSITIONAL_OR_KEYWORD:
                continue  # model, ctx
            kind = hints.get(key)
            if (p.kind is not p.KEYWORD_ONLY or kind not in PARAM_TYPES
                    or type(p.default) is not kind):
                raise TypeError(f"pass {self.name!r}: apply's parameter {key!r} must be "
                                "keyword-only, typed bool/int/float/str, with a default of "
                                "that type")
            types[key] = kind
        return types

    @property
    def params(self) -> dict[str, Any]:
        """Parameter defaults, in ``apply``'s order."""
        sig = inspect.signature(self.apply).parameters
        return {key: sig[key].default for key in self.param_types()}

    def parse_params(self, given: Mapping[str, str]) -> dict[str, Any]:
        """Defaults overridden by ``given`` strings, converted to each parameter's type."""
        out, types = self.params, self.param_types()
        unknown = set(given) - set(out)
        if unknown:
            known = ", ".join(out) or "none"
            raise EdgekitError(
                f"pass {self.name!r} has no parameter {sorted(unknown)[0]!r} (parameters: {known})")
        for key, text in given.items():
            kind = types[key]
            try:
                if kind is bool:
                    if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                        raise ValueError(text)
                    out[key] = text.lower() in ("1", "true", "yes")
                else:
                    out[key] = kind(text)
            except ValueError:
                raise EdgekitError(
                    f"pass {self.name!r}: parameter {key}={text!r} is not a "
                    f"{kind.__name__}") from None
        return out


@dataclass
class PassRun:
    """One ledger entry: a pass run, its check and whether it was kept."""

    name: str
    params: dict[str, Any]
    exact: bool
    status: str  # applied | unchanged | refused | rolled-back
    report: PassReport
    ops_before: dict[str, int]
    ops_after: dict[str, int]
    max_abs: float | None = None
    max_rel: float | None = None
    budget: float | None = None
    seconds: float = 0.0
    message: str = ""
    flops_before: int | None = None  # edgekit.flops.count; None when shapes are not static
    flops_after: int | None = None
    calibration: str | None = None  # a fitted pass's data: one of CALIBRATION_MODES

    def to_dict(self) -> dict[str, Any]:
        return {
            "pass": self.name,
            "params": self.params,
            "exact": self.exact,
            "status": self.status,
            "changed": dict(self.report.changed),
            "skipped": [{"node": n, "reason": r} for n, r in self.report.skipped],
            "details": self.report.details,
            "ops_before": self.ops_before,
            "ops_after": self.ops_after,
            "flops_before": self.flops_before,
            "flops_after": self.flops_after,
            "max_abs_error": self.max_abs,
            "max_rel_error": self.max_rel,
            "budget": self.budget,
            "seconds": round(self.seconds, 4),
            "message": self.message,
            "calibration": self.calibration,
        }


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))


def parse_pass_list(text: str, available: Mapping[str, Pass]) -> list[tuple[Pass, dict]]:
    """``"fold-bn,poly-softmax:degree=64:iters=3"`` -> [(Pass, params), ...]."""
    result = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, *assignments = item.split(":")
        if name not in available:
            names = ", ".join(available)
            raise EdgekitError(f"unknown pass {name!r} (available: {names})")
        given = {}
        for a in assignments:
            key, sep, value = a.partition("=")
            if not sep or not key:
                raise EdgekitError(f"bad pass parameter {a!r} in {item!r}: expected key=value")
            given[key] = value
        p = available[name]
        result.append((p, p.parse_params(given)))
    return result


def load_samples(
    model: onnx.ModelProto,
    input_specs: Sequence[TensorSpec] = (),
    calibration: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]] | None = None,
    seeds: int = 2,
) -> list[dict[str, np.ndarray]]:
    """Seeded samples (``seeds`` per check point of the model's symbolic dims) plus
    calibration samples: arrays with an optional leading sample axis, or a sequence of
    per-sample mappings (samples of different lengths)."""
    specs = onnx_input_specs(model, input_specs)
    bounds = resolve_dims(specs, model_dims(model), dims_of(input_specs))
    samples: list[dict[str, np.ndarray]] = [SeededSample(inputs) for seed in range(seeds)
                                            for _, inputs in seeded_at(specs, bounds, seed)]
    if not calibration:
        return samples
    per_sample = (_split_samples(specs, calibration) if isinstance(calibration, Mapping)
                  else [dict(c) for c in calibration])
    declared = {s.name: s.shape for s in specs}
    for i, sample in enumerate(per_sample):
        missing = [s.name for s in specs if s.name not in sample]
        if missing:
            raise EdgekitError(f"calibration data has no array for input {missing[0]!r}"
                               + (f" (sample {i})" if not isinstance(calibration, Mapping)
                                  else ""))
        try:
            shapes.bind(declared, {k: np.shape(sample[k]) for k in declared}, bounds)
        except EdgekitError as exc:
            raise EdgekitError(f"calibration sample {i}: {exc}") from None
        samples.append({s.name: np.asarray(sample[s.name]).astype(s.dtype) for s in specs})
    return samples


def _split_samples(specs: Sequence[TensorSpec], calibration: Mapping[str, np.ndarray]
                   ) -> list[dict[str, np.ndarray]]:
    """Arrays with an optional leading sample axis -> one mapping per sample; or keys
    ``NAME/I`` (sample I's array for input NAME, as an ``.npz`` of samples of different
    lengths holds them) -> sample I."""
    names = {s.name for s in specs}
    keyed = [k.rpartition("/") for k in calibration]
    if calibration and all(sep and name in names and i.isdigit() for name, sep, i in keyed):
        samples: dict[int, dict[str, np.ndarray]] = {}
        for (name, _, i), arr in zip(keyed, calibration.values(), strict=True):
            samples.setdefault(int(i), {})[name] = arr
        return [samples[i] for i in sorted(samples)]
    missing = [s.name for s in specs if s.name not in calibration]
    if missing:
        raise EdgekitError(f"calibration data has no array for input {missing[0]!r}")
    counts = set()
    for s in specs:
        arr = calibration[s.name]
        if arr.ndim == len(s.shape) + 1:
            counts.add(arr.shape[0])
        elif arr.ndim != len(s.shape):
            raise EdgekitError(
                f"calibration array {s.name!r} has shape {arr.shape}; expected "
                f"{shapes.format_shape(s.shape)} or (samples, *shape)")
    n = counts.pop() if len(counts) == 1 else 1
    if counts:
        raise EdgekitError("calibration arrays disagree on the number of samples")
    out = []
    for i in range(n):
        sample = {}
        for s in specs:
            arr = np.asarray(calibration[s.name])
            sample[s.name] = arr[i] if arr.ndim == len(s.shape) + 1 else arr
        out.append(sample)
    return out


def _check(
    before: onnx.ModelProto, after: onnx.ModelProto, samples: list[dict[str, np.ndarray]],
    real_only: bool = False,
) -> tuple[float, float, str]:
    """Worst max-abs and norm-wise relative error of ``after`` against ``before`` (over the
    non-seeded samples only with ``real_only``), and a problem when an output of ``after`` is
    non-finite where the reference is finite (on any sample)."""
    names = [o.name for o in before.graph.output]
    worst_abs = worst_rel = 0.0
    # a graph that quantizes is judged on its QDQ math: onnxruntime's fused integer kernels
    # saturate on x86 without VNNI, and the check would judge that bug, not the rewrite
    # bfloat16 as onnxruntime's CPU provider can run it: emulated in fp32 (_half.ort_form)
    ref_session, new_session = (ort_session(ort_form(m), qdq_fusions=not quantizes(m))
                                for m in (before, after))
    for i, sample in enumerate(samples):
        ref = run_ort(ref_session, sample)
        out = run_ort(new_session, sample)
        if len(out) != len(ref):
            return float("inf"), float("inf"), "the rewritten graph has other outputs"
        for name, y, r in zip(names, out, ref, strict=True):
            y, r = np.asarray(y), np.asarray(r)
            if y.shape == r.shape and y.dtype.kind == "f" and r.dtype.kind == "f":
                bad = int(np.count_nonzero(~np.isfinite(y) & np.isfinite(r)))
                if bad:
                    return float("inf"), float("inf"), (
                        f"output {name!r} has {bad} non-finite value(s) where the original is "
                        f"finite (check sample {i})")
        if real_only and isinstance(sample, SeededSample):
            continue
        for c in compare(names, out, ref, atol=0.0, rtol=0.0):
            worst_abs = max(worst_abs, c.max_abs)
            worst_rel = max(worst_rel, c.rel)
    return worst_abs, worst_rel, ""


def run_pass(
    model: onnx.ModelProto, p: Pass, params: Mapping[str, Any], samples: list[dict],
    calibration: str = "samples",
) -> tuple[onnx.ModelProto, PassRun]:
    """Run one pass on a copy of ``model``, check it, and keep it only if the check passes.

    ``calibration`` (one of ``CALIBRATION_MODES``) says whether ``samples`` hold real data."""
    if calibration not in CALIBRATION_MODES:
        raise ValueError(f"calibration={calibration!r}: expected one of {CALIBRATION_MODES}")
    before = flops.try_count(model)
    if p.fitted and calibration == "none":
        ops = op_counts(model)
        report = PassReport(skipped=[("(model)", NEEDS_CALIBRATION)])
        new, run = model, PassRun(p.name, dict(params), p.exact, "refused", report, ops, ops,
                                  message=NEEDS_CALIBRATION)
    else:
        new, run = _run_pass(model, p, params, samples, calibration == "seeded")
    if p.fitted:
        run.calibration = calibration
    run.flops_before = before
    run.flops_after = before if new is model else flops.try_count(new)
    return new, run


def _run_pass(
    model: onnx.ModelProto, p: Pass, params: Mapping[str, Any], samples: list[dict],
    seeded: bool,
) -> tuple[onnx.ModelProto, PassRun]:
    start = time.perf_counter()
    work = ir.from_proto(model)
    if work.ir_version is not None and work.ir_version < 4:
        # IR < 4 lists initializers as graph inputs, so they are not constants to a pass;
        # IR 4 semantics make them constants without changing what the model computes.
        RemoveInitializersFromInputsPass()(work)
        work.ir_version = 4
    # passes read ranks and shapes of intermediate values; where inference fails (custom
    # domains), passes skip what they cannot see, with reasons
    with contextlib.suppress(Exception):
        ShapeInferencePass()(work)
    before_ops = op_counts(model)
    ctx = PassContext(samples, seeded=seeded)
    try:
        report = p.apply(work, ctx, **params)
    except PassRefused as refusal:
        report = PassReport(skipped=list(ctx.report.skipped))  # its changes are gone
        report.skip(refusal.node or "(model)", refusal.reason)
        run = PassRun(p.name, dict(params), p.exact, "refused", report, before_ops, before_ops,
                      seconds=time.perf_counter() - start, message=refusal.reason)
        return model, run
    if not report.modified:
        message = "" if report.skipped else "found nothing this pass rewrites"
        run = PassRun(p.name, dict(params), p.exact, "unchanged", report, before_ops, before_ops,
                      seconds=time.perf_counter() - start, message=message)
        return model, run
    RemoveUnusedNodesPass()(work)
    TopologicalSortPass()(work)
    new = ir.to_proto(work)
    budget = float(params[p.budget_param]) if p.budget_param else p.budget
    budget = EXACT_RTOL if p.exact else budget
    real_only = p.fitted and not seeded and bool(ctx.real_samples)
    try:
        onnx.checker.check_model(new, full_check=True)
        max_abs, max_rel, problem = _check(model, new, samples, real_only)
        if not problem and max_rel > budget:
            problem = (f"error {max_rel:.3g} relative (max abs {max_abs:.3g}) exceeds the "
                       f"budget {budget:g}"
                       + (" on the calibration samples" if real_only else ""))
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError,
            EdgekitError) as exc:
        max_abs = max_rel = float("inf")
        problem = f"the rewritten graph is invalid: {first_line(exc)}"
    seconds = time.perf_counter() - start
    if problem:
        run = PassRun(p.name, dict(params), p.exact, "rolled-back", report, before_ops,
                      before_ops, max_abs, max_rel, budget, seconds, problem)
        return model, run
    run = PassRun(p.name, dict(params), p.exact, "applied", report, before_ops, op_counts(new),
                  max_abs, max_rel, budget, seconds)
    return new, run


def run_pipeline(
    model: onnx.ModelProto,
    passes: Sequence[tuple[Pass, Mapping[str, Any]]],
    samples: list[dict[str, np.ndarray]],
    progress: Callable[[str], None] | None = None,
    calibration: str = "samples",
) -> tuple[onnx.ModelProto, list[PassRun]]:
    """Run passes in order; each is checked against the model before it."""
    ledger = []
    for p, params in passes:
        if progress is not None:
            progress(f"pass {p.name}")
        model, run = run_pass(model, p, params, samples, calibration)
        ledger.append(run)
    return model, ledger
