"""The Python API. The CLI is a thin layer over these functions.

    export()  MODEL spec -> checked single-file ONNX
    rewrite() ONNX -> checked passes -> ONNX + ledger
    compile() ONNX -> (passes) -> TVM library, verified against onnxruntime -> artifact
    profile() artifact -> latency statistics (+ onnxruntime / torch baselines)
    run()     artifact + inputs -> outputs
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgekit import intake, verify
from edgekit.errors import EdgekitError
from edgekit.verify import Comparison, TensorSpec

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


def export(
    spec: str,
    out: str | Path | None = None,
    inputs: Sequence[TensorSpec] = (),
    weights: str | Path | None = None,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    progress: Progress = _quiet,
) -> ExportResult:
    """Export a built-in graph or ``file.py:factory`` to ONNX (or check an ``.onnx`` file).
    Writes ``out`` only when onnxruntime matches torch within ``atol + rtol * max|ref|``."""
    from edgekit.export import check_against_torch, export_module, save_onnx

    if intake.is_onnx_spec(spec):
        if weights is not None:
            raise EdgekitError("--weights applies to torch models, not to ONNX files")
        progress(f"checking {spec}")
        model = intake.load_onnx(spec, inputs)
        result = ExportResult(model, verify.onnx_input_specs(model, inputs),
                              intake.Source("onnx", str(Path(spec).resolve())))
    else:
        progress(f"building {spec}")
        tm = intake.load_torch(spec, inputs, weights)
        progress("exporting with torch.onnx (dynamo)")
        model = export_module(tm.module, tm.specs)
        progress("checking onnxruntime against torch")
        comparisons = check_against_torch(tm.module, model, tm.specs, atol, rtol)
        if not all(c.ok for c in comparisons):
            raise EdgekitError("exported ONNX differs from torch beyond tolerance "
                               f"(atol {atol:g}, rtol {rtol:g}): "
                               f"{verify.describe_failures(comparisons)}")
        result = ExportResult(model, tm.specs, tm.source, comparisons)
        intake.set_source(result.model, tm.source)
    if out is not None:
        save_onnx(result.model, out)
    return result


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

    def ledger_dicts(self) -> list[dict[str, Any]]:
        return [run.to_dict() for run in self.ledger]


def rewrite(
    model: onnx.ModelProto,
    passes: str,
    inputs: Sequence[TensorSpec] = (),
    calibration: Mapping[str, np.ndarray] | None = None,
    progress: Progress = _quiet,
) -> RewriteResult:
    """Apply ``passes`` ("a,b:key=value,...") in order, each checked; failed ones roll back."""
    from edgekit.passes import available
    from edgekit.passes.core import load_samples, parse_pass_list, run_pipeline

    plan = parse_pass_list(passes, available())
    samples = load_samples(model, inputs, calibration)
    return RewriteResult(*run_pipeline(model, plan, samples, progress))


def load_calibration(path: str | Path) -> dict[str, np.ndarray]:
    """Read a ``.npz`` of calibration inputs (safely: no pickled objects)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise EdgekitError(f"calibration file not found: {path}") from None
    except (ValueError, OSError, EOFError) as exc:
        # np.load reports a non-archive as "pickled data"; say what was expected instead
        raise EdgekitError(f"cannot read calibration data {path}: not an .npz archive of "
                           f"arrays ({type(exc).__name__})") from None


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
) -> CompileResult:
    """Compile an ONNX file for ``target`` into an artifact directory ``out``.

    For targets that run on this machine the compiled library is run against onnxruntime on
    seeded inputs; if any output differs beyond tolerance nothing is written.
    CPU targets: ``tune`` runs MetaSchedule first (``trials`` / ``tune_minutes`` budget);
    records in the tuning database (``tuning_db``, default per target under the user's
    cache) are applied whether or not this call tunes (see ``edgekit.tune``)."""
    from edgekit import artifact, runtime
    from edgekit import compile as tvm_compile
    from edgekit.targets import load_target

    tgt = load_target(target)
    model = intake.load_onnx(onnx_path, inputs)
    streaming = _streaming_manifest(model)  # step graphs from `export --streaming`
    specs = verify.onnx_input_specs(model, inputs)
    source_hash = runtime.sha256_file(Path(onnx_path))
    ledger: list[dict[str, Any]] = []
    if passes:
        rewritten = rewrite(model, passes, inputs, calibration, progress)
        model, ledger = rewritten.model, rewritten.ledger_dicts()
    tgt.find_cross_compiler()  # fail before the long compile when the toolchain is missing
    progress("importing into TVM Relax")
    mod = tvm_compile.to_relax(model, specs)
    progress(f"compiling for {tgt.name}")
    from edgekit.tune import TuningRequest

    tuning: dict[str, Any] = {}
    executable = tvm_compile.build(
        mod, tgt, TuningRequest(
            tune or trials is not None or tune_minutes is not None, trials, tune_minutes,
            tuning_db), progress, tuning)
    out = Path(out)
    outputs = _output_specs(model)
    with artifact.staging(out) as tmp:
        progress("linking")
        tvm_compile.export_library(executable, tgt, tmp / artifact.LIBRARY)
        (tmp / artifact.ONNX_FILE).write_bytes(model.SerializeToString())
        check: dict[str, Any] = {"against": "onnxruntime", "atol": atol, "rtol": rtol}
        if tgt.runs_on_host:
            progress("verifying against onnxruntime")
            comparisons = _verify_library(tmp, model, specs, outputs, tgt, atol, rtol)
            check["outputs"] = [c.to_dict() for c in comparisons]
            if not all(c.ok for c in comparisons):
                raise EdgekitError(
                    f"compiled model differs from onnxruntime beyond tolerance (atol {atol:g}, "
                    f"rtol {rtol:g}): {verify.describe_failures(comparisons)}; nothing written")
        else:
            check["skipped"] = f"target {tgt.name} does not run on this machine"
        manifest = artifact.publish(tmp, out, {
            "target": {**tgt.to_dict(), "machine": tgt.machine},
            "inputs": [s.to_dict() for s in specs],
            "outputs": [s.to_dict() for s in outputs],
            "source": {**(source or intake.get_source(model) or
                          {"kind": "onnx", "spec": str(Path(onnx_path).resolve())}),
                       "onnx_sha256": source_hash},
            "verification": check,
            "passes": ledger,
            "tuning": tuning or None,
            **streaming,
        })
    return CompileResult(out, manifest)


