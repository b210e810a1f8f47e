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


def torch_runner(source: dict, inputs: dict[str, np.ndarray], threads: int):
    """Rebuild the source module from the manifest; None when it cannot be rebuilt."""
    import torch

    from edgekit.intake import load_torch

    kind = source.get("kind")
    if kind not in ("graph", "python"):
        return None, "source is an ONNX file"
    spec = source["spec"]
    if kind == "python" and not Path(spec.rsplit(":", 1)[0]).is_file():
        return None, f"source file {spec.rsplit(':', 1)[0]} is gone"
    module = load_torch(spec, weights=source.get("weights")).module
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
) -> dict:
    """Measure an artifact (and baselines); returns the JSON-ready result, in the schema of
    ``edgekit.report.schema`` (``duration="auto"``: until the median's CI is tight)."""
    from edgekit.verify import TensorSpec, seeded_inputs

    unknown = set(compare) - set(ENGINES)
    if unknown:
        raise EdgekitError(f"unknown engine {sorted(unknown)[0]!r} for --compare "
                           f"(choose from {', '.join(ENGINES)})")
    threads = threads or os.cpu_count() or 1
    runtime.set_threads(threads)
    t0 = time.perf_counter()
    model = runtime.load(path)
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
            fn, why = torch_runner(model.manifest.get("source", {}), inputs, threads)
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
