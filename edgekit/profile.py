"""Latency of an artifact on this machine, with onnxruntime and torch measured alongside.

All engines run in this process, on the same inputs, with the same thread count, one after
the other: warm-up calls, then timed calls until ``repeat`` calls or ``duration`` seconds.
The first call after loading is timed apart (it includes lazy initialisation).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from edgekit.errors import EdgekitError

ENGINES = ("ort", "torch")


def stats(times_ms: Sequence[float]) -> dict[str, float]:
    """min, mean, median, p90, p95, p99, max, std and CV (std/mean) of latencies in ms."""
    t = np.asarray(times_ms, dtype=np.float64)
    mean = float(t.mean())
    std = float(t.std(ddof=1)) if t.size > 1 else 0.0
    return {
        "min": float(t.min()),
        "mean": mean,
        "median": float(np.median(t)),
        "p90": float(np.percentile(t, 90)),
        "p95": float(np.percentile(t, 95)),
        "p99": float(np.percentile(t, 99)),
        "max": float(t.max()),
        "std": std,
        "cv": std / mean if mean > 0 else 0.0,
    }


def time_calls(fn: Callable[[], object], warmup: int, repeat: int,
               duration: float | None = None) -> list[float]:
    """Per-call latencies in ms after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    deadline = time.perf_counter() + duration if duration else None
    while (len(times) < repeat) if deadline is None else (time.perf_counter() < deadline):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    if not times:
        raise EdgekitError("no timed run completed; increase --repeat or --duration")
    return times


def set_threads(threads: int) -> int:
    """Use ``threads`` TVM worker threads (env var for a fresh runtime, pool reset otherwise)."""
    os.environ["TVM_NUM_THREADS"] = str(threads)
    import tvm

    tvm.get_global_func("runtime.config_threadpool")(1, threads)
    return threads


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
    from edgekit import runtime
    from edgekit.artifact import ONNX_FILE
    from edgekit.report.record import finalize, measure
    from edgekit.verify import TensorSpec, seeded_inputs

    unknown = set(compare) - set(ENGINES)
    if unknown:
        raise EdgekitError(f"unknown engine {sorted(unknown)[0]!r} for --compare "
                           f"(choose from {', '.join(ENGINES)})")
    threads = threads or os.cpu_count() or 1
    set_threads(threads)
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
    result["latency_ms"] = stats(times)
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
        baselines[engine] = stats(all_times[engine])
    if baselines:
        result["baselines"] = baselines
        result["ratios"] = {k: result["latency_ms"]["median"] / v["median"]
                            for k, v in baselines.items()}
    result["notes"] = notes
    return finalize(result, all_times, all_steady, model.manifest, warmup)