def _streaming_manifest(model: onnx.ModelProto) -> dict[str, Any]:
    """``{"streaming": {...}}`` (state names, shapes, initial values, delay) for a step graph
    written by ``export_streaming``; ``{}`` for ordinary models."""
    from edgekit.streaming.export import read_metadata

    data = read_metadata(model)
    return {} if data is None else {"streaming": data}


def _output_specs(model: onnx.ModelProto) -> list[TensorSpec]:
    inferred = onnx.shape_inference.infer_shapes(model)
    out = []
    for o in inferred.graph.output:
        t = o.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
        out.append(TensorSpec(o.name, shape, verify._ONNX_TO_NUMPY.get(t.elem_type, "unknown")))
    return out


def _verify_library(tmp: Path, model, specs, outputs, tgt, atol, rtol) -> list[Comparison]:
    import tvm
    from tvm import relax

    from edgekit.artifact import LIBRARY

    inputs = verify.seeded_inputs(specs, seed=0)
    ref = verify.run_ort(model, inputs)
    device = tvm.cuda() if tgt.device == "cuda" else tvm.cpu()
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(tmp / LIBRARY)), device)
    result = vm["main"](*(tvm.runtime.tensor(a, device) for a in inputs.values()))
    got = [result.numpy()] if hasattr(result, "numpy") else [t.numpy() for t in result]
    return verify.compare([o.name for o in outputs], got, ref, atol, rtol)


def run(artifact_path: str | Path, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Load an artifact and run it once."""
    from edgekit import runtime

    try:
        return runtime.load(artifact_path).run(dict(inputs))
    except (runtime.ArtifactError, ValueError) as exc:
        raise EdgekitError(str(exc)) from None


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
    """See ``edgekit.profile.profile_artifact``; ``runner`` ("native", "qemu") or ``tracker``
    + ``key`` profile on a device instead (``edgekit.devices.profile_on_device``)."""
    from edgekit import runtime
    from edgekit.profile import profile_artifact

    if runner or tracker or key:
        from edgekit.devices import profile_on_device

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
