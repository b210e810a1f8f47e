"""Latency of an artifact on this machine, with onnxruntime and torch measured alongside.

All engines run in this process, on the same inputs, with the same thread count, one after
the other: warm-up calls, then timed calls until ``repeat`` calls or ``duration`` seconds
(the loop and its statistics: ``edgekit.report.stats``). The first call after loading is timed
apart (it includes lazy initialisation).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgekit import runtime
from edgekit.artifact import ONNX_FILE
from edgekit.errors import EdgekitError
from edgekit.report.record import finalize, measure
from edgekit.report.stats import latency_stats

ENGINES = ("ort", "torch")


def ort_runner(onnx_path: Path, inputs: dict[str, np.ndarray], threads: int):
    from edgekit.verify import ort_session

    sess = ort_session(str(onnx_path), threads=threads)
    return lambda: sess.run(None, inputs)


def _torch_spec(source: dict, user_source: str | None) -> tuple[str | None, str]:
    """Which model spec the torch baseline may build, or (None, why not). Code is imported
    only from a file the user names (``user_source``): a manifest is data, and a ``.py`` it
    names may have changed or be anyone's."""
    from edgekit import graphs

    if user_source:
        return user_source, ""
    kind, spec = source.get("kind"), source.get("spec")
    if kind == "graph" and spec in graphs.available():
        return spec, ""
    if kind == "python":
        return None, (f"the artifact was compiled from {spec}; edgekit imports no code an "
                      "artifact names: pass --source FILE.py:factory to time torch")
    what = "an ONNX file" if kind == "onnx" else f"not a known built-in graph ({spec!r})"
    return None, f"source is {what} (pass --source FILE.py:factory to time torch)"


def torch_runner(source: dict, inputs: dict[str, np.ndarray], threads: int,
                 specs: Sequence = (), user_source: str | None = None):
    """Build the source module (a built-in graph, or the user's ``--source``) with the
    artifact's input shapes; (None, why) when it cannot be built."""
    import torch

    from edgekit.intake import load_torch

    spec, why = _torch_spec(source, user_source)
    if spec is None:
        return None, why
    if ":" in spec and not Path(spec.rsplit(":", 1)[0]).is_file():
        return None, f"source file {spec.rsplit(':', 1)[0]} is not found"
    file, _, factory = spec.rpartition(":")
    same = not user_source or f"{Path(file).resolve()}:{factory}" == source.get("spec")
    weights = source.get("weights") if same else None  # the manifest's, for its own model
    module = load_torch(spec, specs, weights=weights).module
    torch.set_num_threads(threads)
    args = tuple(torch.from_numpy(a) for a in inputs.values())

    def call() -> None:
        with torch.inference_mode():
            module(*args)

    return call, ""


def profile_artifact(
    path: str | Path,
    warmup: int = 10,
    repeat: int = 100,
    duration: float | str | None = None,
    compare: Sequence[str] = (),
    threads: int | None = None,
    seed: int = 0,
    source: str | None = None,
    sha256: str | None = None,
) -> dict:
    """Measure an artifact (and baselines); returns the JSON-ready result, in the schema of
    ``edgekit.report.schema`` (``duration="auto"``: until the median's CI is tight).
    ``source``: ``FILE.py:factory`` for the torch baseline (a manifest's own is never
    imported); ``sha256``: the artifact digest to insist on (``edgekit verify``)."""
    from edgekit.verify import TensorSpec, seeded_inputs

    unknown = set(compare) - set(ENGINES)
    if unknown:
        raise EdgekitError(f"unknown engine {sorted(unknown)[0]!r} for --compare "
                           f"(choose from {', '.join(ENGINES)})")
    threads = threads or os.cpu_count() or 1
    runtime.set_threads(threads)
    t0 = time.perf_counter()
    model = runtime.load(path, sha256=sha256)
    load_ms = (time.perf_counter() - t0) * 1e3
    specs = [TensorSpec.from_dict(i) for i in model.inputs]
    inputs = seeded_inputs(specs, seed)
    call = model.prepare(inputs)
    t0 = time.perf_counter()
    call()
    first_ms = (time.perf_counter() - t0) * 1e3
    result: dict = {
        "artifact": str(path),
        "target": model.manifest["target"]["name"],
        "threads": threads,
        "load_ms": load_ms,
        "first_run_ms": first_ms,
    }
    times, steady = measure(call, warmup, repeat, duration)
    all_times, all_steady = {"edgekit": times}, {"edgekit": steady}
    result["iterations"] = len(times)
    result["latency_ms"] = latency_stats(times)
    notes = []
    baselines = {}
    for engine in compare:
        if engine == "ort":
            fn = ort_runner(Path(path) / ONNX_FILE, inputs, threads)
        else:
            fn, why = torch_runner(model.manifest.get("source") or {}, inputs, threads, specs,
                                   source)
            if fn is None:
                notes.append(f"torch baseline skipped: {why}")
                continue
        fn()
        all_times[engine], all_steady[engine] = measure(fn, warmup, repeat, duration)
        baselines[engine] = latency_stats(all_times[engine])
    if baselines:
        result["baselines"] = baselines
        result["ratios"] = {k: result["latency_ms"]["median"] / v["median"]
                            for k, v in baselines.items()}
    result["notes"] = notes
    return finalize(result, all_times, all_steady, model.manifest, warmup)
