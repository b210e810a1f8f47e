"""Latency of an artifact on this machine, with onnxruntime and torch measured alongside.

All engines run in this process, on the same inputs, with the same thread count, one after
the other: warm-up calls, then timed calls until ``repeat`` calls or ``duration`` seconds
(the loop and its statistics: ``edgekit.report.stats``). The first call after loading is timed
apart (it includes lazy initialisation).

Inputs: seeded ones of the manifest's shapes, or the user's arrays (``inputs``). An artifact
with symbolic dims (``edgekit.shapes``) is timed at ``lengths`` (a sweep of its one symbolic
dim, each length with every engine, one row per length in ``lengths``), at the user's arrays'
lengths, or else at its upper bounds (its slowest call, said in the notes); the run's
top-level latency is that of the longest length.

Memory (``profile_memory``, on by default): the artifact's size on disk, and each engine's
resident-memory growth over loading and over its first ``MEMORY_RUNS`` calls, every engine in a
fresh child process with the same inputs and thread count (definitions:
``edgekit.report.memory``), plus the bytes the edgekit VM's static memory plan allocates per
call (``planned_workspace``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from edgekit import runtime, shapes
from edgekit.artifact import ONNX_FILE
from edgekit.errors import EdgekitError
from edgekit.report import memory as mem
from edgekit.report.record import finalize, measure
from edgekit.report.stats import latency_stats

ENGINES = ("ort", "torch")
MEMORY_RUNS = 3  # calls after loading whose peak RSS counts as the memory to run
_MEMORY_CHILD = "from edgekit.profile import memory_child; memory_child()"


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
    memory: bool = True,
    inputs: Mapping[str, np.ndarray] | None = None,
    lengths: Sequence[int] = (),
) -> dict:
    """Measure an artifact (and baselines); returns the JSON-ready result, in the schema of
    ``edgekit.report.schema`` (``duration="auto"``: until the median's CI is tight).
    ``source``: ``FILE.py:factory`` for the torch baseline (a manifest's own is never
    imported); ``sha256``: the artifact digest to insist on (``edgekit verify``);
    ``memory``: also measure memory (``profile_memory``; a few seconds per engine);
    ``inputs``: the arrays to time on (default: seeded); ``lengths``: a sweep of a symbolic
    artifact's one symbolic dim (one row per length; see the module docstring)."""
    unknown = set(compare) - set(ENGINES)
    if unknown:
        raise EdgekitError(f"unknown engine {sorted(unknown)[0]!r} for --compare "
                           f"(choose from {', '.join(ENGINES)})")
    threads = threads or os.cpu_count() or 1
    runtime.set_threads(threads)
    t0 = time.perf_counter()
    model = runtime.load(path, sha256=sha256)
    load_ms = (time.perf_counter() - t0) * 1e3
    notes: list[str] = []
    points = _points(model, inputs, lengths, seed, notes)
    main_point, main_inputs = points[-1]  # the longest: the run's top-level latency
    call = model.prepare(main_inputs)
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
    rows = []
    for point, arrays in points:
        times, steady, baselines = _time_engines(model, path, arrays, point, compare, threads,
                                                 (warmup, repeat, duration), source, notes)
        rows.append({"lengths": point, "latency_ms": latency_stats(times["edgekit"]),
                     "baselines": {k: latency_stats(v) for k, v in times.items()
                                   if k != "edgekit"}})
    all_times, all_steady = times, steady  # the last point's: the longest
    result["iterations"] = len(all_times["edgekit"])
    result["latency_ms"] = latency_stats(all_times["edgekit"])
    if baselines:
        result["baselines"] = baselines
        result["ratios"] = {k: result["latency_ms"]["median"] / v["median"]
                            for k, v in baselines.items()}
    if main_point:
        result["lengths"] = [{**r, "ratios": {k: r["latency_ms"]["median"] / v["median"]
                                              for k, v in r["baselines"].items()}}
                             for r in rows]
    if memory:
        result["memory"] = profile_memory(path, list(baselines), threads, seed, source,
                                          sha256, notes, main_point)
    result["notes"] = notes
    return finalize(result, all_times, all_steady, model.manifest, warmup)


def _points(model: runtime.CompiledModel, inputs: Mapping[str, np.ndarray] | None,
            lengths: Sequence[int], seed: int, notes: list[str]
            ) -> list[tuple[dict[str, int], dict[str, np.ndarray]]]:
    """(lengths, input arrays) to time, shortest first: the user's arrays, a sweep of the
    one symbolic dim, or seeded inputs (a symbolic artifact's at its upper bounds)."""
    from edgekit.verify import TensorSpec, seeded_inputs

    specs = [TensorSpec.from_dict(i) for i in model.inputs]
    declared = {s.name: s.shape for s in specs}
    if inputs is not None:
        if lengths:
            raise EdgekitError("give either input files or --lengths, not both")
        try:
            model.prepare(dict(inputs))  # names, ranks, dtypes, lengths: one-line errors
        except ValueError as exc:
            raise EdgekitError(str(exc)) from None
        point = shapes.bind(declared, {k: np.shape(inputs[k]) for k in declared}, model.dims)
        return [(point, dict(inputs))]
    if lengths:
        if len(model.dims) != 1:
            raise EdgekitError(
                "--lengths sweeps an artifact with one symbolic dim; this one has "
                + (f"{len(model.dims)} ({shapes.format_bounds(model.dims)}): give input "
                   "files instead" if model.dims else "static inputs"))
        (name, (lo, hi)), = model.dims.items()
        bad = [n for n in lengths if not lo <= n <= hi]
        if bad:
            raise EdgekitError(f"--lengths {bad[0]}: outside the bounds of {name!r}, "
                               f"{lo}..{hi}")
        return [({name: n}, seeded_inputs(shapes.concrete(specs, {name: n}), seed))
                for n in sorted(set(lengths))]
    point = {k: hi for k, (lo, hi) in model.dims.items()}
    if point:
        notes.append(f"timed at the upper bounds ({shapes.format_point(point)}); --lengths or "
                     "--input NAME=FILE.npy time other lengths")
    return [(point, seeded_inputs(shapes.concrete(specs, point), seed))]


def _time_engines(model: runtime.CompiledModel, path: str | Path,
                  inputs: dict[str, np.ndarray], point: dict[str, int],
                  compare: Sequence[str], threads: int, loop: tuple, source: str | None,
                  notes: list[str]) -> tuple[dict, dict, dict]:
    """Edgekit then each baseline on ``inputs``: (times, steady phases, baseline stats)."""
    from edgekit.verify import TensorSpec

    warmup, repeat, duration = loop
    times, steady = {}, {}
    times["edgekit"], steady["edgekit"] = measure(model.prepare(inputs), warmup, repeat,
                                                  duration)
    baselines = {}
    for engine in compare:
        if engine == "ort":
            fn = ort_runner(Path(path) / ONNX_FILE, inputs, threads)
        else:
            specs = shapes.concrete([TensorSpec.from_dict(i) for i in model.inputs], point)
            fn, why = torch_runner(model.manifest.get("source") or {}, inputs, threads, specs,
                                   source)
            if fn is None:
                if f"torch baseline skipped: {why}" not in notes:
                    notes.append(f"torch baseline skipped: {why}")
                continue
        fn()
        times[engine], steady[engine] = measure(fn, warmup, repeat, duration)
        baselines[engine] = latency_stats(times[engine])
    return times, steady, baselines


def profile_memory(path: str | Path, engines: Sequence[str], threads: int, seed: int = 0,
                   source: str | None = None, sha256: str | None = None,
                   notes: list[str] | None = None,
                   lengths: Mapping[str, int] | None = None) -> dict:
    """The run's ``memory`` object: artifact sizes, per-engine RSS growth (edgekit and
    ``engines``, each in a fresh child process) and the planned workspace. What could not be
    measured is left out and said in ``notes``."""
    notes = notes if notes is not None else []
    out: dict = {"artifact": mem.artifact_sizes(path, runtime.LIBRARY), "runs": MEMORY_RUNS,
                 "engines": {}, "planned_workspace": None}
    why = mem.unavailable()
    if why:
        notes.append(f"memory not measured: {why}")
        return out
    for engine in ("edgekit", *engines):
        spec = {"artifact": str(Path(path).resolve()), "engine": engine, "threads": threads,
                "seed": seed, "source": source, "sha256": sha256, "runs": MEMORY_RUNS,
                "lengths": dict(lengths or {})}
        got, why = mem.run_child(_MEMORY_CHILD, spec)
        if got is None:
            notes.append(f"memory of {engine} not measured: {why}")
            continue
        workspace = got.pop("planned_workspace", None)
        if workspace is not None:
            out["planned_workspace"] = workspace
        out["engines"][engine] = got
    return out


def _memory_loader(engine: str, path: Path, inputs: dict[str, np.ndarray], threads: int,
                   spec: dict):
    """The child's ``load`` for one engine, after importing that engine's library (and
    starting TVM's thread pool), so the library's own memory counts for no model."""
    from edgekit.verify import TensorSpec

    if engine == "edgekit":
        runtime.set_threads(threads)

        def load():
            return runtime.load(path, sha256=spec["sha256"]).prepare(inputs)
    elif engine == "ort":
        import onnxruntime  # noqa: F401

        def load():
            return ort_runner(path / ONNX_FILE, inputs, threads)
    else:
        import torch

        import edgekit.intake  # noqa: F401
        torch.set_num_threads(threads)
        manifest = runtime.read_manifest(path, check_hashes=False)
        specs = shapes.concrete([TensorSpec.from_dict(i) for i in manifest["inputs"]],
                                spec.get("lengths") or {})

        def load():
            fn, why = torch_runner(manifest.get("source") or {}, inputs, threads, specs,
                                   spec["source"])
            if fn is None:
                raise EdgekitError(why)
            return fn
    return load


def memory_child() -> None:
    """One engine's memory measurement, in a fresh interpreter started by
    ``profile_memory`` (spec as JSON on stdin; result printed by ``mem.emit``)."""
    from edgekit.verify import TensorSpec, seeded_inputs

    spec = json.loads(sys.stdin.read())
    path, engine, threads = Path(spec["artifact"]), spec["engine"], spec["threads"]
    manifest = runtime.read_manifest(path, check_hashes=False)
    inputs = seeded_inputs(shapes.concrete([TensorSpec.from_dict(i) for i in manifest["inputs"]],
                                           spec.get("lengths") or {}), spec["seed"])
    result: dict = mem.measure_engine(
        _memory_loader(engine, path, inputs, threads, spec), spec["runs"])
    if engine == "edgekit":  # after the RSS readings: a second load of the artifact
        result["planned_workspace"] = planned_workspace(path, inputs, spec["sha256"])
    mem.emit(result)


def planned_workspace(path: Path, inputs: dict[str, np.ndarray],
                      sha256: str | None = None) -> dict:
    """What the VM's static memory plan allocates in one call: ``relax.transform.
    StaticPlanBlockMemory`` turns the tensors of known size into storages that tensors share,
    lowered to ``vm.builtin.alloc_storage(vm, (bytes,), device, dtype, scope)`` calls, which
    the VM's ``set_instrument`` hook sees (the model's outputs are among them). TVM exposes no
    plan summary at run time, so the calls of one run are summed."""
    model = runtime.load(path, sha256=sha256)
    call = model.prepare(inputs)
    sizes: list[int] = []

    def instrument(func, name, before_run, ret, *fargs) -> int:
        if before_run and str(name) == "vm.builtin.alloc_storage":
            sizes.append(int(np.prod(list(fargs[1]))) * _itemsize(str(fargs[3])))
        return 0  # VMInstrumentReturnKind.NO_OP (tvm.runtime.vm, not imported: seconds)

    # the runtime's own VM: relax.VirtualMachine would import TVM's compiler (15 s start-up)
    vm = model._vm  # noqa: SLF001
    vm["set_instrument"](instrument)
    try:
        call()
    finally:
        vm["set_instrument"](None)
    return {"bytes": sum(sizes), "storages": len(sizes)}


def _itemsize(dtype: str) -> int:
    try:
        return np.dtype(dtype).itemsize
    except TypeError:  # TVM-only types (bfloat16, float8_*): bits after the letters
        digits = "".join(c for c in dtype.split("_")[0] if c.isdigit())
        return max(1, int(digits or 8) // 8)
