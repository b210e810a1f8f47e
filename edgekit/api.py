"""The Python API. The CLI is a thin layer over these functions: everything a command does
can be done from here, and ``edgekit.cli`` imports nothing else from edgekit but errors.

    export()    MODEL spec -> checked single-file ONNX
    rewrite()   ONNX -> checked passes -> ONNX + ledger, op counts and FLOPs before/after
    tune()      ONNX -> MetaSchedule records in the per-target tuning database
    compile()   ONNX -> (passes) -> TVM library, verified against onnxruntime -> artifact
    profile()   artifact -> latency statistics (+ onnxruntime / torch baselines)
    per_op()    artifact -> time of every kernel, mapped to ONNX nodes
    run()       artifact + inputs -> outputs
    verify_artifact()  artifact -> checked, and its digest (to pin with --sha256)
    demo()      export -> compile -> profile a built-in model, report.json
    he_check()  ONNX -> HE-friendliness, multiplicative depth
    he_run()    ONNX + inputs -> CKKS run, errors against onnxruntime
Also: the listings (graphs, targets, passes), the device farm and runner build, and the
saved-run helpers (load/save, compare, assertions, regression gate) the commands use.
Importing this module is cheap: TVM and torch load inside the functions that need them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from edgekit import intake, verify
from edgekit.arrays import load_npy, load_npz, save_npz
from edgekit.errors import EdgekitError
from edgekit.files import replacing
from edgekit.graphs import DEFAULT as DEFAULT_GRAPH
from edgekit.report.compare import (
    check_assertion,
    check_regression,
    compare_runs,
    environment_differences,
    parse_assertion,
    parse_percent,
)
from edgekit.report.html import write_report
from edgekit.report.record import parse_duration
from edgekit.report.schema import load_run, save_run, save_text
from edgekit.scratch import private_tempdir
from edgekit.targets import list_targets
from edgekit.verify import Comparison, InputSpecs, TensorSpec, parse_input_spec, parse_inputs

if TYPE_CHECKING:
    from edgekit.graphs import GraphInfo
    from edgekit.he.check import HEReport
    from edgekit.he.run import HERun
    from edgekit.passes.core import Pass

__all__ = [
    "DEFAULT_ATOL", "DEFAULT_GRAPH", "DEFAULT_RTOL", "Comparison", "CompileResult",
    "DemoResult", "ExportResult", "InputSpecs", "RewriteResult", "RunnerBuild", "TensorSpec",
    "build_runner", "check_assertion", "check_regression", "compare_runs", "compile", "demo",
    "environment_differences", "export", "export_streaming", "he_check", "he_run",
    "list_devices", "list_graphs", "list_passes", "list_targets", "load_calibration", "load_npy",
    "load_npz", "load_run", "parse_assertion", "parse_duration", "parse_input_spec",
    "parse_inputs", "parse_percent", "per_op", "private_tempdir", "profile", "rewrite", "run",
    "run_stream", "repair_tuning_db", "save_npz", "save_run", "serve_device", "serve_tracker",
    "tune", "verify_artifact", "write_report",
]

Progress = Callable[[str], None]
DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-4


def _quiet(_: str) -> None:
    pass


@dataclass
class ExportResult:
    model: onnx.ModelProto
    specs: list[TensorSpec]
    source: intake.Source
    comparisons: list[Comparison] = field(default_factory=list)
    dims: dict[str, tuple[int, int]] = field(default_factory=dict)  # symbolic dims' bounds


def _lengths_text(dims: Mapping[str, tuple[int, int]]) -> str:
    """``seq=1, 256, 129`` (the check points, for progress lines)."""
    from edgekit import shapes

    points = shapes.check_points(dims)
    return "; ".join(f"{k}={', '.join(str(p[k]) for p in points)}" for k in dims)


def export(
    spec: str,
    out: str | Path | None = None,
    inputs: Sequence[TensorSpec] = (),
    weights: str | Path | None = None,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    progress: Progress = _quiet,
    task: str | None = None,
    pooling: str | None = None,
) -> ExportResult:
    """Export a built-in graph, ``file.py:factory`` or ``hf:PATH`` (a transformers folder, with
    ``task`` and for feature extraction ``pooling``: ``edgekit.hf``) to ONNX (or check an
    ``.onnx`` file).
    Writes ``out`` only when onnxruntime matches torch within ``atol + rtol * max|ref|``.
    ``inputs`` may name symbolic dims (``parse_inputs(["ids:1xseq:int64"], ["seq=1..256"])``):
    the ONNX model then serves every length in the bounds, checked at several of them."""
    from edgekit.export import check_against_torch, export_module, rename_outputs, save_onnx

    if intake.is_onnx_spec(spec):
        if weights is not None:
            raise EdgekitError("--weights applies to torch models, not to ONNX files")
        progress(f"checking {spec}")
        model = intake.load_onnx(spec, inputs)
        result = ExportResult(model, verify.onnx_input_specs(model, inputs),
                              intake.Source("onnx", str(Path(spec).resolve())),
                              dims=verify.model_dims(model))
    else:
        progress(f"building {spec}")
        tm = intake.load_torch(spec, inputs, weights, task, pooling)
        progress("exporting with torch.onnx (dynamo)")
        model = export_module(tm.module, tm.specs, dims=tm.dims)
        if tm.output_names:
            rename_outputs(model, tm.output_names)
        progress("checking onnxruntime against torch"
                 + (f" at {_lengths_text(tm.dims)}" if tm.dims else ""))
        comparisons = check_against_torch(tm.module, model, tm.specs, atol, rtol, dims=tm.dims)
        if not all(c.ok for c in comparisons):
            raise EdgekitError("exported ONNX differs from torch beyond tolerance "
                               f"(atol {atol:g}, rtol {rtol:g}): "
                               f"{verify.describe_failures(comparisons)}")
        if tm.real_inputs:
            progress(f"checking onnxruntime against torch on {len(tm.real_inputs)} real inputs")
            _check_real_inputs(tm, model, atol, rtol)
        result = ExportResult(model, tm.specs, tm.source, comparisons, tm.dims)
        intake.set_source(result.model, tm.source)
        intake.set_metadata(result.model, tm.metadata)
    if out is not None:
        save_onnx(result.model, out)
    return result


def _check_real_inputs(tm: intake.TorchModel, model: onnx.ModelProto, atol: float,
                       rtol: float) -> None:
    """onnxruntime against torch on ``tm.real_inputs`` (an hf: model's tokenized sentences,
    each at its own length): one-line error naming the input that differs."""
    from edgekit.export import torch_outputs

    session = verify.ort_session(model)
    names = [o.name for o in model.graph.output]
    for i, inputs in enumerate(tm.real_inputs):
        got = verify.run_ort(session, inputs)
        comparisons = verify.compare(names, got, torch_outputs(tm.module, inputs), atol, rtol)
        if not all(c.ok for c in comparisons):
            shape = "x".join(map(str, next(iter(inputs.values())).shape))
            raise EdgekitError(f"exported ONNX differs from torch on real input #{i} ({shape}) "
                               f"beyond tolerance (atol {atol:g}, rtol {rtol:g}): "
                               f"{verify.describe_failures(comparisons)}")


def export_streaming(
    spec: str,
    out: str | Path | None = None,
    chunk: int = 1,
    inputs: Sequence[TensorSpec] = (),
    weights: str | Path | None = None,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    progress: Progress = _quiet,
):
    """Export the step form of a streamable model: ``chunk`` frames in, named state in and
    out. Checked against the torch step module and, stepped through a sequence, against the
    parallel model; see ``edgekit.streaming.export``."""
    from edgekit.streaming.export import export_step

    return export_step(spec, out, chunk, inputs, weights, atol, rtol, progress)


@dataclass
class RewriteResult:
    model: onnx.ModelProto
    ledger: list  # list[passes.core.PassRun]
    ops_before: dict[str, int] = field(default_factory=dict)  # op type -> node count
    ops_after: dict[str, int] = field(default_factory=dict)
    flops_before: int | None = None  # None: some shape is unknown (see edgekit.flops)
    flops_after: int | None = None

    def ledger_dicts(self) -> list[dict[str, Any]]:
        return [run.to_dict() for run in self.ledger]


def rewrite(
    model: onnx.ModelProto | str | Path,
    passes: str,
    inputs: Sequence[TensorSpec] = (),
    calibration: Mapping[str, np.ndarray] | str | Path | None = None,
    progress: Progress = _quiet,
    out: str | Path | None = None,
    strict: bool = False,
) -> RewriteResult:
    """Apply ``passes`` ("a,b:key=value,...") in order, each checked; failed ones roll back.

    ``model`` is a model or an ONNX file (``inputs`` fix its input shapes), ``calibration``
    arrays or an ``.npz`` of them, or ``"seeded"``: polynomial (fitted) passes then fit seeded
    inputs with widened ranges; without calibration they are refused. The result is written to
    ``out`` when given. ``strict``: a refused or rolled-back pass raises ``EdgekitError``
    naming it, and nothing is written."""
    from edgekit import flops
    from edgekit.export import save_onnx
    from edgekit.passes import available
    from edgekit.passes.core import (
        SeededSample,
        load_samples,
        op_counts,
        parse_pass_list,
        run_pipeline,
    )

    if not isinstance(model, onnx.ModelProto):
        model = intake.load_onnx(model, inputs)
    mode = "samples" if calibration is not None else "none"
    if isinstance(calibration, str) and calibration == "seeded":
        mode, calibration = "seeded", None
    elif isinstance(calibration, (str, Path)):
        calibration = load_calibration(calibration)
    plan = parse_pass_list(passes, available())
    samples = load_samples(model, inputs, calibration)
    ops_before, flops_before = op_counts(model), flops.try_count(model)
    rewritten, ledger = run_pipeline(model, plan, samples, progress, mode)
    _set_calibrated_ranges(rewritten, [s for s in samples if not isinstance(s, SeededSample)])
    failed = [r for r in ledger if r.status in ("refused", "rolled-back")]
    if strict and failed:
        raise EdgekitError("strict: " + "; ".join(
            f"{r.name} was {r.status}: {r.message}" for r in failed) + "; nothing written")
    if out is not None:
        save_onnx(rewritten, out)
    return RewriteResult(rewritten, ledger, ops_before, op_counts(rewritten), flops_before,
                         flops.try_count(rewritten))


CALIBRATED_RANGES_KEY = "edgekit.calibrated_ranges"


def _set_calibrated_ranges(model: onnx.ModelProto, real: list[dict[str, np.ndarray]]) -> None:
    """Record in the ONNX metadata, per graph input, the min and max over the real calibration
    samples ``real`` (NaN ignored): ``compile`` copies it into the manifest, and the runtime
    warns when an input leaves it (``runtime.CompiledModel.run``). Seeded samples are not
    data: without real ones an earlier record (of passes fitted before) is kept as it is."""
    if not real:
        return
    ranges = {}
    for name in real[0]:  # samples may differ in length: their values, flattened
        values = np.concatenate([np.ravel(s[name]) for s in real])
        if values.dtype.kind in "fiu" and values.size and not np.isnan(values).all():
            ranges[name] = {"min": float(np.nanmin(values)), "max": float(np.nanmax(values)),
                            "samples": len(real)}
    props = [p for p in model.metadata_props if p.key != CALIBRATED_RANGES_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(props)
    if ranges:
        import json

        model.metadata_props.add(key=CALIBRATED_RANGES_KEY, value=json.dumps(ranges))


def _calibrated_ranges(model: onnx.ModelProto) -> dict[str, Any]:
    """``{"calibrated_ranges": {...}}`` from the ONNX metadata (see ``_set_calibrated_ranges``),
    or ``{}``; a record that is not an object of {min, max} is an error naming the key."""
    import json

    for prop in model.metadata_props:
        if prop.key == CALIBRATED_RANGES_KEY:
            try:
                ranges = json.loads(prop.value)
            except json.JSONDecodeError:
                ranges = None
            if not isinstance(ranges, dict) or not all(
                    isinstance(r, dict) and {"min", "max"} <= set(r) for r in ranges.values()):
                raise EdgekitError(f"the model's {CALIBRATED_RANGES_KEY} metadata is not an "
                                   "object of input name -> {min, max}")
            names = {i.name for i in model.graph.input}  # a range of nothing left is dropped
            kept = {k: v for k, v in ranges.items() if k in names}
            return {"calibrated_ranges": kept} if kept else {}
    return {}


def load_calibration(path: str | Path) -> dict[str, np.ndarray]:
    """Read a ``.npz`` of calibration inputs (headers checked first, no pickled objects)."""
    return load_npz(path, "calibration")


@dataclass
class CompileResult:
    path: Path
    manifest: dict[str, Any]


def compile(  # noqa: A001 - the verb users expect
    onnx_path: str | Path,
    target: str,
    out: str | Path,
    passes: str = "",
    inputs: Sequence[TensorSpec] = (),
    calibration: Mapping[str, np.ndarray] | None = None,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    source: Mapping[str, Any] | None = None,
    progress: Progress = _quiet,
    tune: bool = False,
    trials: int | None = None,
    tune_minutes: float | None = None,
    tuning_db: str | Path | None = None,
    task: str | None = None,
    pooling: str | None = None,
) -> CompileResult:
    """Compile an ONNX file for ``target`` into an artifact directory ``out``. Any other MODEL
    ``export`` takes (a built-in graph, ``file.py:factory``, ``hf:PATH`` with ``task``) is
    exported first, into a private temporary folder, and then compiled.

    For targets that run on this machine the compiled library is run against onnxruntime on
    seeded inputs, then on inputs with NaN, +-Inf and +-1e30 (NaN and Inf must land where
    onnxruntime's do); if any output differs nothing is written. Before anything slow, the
    opset is checked and the estimated memory of inputs, weights and activations is compared
    with the memory available (``intake.check_memory``).
    CPU targets: ``tune`` runs MetaSchedule first (``trials`` / ``tune_minutes`` budget);
    records in the tuning database (``tuning_db``, default per target under the user's
    cache) are applied whether or not this call tunes (see ``edgekit.compiler.tune``).
    Symbolic dims (the file's own names or ``inputs``' names, bounded by ``inputs.dims`` or
    the bounds the file records): one artifact serves every length inside the bounds; the
    manifest records the names, ``dims`` and the compiler's ``shapes`` choice."""
    from edgekit import artifact, compiler, runtime
    from edgekit.compiler import half, qdq_check
    from edgekit.compiler.qdq import qdq_counts
    from edgekit.targets import load_target

    if not intake.is_onnx_spec(str(onnx_path)):  # a MODEL spec: export it first
        import tempfile

        with tempfile.TemporaryDirectory(prefix="edgekit-export.") as d:
            tmp = Path(d)
            exported = export(str(onnx_path), tmp / "model.onnx", inputs, atol=atol,
                              rtol=rtol, progress=progress, task=task, pooling=pooling)
            return compile(tmp / "model.onnx", target, out, passes, [], calibration, atol,
                           rtol, source or exported.source.to_dict(), progress, tune, trials,
                           tune_minutes, tuning_db)
    if task is not None or pooling is not None:
        raise EdgekitError("--task and --pooling apply when compiling an hf:PATH model")
    tgt = load_target(target)
    model = intake.load_onnx(onnx_path, inputs)
    if tgt.runs_on_host or passes:  # onnxruntime and the library run it here: sizes first
        intake.check_memory(model, f"checking {Path(onnx_path).name} on this machine")
    streaming = _streaming_manifest(model)  # step graphs from `export --streaming`
    specs = verify.onnx_input_specs(model, inputs)
    bounds = verify.model_dims(model)  # load_onnx checked and recorded them
    source_hash = runtime.sha256_file(Path(onnx_path))
    ledger: list[dict[str, Any]] = []
    if passes:
        rewritten = rewrite(model, passes, inputs, calibration, progress)
        model, ledger = rewritten.model, rewritten.ledger_dicts()
    tgt.find_cross_compiler()  # fail before the long compile when the toolchain is missing
    half.check_native(model, tgt)  # fp16/bf16 graphs only where computed natively
    progress("importing into TVM Relax")
    mod = compiler.to_relax(model, specs, progress, tgt.tvm_target(), dim_bounds=bounds)
    progress(f"compiling for {tgt.name}")
    tuning: dict[str, Any] = {}
    executable = compiler.build(
        mod, tgt, compiler.TuningRequest(
            tune or trials is not None or tune_minutes is not None, trials, tune_minutes,
            tuning_db), progress, tuning)
    out = Path(out)
    outputs = _output_specs(model)
    with artifact.staging(out) as tmp:
        progress("linking")
        compiler.export_library(executable, tgt, tmp / artifact.LIBRARY)
        (tmp / artifact.ONNX_FILE).write_bytes(model.SerializeToString())
        app = _app_files(model, tmp)  # an hf: model's task and tokenizer
        rtol = half.check_rtol(model, rtol)  # a 16-bit graph: its format's own tolerance
        check: dict[str, Any] = {"against": "onnxruntime", "atol": atol, "rtol": rtol}
        note = half.arithmetic_note(model, tgt)  # bfloat16 on a CPU: computed in fp32
        if note:
            check["half_arithmetic"] = note
        int8_kernels = tuning.pop("int8_kernels", [])
        shapes_info = tuning.pop("shapes", None)
        if verify.quantizes(model):  # tolerance in quantization steps, what runs in int8
            check["quantization"] = {**qdq_counts(mod), "int8_kernels": int8_kernels}
            if tgt.runs_on_host:  # what check_library allows beyond atol/rtol, per output
                check["quantization"].update(
                    reference="onnxruntime without its QDQ fusions (verify.QDQ_FUSIONS)",
                    flip_steps=qdq_check.FLIP_STEPS, nudge=qdq_check.NUDGE,
                    outputs=qdq_check.tolerances(model, verify.seeded_at(specs, bounds)[0][1],
                                                 [o.name for o in outputs]))
        if tgt.runs_on_host:
            progress("verifying against onnxruntime")
            comparisons = compiler.check_library(tmp / artifact.LIBRARY, model, specs, outputs,
                                                 tgt, atol, rtol, dim_bounds=bounds)
            check["outputs"] = [c.to_dict() for c in comparisons]
            if not all(c.ok for c in comparisons):
                steps = " plus the quantization allowance" if "quantization" in check else ""
                raise EdgekitError(
                    f"compiled model differs from onnxruntime beyond tolerance (atol {atol:g}, "
                    f"rtol {rtol:g}{steps}): {verify.describe_failures(comparisons)}; "
                    "nothing written")
        else:
            check["skipped"] = f"target {tgt.name} does not run on this machine"
        manifest = artifact.publish(tmp, out, {
            "target": {**tgt.to_dict(), "machine": tgt.machine},
            "inputs": [s.to_dict() for s in specs],
            "outputs": [s.to_dict() for s in outputs],
            # symbolic inputs: the bounds every length must keep, and how the compiler serves
            # them (one symbolic library, buckets; compiler.build reports it)
            **({"dims": {k: list(v) for k, v in bounds.items()}} if bounds else {}),
            **({"shapes": shapes_info} if shapes_info else {}),
            "source": {**(source or intake.get_source(model) or
                          {"kind": "onnx", "spec": str(Path(onnx_path).resolve())}),
                       "onnx_sha256": source_hash},
            "verification": check,
            "passes": ledger,
            "tuning": tuning or None,
            # what runtime.load checks against the memory free where it runs
            "memory": asdict(intake.estimate_memory(
                onnx.shape_inference.infer_shapes(model))),
            **_calibrated_ranges(model),  # the runtime warns on inputs outside them
            **({"app": app} if app else {}),
            **streaming,
        })
    return CompileResult(out, manifest)


def _app_files(model: onnx.ModelProto, folder: Path) -> dict[str, Any] | None:
    """The app entry an ``hf:`` export recorded (``edgekit.hf``), its tokenizer written into
    the artifact ``folder`` (hashed with the other files by ``artifact.publish``)."""
    import json

    from edgekit import hf

    props = {p.key: p.value for p in model.metadata_props}
    if hf.APP_KEY not in props:
        return None
    try:
        app = json.loads(props[hf.APP_KEY])
    except json.JSONDecodeError:
        raise EdgekitError(f"the model's {hf.APP_KEY} metadata is not JSON") from None
    if not isinstance(app, dict) or app.get("task") not in hf.TASKS:
        raise EdgekitError(f"the model's {hf.APP_KEY} metadata names no known task")
    if "tokenizer" in app:
        if hf.TOKENIZER_KEY not in props:
            raise EdgekitError(f"the model's {hf.APP_KEY} names a tokenizer but the model "
                               "carries none: re-export it with edgekit export hf:PATH")
        # one fixed name: a file name from metadata could point outside the artifact
        app["tokenizer"] = {**app["tokenizer"], "file": hf.TOKENIZER_FILE}
        (folder / hf.TOKENIZER_FILE).write_text(props[hf.TOKENIZER_KEY])
    return app


def _streaming_manifest(model: onnx.ModelProto) -> dict[str, Any]:
    """``{"streaming": {...}}`` (state names, shapes, initial values, delay) for a step graph
    written by ``export_streaming``; ``{}`` for ordinary models."""
    from edgekit.streaming.export import read_metadata

    data = read_metadata(model)
    return {} if data is None else {"streaming": data}


def _output_specs(model: onnx.ModelProto) -> list[TensorSpec]:
    """Output specs from shape inference: a dim named after a bounded input dim keeps the
    name (``seq``); any other unknown dim (an expression, an unnamed one) is -1."""
    inferred = onnx.shape_inference.infer_shapes(model)
    names = verify.model_dims(model)
    out = []
    for o in inferred.graph.output:
        t = o.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else
                      d.dim_param if d.dim_param in names else -1 for d in t.shape.dim)
        out.append(TensorSpec(o.name, shape, verify._ONNX_TO_NUMPY.get(t.elem_type, "unknown")))
    return out


def run(artifact_path: str | Path, inputs: Mapping[str, np.ndarray],
        sha256: str | None = None, warn_ranges: bool = True,
        warn: Callable[[str], None] | None = None) -> dict[str, np.ndarray]:
    """Load an artifact (pinned to ``sha256`` when given, see ``verify``) and run it once.
    ``warn_ranges``: warn when an input leaves the range the model's approximate passes were
    calibrated on (``runtime.CompiledModel.run``); ``warn`` receives each such line (default:
    Python's ``warnings``)."""
    import warnings

    from edgekit import runtime

    try:
        model = runtime.load(artifact_path, sha256=sha256, warn_ranges=warn_ranges)
        if warn is None:
            return model.run(dict(inputs))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", runtime.RangeWarning)
            outputs = model.run(dict(inputs))
        for w in caught:
            if issubclass(w.category, runtime.RangeWarning):
                warn(str(w.message))
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return outputs
    except (runtime.ArtifactError, ValueError) as exc:
        raise EdgekitError(str(exc)) from None


def verify_artifact(artifact_path: str | Path, sha256: str | None = None) -> dict[str, Any]:
    """Check an artifact without running it (manifest schema, exactly the listed files with
    their sha256, a complete ELF library for the target's machine) and return its digest:
    the sha256 of ``manifest.json``, which pins every file (``sha256``: the digest it must
    have). Returns ``{"path", "sha256", "target", "files"}``."""
    from edgekit import runtime

    try:
        manifest = runtime.read_manifest(artifact_path, sha256=sha256)
        digest = runtime.manifest_digest(artifact_path)
    except runtime.ArtifactError as exc:
        raise EdgekitError(str(exc)) from None
    return {"path": str(artifact_path), "sha256": digest, "target": manifest["target"]["name"],
            "files": manifest["files"]}


def run_stream(artifact_path: str | Path,
               inputs: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
    """Feed a sequence frame by frame (chunk by chunk) through a step artifact.

    Returns ``({output name: per-frame outputs}, delay)``, aligned with the input: frame
    ``i`` of the output belongs to frame ``i`` of the input. A model that looks ``delay``
    frames ahead cannot produce its last ``delay`` frames, so they are absent."""
    from edgekit import runtime

    try:
        session = runtime.load(artifact_path).stream()
        name = session.frame_spec["name"]
        if set(inputs) != {name}:
            raise EdgekitError(f"a step artifact streams one input, {name!r}; got "
                               f"{', '.join(sorted(inputs)) or 'none'}")
        y = session.run(inputs[name])
    except (runtime.ArtifactError, ValueError) as exc:
        raise EdgekitError(str(exc)) from None
    axis, delay = session.time_axis, session.delay
    aligned = np.take(y, range(delay, y.shape[axis]), axis=axis)
    return {session.model.manifest["streaming"]["frame_output"]: aligned}, delay


def profile(artifact_path: str | Path, runner: str | None = None, tracker: str | None = None,
            key: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """See ``edgekit.profile.profile_artifact`` (``inputs``: arrays to time on; ``lengths``:
    a sweep of a symbolic artifact's dim, one row per length, onnxruntime beside it);
    ``runner`` ("native", "qemu") or ``tracker`` + ``key`` profile on a device instead
    (``edgekit.devices.profile_on_device``; a symbolic artifact at its upper bounds)."""
    from edgekit import runtime
    from edgekit.profile import profile_artifact

    if runner or tracker or key:
        from edgekit.devices import profile_on_device

        if (kwargs.pop("source", None) or kwargs.pop("sha256", None)
                or kwargs.pop("inputs", None) is not None or kwargs.pop("lengths", None)):
            raise EdgekitError("--source, --sha256, --input and --lengths apply to profiling "
                               "in this process, not with --runner or --tracker")
        kwargs.pop("memory", None)  # RSS is measured in local processes only
        return profile_on_device(artifact_path, runner, tracker, key, **kwargs)
    try:
        result = profile_artifact(artifact_path, **kwargs)
        if "streaming" in runtime.read_manifest(artifact_path, check_hashes=False):
            from edgekit.streaming.profiling import profile_stream

            keep = ("warmup", "repeat", "duration", "seed")  # threads: set by profile_artifact
            result["stream"] = profile_stream(
                artifact_path, **{k: v for k, v in kwargs.items() if k in keep})
        return result
    except runtime.ArtifactError as exc:
        raise EdgekitError(str(exc)) from None


def per_op(artifact_path: str | Path, threads: int | None = None, warmup: int = 3,
           repeat: int = 20, seed: int = 0) -> dict[str, Any]:
    """Time every kernel and VM builtin of an artifact on seeded inputs, each kernel mapped
    to the ONNX nodes it computes (see ``edgekit.per_op``). Returns ``{"per_op": rows,
    "per_op_info": {...}}``, the keys a saved profile run carries."""
    from edgekit import runtime
    from edgekit.per_op import profile_artifact_per_op

    try:
        return profile_artifact_per_op(artifact_path, threads, warmup, repeat, seed)
    except runtime.ArtifactError as exc:
        raise EdgekitError(str(exc)) from None


def tune(onnx_path: str | Path, target: str = "host", inputs: Sequence[TensorSpec] = (),
         trials: int | None = None, tune_minutes: float | None = None,
         tuning_db: str | Path | None = None, progress: Progress = _quiet) -> dict[str, Any]:
    """Tune the model's kernels with MetaSchedule on this machine (``target`` must run here)
    into the per-target tuning database; no artifact is written. Later compiles for the
    target apply the records to every model sharing a kernel. Returns the session's numbers
    (tasks, tasks_tuned: kernels that got measured candidates, trials, seconds, cost model,
    kernels with records, records_skipped: bad database lines passed over, database)."""
    from edgekit.compiler import tune_model

    # tuning runs the kernels here: sizes first, as compile does, not a MemoryError later
    intake.check_memory(intake.load_onnx(onnx_path, inputs),
                        f"tuning {Path(onnx_path).name} on this machine")
    return tune_model(onnx_path, target, inputs, trials, tune_minutes, tuning_db, progress)


def repair_tuning_db(target: str = "host", tuning_db: str | Path | None = None
                     ) -> dict[str, Any]:
    """Rewrite the target's tuning database without its torn or foreign lines (under its lock,
    each file replaced atomically). Returns db, removed (one line per bad line), workloads,
    records (what is kept)."""
    from edgekit.compiler.pipeline import repair_db

    return repair_db(target, tuning_db)


@dataclass
class DemoResult:
    report: dict[str, Any]  # what report.json holds: the checks and the profile
    report_path: Path
    onnx_path: Path
    artifact_path: Path


def demo(model: str | None = None, target: str = "host", out: str | Path = "edgekit-demo",
         warmup: int = 10, repeat: int = 100, duration: float | str | None = None,
         threads: int | None = None, progress: Progress = _quiet,
         stage: Progress = _quiet) -> DemoResult:
    """Export -> compile (verified) -> profile against onnxruntime and torch, end to end, for
    a built-in graph (default ``DEFAULT_GRAPH``). Writes OUT/MODEL.onnx, OUT/MODEL.edgekit
    and OUT/report.json; ``stage`` hears one line as each of the three steps starts."""
    import json

    name = model or DEFAULT_GRAPH
    out = Path(out)
    onnx_path, art = out / f"{name}.onnx", out / f"{name}.edgekit"
    stage(f"[1/3] export {name} -> {onnx_path}")
    exported = export(name, onnx_path, progress=progress)
    stage(f"[2/3] compile for {target} -> {art} (verified against onnxruntime)")
    compiled = compile(onnx_path, target, art, source=exported.source.to_dict(),
                       progress=progress)
    stage("[3/3] profile against onnxruntime and torch")
    progress("profiling")
    result = profile(art, warmup=warmup, repeat=repeat, duration=duration,
                     compare=["ort", "torch"], threads=threads)
    report = {
        "model": name,
        "export_check": [c.to_dict() for c in exported.comparisons],
        "compile_check": compiled.manifest["verification"],
        "profile": result,
    }
    report_path = save_text(json.dumps(report, indent=2) + "\n", out / "report.json")
    return DemoResult(report, report_path, onnx_path, art)


def he_check(model: onnx.ModelProto | str | Path, plain: Iterable[str] = (),
             cut_embeddings: bool | str = False) -> HEReport:
    """Whether only HE-evaluable ops touch encrypted data (each offender named with the
    reason), and the (degree, multiplicative depth) of every ciphertext tensor. ``plain``
    names inputs the server may see in the clear; a file may keep dynamic dims.
    ``cut_embeddings`` (True, or the token-id input's name): check the server's part of a
    transformer exported from its token ids, the embedding lookup moved to the client
    (``edgekit.he.cut``; checked against the original on seeded token ids)."""
    from edgekit.he.check import check, load

    if not isinstance(model, onnx.ModelProto):
        model = load(model)
    cut = None
    if cut_embeddings:
        from edgekit.he.cut import cut_embeddings as cut_lookup

        cut = cut_lookup(model, ids=None if cut_embeddings is True else str(cut_embeddings))
        model = cut.model
    report = check(model, plain)
    report.cut = cut.to_dict() if cut else None
    return report


def he_run(model: onnx.ModelProto | str | Path, inputs: Mapping[str, np.ndarray],
           plain: Iterable[str] = (), scale_bits: int | None = None, packed: bool = False,
           trace: bool = False, cut_embeddings: bool | str = False) -> HERun:
    """Encrypt ``inputs`` (CKKS through TenSEAL; parameters from the depth), evaluate on
    ciphertexts, decrypt, and compare every output with onnxruntime on the same inputs.
    ``packed`` puts the token axis (-2) in the slots; ``trace`` decrypts every intermediate
    result and compares it too (see ``edgekit.he.run``). ``cut_embeddings`` (True, or the
    token-id input's name): ``inputs`` hold token ids; the client looks their embeddings up
    and the server's part, the graph after the lookup, runs encrypted (``edgekit.he.cut``;
    checked against the original on these ids first)."""
    from edgekit.he.run import run_against_ort

    if not isinstance(model, onnx.ModelProto):
        model = intake.load_onnx(model)
    cut = None
    if cut_embeddings:
        from edgekit.he.cut import cut_embeddings as cut_lookup

        cut = cut_lookup(model, [inputs],
                         ids=None if cut_embeddings is True else str(cut_embeddings))
        model, inputs = cut.model, cut.client_inputs(inputs)
    result = run_against_ort(model, inputs, plain, scale_bits, packed, trace)
    result.cut = cut.to_dict() if cut else None
    return result


def list_graphs() -> dict[str, GraphInfo]:
    """The built-in reference models by name; ``DEFAULT_GRAPH`` is the demo's."""
    from edgekit.graphs import available

    return available()


def list_passes() -> dict[str, Pass]:
    """The rewrite passes by name, exact or approximate, with their parameters."""
    from edgekit.passes import available

    return available()


def serve_tracker(host: str = "127.0.0.1", port: int = 9190,
                  announce: Progress = print, secret: str | None = None,
                  warn: Progress | None = None) -> None:
    """Run TVM's RPC tracker until interrupted: devices register with it, profiles ask it
    for a device by key. ``port`` is the first of 11 ports tried. With ``secret`` (default
    ``$EDGEKIT_FARM_SECRET``) only holders of it may list, lease or register devices;
    ``warn`` gets the warning about a non-loopback ``host`` (default: stderr)."""
    from edgekit.devices import farm

    farm.serve_tracker(host, port, announce=announce, secret=secret,
                       **({"warn": warn} if warn else {}))


def serve_device(key: str, tracker: str = "127.0.0.1:9190", host: str = "127.0.0.1",
                 port: int = 9090, announce: Progress = print, secret: str | None = None,
                 warn: Progress | None = None) -> None:
    """Serve this machine as a device (TVM's RPC server) registered with ``tracker``
    (HOST:PORT) under ``key``, until interrupted. It runs uploaded code: with ``secret``
    (default ``$EDGEKIT_FARM_SECRET``) only for clients that prove they hold it; ``warn``
    gets the warning about a non-loopback ``host`` (default: stderr)."""
    from edgekit.devices import farm

    farm.serve_device(key, tracker, host, port, announce=announce, secret=secret,
                      **({"warn": warn} if warn else {}))


def list_devices(tracker: str = "127.0.0.1:9190",
                 secret: str | None = None) -> list[dict[str, Any]]:
    """The devices registered with ``tracker`` by key: free, pending, total, addresses
    (``secret`` defaults to ``$EDGEKIT_FARM_SECRET``)."""
    from edgekit.devices import farm

    return farm.list_devices(tracker, secret)


@dataclass
class RunnerBuild:
    binary: Path
    libraries: list[Path]  # the TVM runtime libraries it loads: copy them to the device too


def build_runner(arch: str = "host", out: str | Path | None = None) -> RunnerBuild:
    """Build (or reuse from ``~/.cache/edgekit``) edgekit-runner, the C++ binary that runs
    artifacts on a device, for ``arch`` ("host" or "aarch64"); copied to ``out`` if given."""
    import shutil

    from edgekit.devices import toolchain

    binary, rt = toolchain.build_runner(arch)
    if out is not None:
        with replacing(out) as tmp:
            shutil.copy2(binary, tmp)
        binary = Path(out)
    libraries = [d / lib for d in rt.lib_dirs for lib in ("libtvm_runtime.so", "libtvm_ffi.so")
                 if (d / lib).is_file()]
    return RunnerBuild(binary, libraries)
