"""Load and run an edgekit artifact. Apps embed this module: it needs numpy and TVM's runtime
(the ``apache-tvm`` and ``apache-tvm-ffi`` wheels), nothing else from edgekit or beyond.

An artifact is a directory ``NAME.edgekit/`` holding ``manifest.json``, the compiled
library ``model.so`` and the ONNX model it was compiled from. ``load`` refuses an artifact
whose files do not match the sha256 digests in its manifest. An artifact with symbolic inputs
(names in the manifest's input shapes, bounds in its ``dims``) runs any length inside the
bounds; ``run`` binds the arrays' shapes to the names first (``edgekit.shapes.bind``), so a
wrong rank, dtype or a length outside the bounds is one ``ValueError`` naming the dim.

"TVM's runtime" means ``libtvm_runtime.so`` driven through ``tvm_ffi``: this module never
imports the ``tvm`` package, whose ``__init__`` loads the compiler library
(``libtvm_compiler.so``, LLVM inside) and imports Relax and its frontends, seconds of start-up
an app does not need. It loads the runtime library itself and calls the functions that
library registers (the Relax VM's ``vm_load_executable`` / ``vm_initialization``, the
``runtime.TVMTensor*`` copies). The same process may import the full ``tvm`` before or after:
both load the same library file, which the dynamic loader maps once.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
import mmap
import os
import platform
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgekit import shapes
from edgekit.errors import EdgekitError
from edgekit.hashed_library import (
    Image,
    cuda_available,
    func,
    load_library,
    read_hashed,
    read_nofollow,
    runtime_ffi,
)
from edgekit.manifest import (
    LIBRARY,
    MANIFEST,
    ArtifactError,
    elf_problem,
    is_int,
    manifest_problems,
    memory_problem,
    sha256_file,
)

_POOLED_ALLOCATOR = 2  # the Relax VM's allocator kinds: 1 naive, 2 pooled (what tvm uses)


class RangeWarning(UserWarning):
    """An input left the range the model's approximate (fitted) passes were calibrated on."""


def _check(root: Path, sha256: str | None, check_hashes: bool) -> tuple[dict, Image | None]:
    """The validated manifest and (with ``check_hashes``) the library's bytes, hashed."""
    if not root.is_dir():
        raise ArtifactError(f"{root} is not an edgekit artifact directory")
    try:
        raw = read_nofollow(root / MANIFEST)
    except FileNotFoundError:
        raise ArtifactError(f"{root} has no {MANIFEST}: not an edgekit artifact") from None
    except OSError as exc:
        raise ArtifactError(f"{root / MANIFEST} cannot be read (a symlink is refused): "
                            f"{exc.strerror or exc}") from None
    digest = hashlib.sha256(raw).hexdigest()
    if sha256 is not None and digest != sha256.strip().lower():
        raise ArtifactError(f"{root}: artifact digest {digest} is not the pinned {sha256} "
                            "(a different or modified artifact)")
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{root / MANIFEST} is not valid JSON: {exc}") from None
    problems = manifest_problems(manifest)
    if problems:
        raise ArtifactError(f"{root / MANIFEST} is malformed: {'; '.join(problems)}")
    if not check_hashes:
        return manifest, None
    files = manifest["files"]
    present = set()
    for entry in os.scandir(root):
        if entry.is_symlink() or not entry.is_file(follow_symlinks=False):
            raise ArtifactError(f"{root}: {entry.name} is a symlink or not a regular file; "
                                "an artifact holds only the files its manifest lists")
        present.add(entry.name)
    unlisted = sorted(present - set(files) - {MANIFEST})
    if unlisted:
        raise ArtifactError(f"{root}: {unlisted[0]} is not listed in the manifest "
                            "(added or tampered with)")
    library = None
    for name, want in files.items():
        if name not in present:
            raise ArtifactError(f"artifact file {name} is missing")
        data, got = read_hashed(root / name) if name == LIBRARY else (None, sha256_file(
            root / name))
        if got != want:
            raise ArtifactError(f"artifact file {name} does not match its sha256 in the "
                                "manifest (modified or corrupted)")
        library = data if data is not None else library
    problem = elf_problem(library, manifest["target"].get("machine"))
    if problem:
        raise ArtifactError(f"{root / LIBRARY} {problem}")
    return manifest, library


def manifest_digest(path: str | Path) -> str:
    """The sha256 of ``manifest.json``: it lists every file's sha256, so it pins the whole
    artifact (``edgekit verify`` prints it; ``load(path, sha256=...)`` checks it)."""
    try:
        return hashlib.sha256(read_nofollow(Path(path) / MANIFEST)).hexdigest()
    except OSError as exc:
        raise ArtifactError(f"{path} has no readable {MANIFEST}: {exc.strerror or exc}") from None


def read_artifact(path: str | Path, sha256: str | None = None) -> tuple[dict[str, Any], bytes]:
    """The validated manifest and the bytes of ``model.so`` that were hashed, with every check
    ``load`` makes before loading. What runs the library elsewhere (per-op timing, the
    device runner, a remote device) runs these bytes (``library_file``), never a second read
    of the path, which may have changed since the check."""
    manifest, library = _check(Path(path), sha256, True)
    assert library is not None  # check_hashes=True always returns the library
    if isinstance(library, mmap.mmap):
        with contextlib.closing(library):
            return manifest, library[:]
    return manifest, library


def read_manifest(path: str | Path, check_hashes: bool = True,
                  sha256: str | None = None) -> dict[str, Any]:
    """Read and validate ``manifest.json``; by default also check that the directory holds
    exactly the listed files (no symlinks), each matching its digest, and that the library
    is a complete ELF file for the target's machine. ``sha256``: the digest the manifest
    must have (see ``manifest_digest``)."""
    return _check(Path(path), sha256, check_hashes)[0]


# TVM's AffinityMode for a pool given a CPU list: workers bound one per CPU of the list (the
# first is the caller's), or every thread free on all of them
_ONE_CORE_PER_THREAD, _SHARE_ALL_CORES = -2, -3


def set_threads(threads: int) -> int:
    """Run on ``threads`` threads: the calling thread and ``threads - 1`` workers of TVM's
    pool (TVM keeps one pool per calling thread; this sets the caller's), at most one per CPU
    the calling thread may use (more would only contend: TVM's workers spin while they wait).
    Returns the count TVM reports it will use.

    Two things TVM 0.27's pool does (``src/runtime/thread_pool.cc``, ``threading_backend.cc``)
    that an app embedding the runtime must not suffer:

    - it binds each worker to one core and the *calling* thread to the first ``threads``
      cores (``SetAffinity``): after ``set_threads(1)`` the app's thread was pinned to core 0,
      and every thread it started later (torch's, onnxruntime's) inherited that one core.
      Here TVM binds nothing unless the app sets ``TVM_BIND_THREADS=1`` (measured on a shared
      2-core machine, docs/runtime.md: pinned workers ran MiniLM 4% faster in one run, 6%
      slower in two), and then binds its workers one per CPU among those the calling thread
      may use; the calling thread's affinity is put back whatever TVM did;
    - the pool's size is fixed when it is created (``TVM_NUM_THREADS`` at that moment), so
      ``set_threads(1)`` then ``set_threads(2)`` ran one thread. The pool is created here with
      room for every CPU this thread may use, and ``threads`` of them are used.

    Pools TVM creates on its own in other threads take ``TVM_NUM_THREADS``, set here too."""
    if not is_int(threads) or threads < 1:
        raise ValueError(f"threads must be an integer >= 1, not {threads!r}")
    os.environ["TVM_NUM_THREADS"] = str(threads)
    bind = os.environ.setdefault("TVM_BIND_THREADS", "0") == "1"  # TVM reads it at each config
    keep = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    cpus = sorted(keep) if keep else list(range(os.cpu_count() or 1))
    mode = _ONE_CORE_PER_THREAD if bind else _SHARE_ALL_CORES
    try:
        func("runtime.config_threadpool")(mode, threads, [str(c) for c in cpus])
    finally:
        if keep is not None:
            os.sched_setaffinity(0, keep)
    return int(func("runtime.NumThreads")())


def _to_device(a: np.ndarray, device: Any) -> Any:
    """A TVM tensor on ``device`` holding a copy of the C-contiguous array ``a``."""
    ffi = runtime_ffi()
    t = func("runtime.TVMTensorAllocWithScope")(ffi.Shape(a.shape), ffi.dtype(str(a.dtype)),
                                                 device, None)
    func("runtime.TVMTensorCopyFromBytes")(t, a.ctypes.data_as(ctypes.c_void_p), a.nbytes)
    return t


def _to_numpy(t: Any) -> np.ndarray:
    """A host copy of a TVM tensor (from any device)."""
    out = np.empty(tuple(t.shape), dtype=np.dtype(str(t.dtype)))
    func("runtime.TVMTensorCopyToBytes")(t, out.ctypes.data_as(ctypes.c_void_p), out.nbytes)
    return out


class CompiledModel:
    """A loaded artifact: ``run(inputs)`` with inputs checked against the manifest."""

    def __init__(self, path: str | Path, manifest: dict[str, Any], library: Image | None = None,
                 warn_ranges: bool = True):
        """``library``: the bytes of ``model.so`` already checked against the manifest (what
        ``load`` passes); without it the artifact is read and checked here. ``warn_ranges``:
        see ``run``."""
        self.path = Path(path)
        self.warn_ranges = warn_ranges
        self._range_warned: set[str] = set()
        if library is None:
            manifest, library = _check(self.path, None, True)
        self.manifest = manifest
        self.inputs: list[dict] = manifest["inputs"]
        self.outputs: list[dict] = manifest["outputs"]
        # bounds of the symbolic input dims ({} for a static artifact): one library serves
        # every length inside them (the manifest's schema checked they cover every name)
        self.dims: dict[str, tuple[int, int]] = {
            k: (int(v[0]), int(v[1])) for k, v in (manifest.get("dims") or {}).items()}
        target = manifest["target"]
        machine = platform.machine()
        if target.get("machine") not in (None, machine):
            raise ArtifactError(
                f"artifact was built for {target.get('name')!r} ({target.get('machine')}); "
                f"this machine is {machine}: run it on the device")
        tvm_ffi = runtime_ffi()
        cuda = target.get("device") == "cuda"
        if cuda:
            if not cuda_available():
                raise ArtifactError(f"artifact was built for {target.get('name')!r} (a CUDA "
                                    "GPU); this machine has no CUDA GPU or driver: run it on "
                                    "the device")
            from edgekit.devices.cuda import register_ptx

            register_ptx(self.path, manifest)  # load the artifact's PTX, not nvcc's output
        self.device = tvm_ffi.device("cuda" if cuda else "cpu", 0)
        problem = elf_problem(library, machine)  # the manifest may name no machine
        if problem:
            raise ArtifactError(f"{self.path / LIBRARY} {problem}")
        self.library = load_library(library)  # the hashed bytes (per-op timing reuses it)
        self._vm = self.library["vm_load_executable"]()
        # (device type, index, allocator) per device; the VM runs shape functions on the CPU
        devices = [self.device, *([tvm_ffi.device("cpu", 0)] if cuda else [])]
        self._vm["vm_initialization"](*(v for d in devices for v in
                                        (d.dlpack_device_type(), d.index, _POOLED_ALLOCATOR)))
        self._main = self._vm["main"]
        self._sync = functools.partial(func("runtime.Device_StreamSync"), self.device, 0)

    def _check(self, args: tuple, kwargs: Mapping[str, Any]) -> list[np.ndarray]:
        names = [i["name"] for i in self.inputs]
        if args and kwargs:
            raise ValueError("give inputs either positionally or by name, not both")
        if len(args) == 1 and isinstance(args[0], Mapping):
            kwargs, args = args[0], ()
        if args:
            if len(args) != len(names):
                raise ValueError(f"expected {len(names)} inputs ({', '.join(names)}), "
                                 f"got {len(args)}")
            kwargs = dict(zip(names, args, strict=True))
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise ValueError(f"unknown input {unknown[0]!r}; expected {', '.join(names)}")
        missing = [i["name"] for i in self.inputs if i["name"] not in kwargs]
        if missing:
            raise ValueError(f"missing input {missing[0]!r}")
        if self.dims:  # any length in the bounds: bind() names the input, dim and bounds
            try:
                shapes.bind({i["name"]: i["shape"] for i in self.inputs},
                            {k: np.shape(v) for k, v in kwargs.items()}, self.dims)
            except EdgekitError as exc:
                raise ValueError(str(exc)) from None
        arrays = []
        for spec in self.inputs:
            name = spec["name"]
            a = np.asarray(kwargs[name])
            if not self.dims and tuple(a.shape) != tuple(spec["shape"]):
                raise ValueError(f"input {name!r}: expected shape {tuple(spec['shape'])}, "
                                 f"got {tuple(a.shape)}")
            if a.dtype != np.dtype(spec["dtype"]):
                raise ValueError(f"input {name!r}: expected dtype {spec['dtype']}, got {a.dtype}")
            high = spec.get("high")  # an index into a table: out of range would read wild memory
            if high and a.size and (a.max() >= high or a.min() < -high):
                raise ValueError(f"input {name!r}: values index a table of {high} rows, got "
                                 f"{a.min()}..{a.max()}")
            arrays.append(np.ascontiguousarray(a))
        return arrays

    def _to_device(self, arrays: list[np.ndarray]) -> list:
        return [_to_device(a, self.device) for a in arrays]

    def _collect(self, result) -> dict[str, np.ndarray]:
        flat = [result] if isinstance(result, runtime_ffi().Tensor) else list(result)
        names = [o["name"] for o in self.outputs]
        return {n: _to_numpy(t) for n, t in zip(names, flat, strict=True)}

    def run(self, *args: Any, **kwargs: Any) -> dict[str, np.ndarray]:
        """Run once. Inputs: one dict, keyword arrays, or positional arrays in input order.
        Returns ``{output name: array}`` in output order.

        When the manifest records ``calibrated_ranges`` (the min/max of each input over the
        real calibration samples its fitted passes were fitted on) and ``warn_ranges`` is
        on, an input with a value outside its range, or a NaN, gives one ``RangeWarning``
        line, once per input for the life of this object: the polynomial approximations are
        only fitted inside the range, and may be far off (or non-finite) outside it."""
        arrays = self._check(args, kwargs)
        if self.warn_ranges:
            self._warn_ranges(arrays)
        return self._collect(self._main(*self._to_device(arrays)))

    def _warn_ranges(self, arrays: list[np.ndarray]) -> None:
        ranges = self.manifest.get("calibrated_ranges") or {}
        for spec, a in zip(self.inputs, arrays, strict=True):
            name, r = spec["name"], ranges.get(spec["name"])
            if r is None or name in self._range_warned or not a.size:
                continue
            lo, hi = a.min(), a.max()  # a NaN makes both NaN, and both compares false
            if lo >= r["min"] and hi <= r["max"]:
                continue
            self._range_warned.add(name)
            seen = "NaN" if np.isnan(lo) else f"values in [{lo:.6g}, {hi:.6g}]"
            warnings.warn(f"input {name!r} has {seen}, outside [{r['min']:.6g}, "
                          f"{r['max']:.6g}], the range its approximate passes were calibrated "
                          "on: outputs may be inaccurate (warned once per input; "
                          "warn_ranges=False turns this off)", RangeWarning, stacklevel=3)

    def prepare(self, *args: Any, **kwargs: Any) -> Callable[[], None]:
        """A zero-argument callable that runs on pre-staged inputs and waits for the device
        (what the profiler times)."""
        tensors = self._to_device(self._check(args, kwargs))
        main, sync = self._main, self._sync

        def call() -> None:
            main(*tensors)
            sync()

        return call

    def stream(self) -> StreamSession:
        """A stateful session for a step artifact (raises ArtifactError otherwise)."""
        return StreamSession(self)

    def _task(self) -> Any:
        if getattr(self, "_task_runner", None) is None:
            from edgekit.tasks import TaskRunner  # numpy and tokenizers only

            self._task_runner = TaskRunner(self.path, self.manifest, self.run)
        return self._task_runner

    def embed(self, texts: str | Sequence[str]) -> np.ndarray:
        """One embedding row per text, for an artifact exported with ``--task
        feature-extraction`` (tokenized by its own tokenizer, each text at its own length)."""
        return self._task().embed(texts)

    def classify(self, items: Any) -> list[tuple[str, float]]:
        """``(label, probability)`` per text (``text-classification``) or per H x W x 3 image
        (``image-classification``)."""
        return self._task().classify(items)


class StreamSession:
    """Frame-by-frame execution of a step artifact (``edgekit export --streaming``).

    The manifest's ``streaming`` section names the frame input/output and every state tensor
    with its shape, dtype and initial value. The session keeps the states on the device
    between calls, feeding each call's state outputs to the next call; ``reset()`` starts a
    new stream. Output ``t`` belongs to input frame ``t - delay`` (``delay`` > 0 only when the
    model looks ahead)."""

    def __init__(self, model: CompiledModel):
        spec = model.manifest.get("streaming")
        if not spec:
            raise ArtifactError(f"{model.path} is not a step artifact (export the model with "
                                "`edgekit export MODEL --streaming`)")
        self.model = model
        self.chunk, self.delay = int(spec["chunk"]), int(spec["delay"])
        self.time_axis = int(spec.get("time_axis", 1))
        self.states: list[dict] = spec["states"]
        ins = [spec["frame_input"], *(s["input"] for s in self.states)]
        outs = [spec["frame_output"], *(s["output"] for s in self.states)]
        if [i["name"] for i in model.inputs] != ins or [o["name"] for o in model.outputs] != outs:
            raise ArtifactError(f"{model.path}: the manifest's streaming section does not match "
                                "the model's inputs and outputs")
        self.frame_spec = model.inputs[0]
        self.reset()

    def reset(self) -> None:
        """Back to the initial state (a new stream)."""
        self._state = self.model._to_device(
            [np.full(s["shape"], s["init"], dtype=s["dtype"]) for s in self.states])
        self.frames = 0

    @property
    def state(self) -> dict[str, np.ndarray]:
        """A copy of the current state, by state input name."""
        return {s["input"]: _to_numpy(t) for s, t in zip(self.states, self._state, strict=True)}

    def _frame(self, frame: Any):
        a = np.asarray(frame)
        spec = self.frame_spec
        if tuple(a.shape) != tuple(spec["shape"]) or a.dtype != np.dtype(spec["dtype"]):
            raise ValueError(f"frame {spec['name']!r}: expected {tuple(spec['shape'])} "
                             f"{spec['dtype']}, got {tuple(a.shape)} {a.dtype}")
        return self.model._to_device([np.ascontiguousarray(a)])[0]

    def _advance(self, frame) -> Any:
        flat = list(self.model._main(frame, *self._state))
        self._state = flat[1:]
        self.frames += self.chunk
        return flat[0]

    def step(self, frame: Any) -> np.ndarray:
        """Feed the next chunk of frames; returns the output for it."""
        return _to_numpy(self._advance(self._frame(frame)))

    def run(self, sequence: Any) -> np.ndarray:
        """Feed a whole sequence (time on ``time_axis``) chunk by chunk, continuing from the
        current state; returns every step's output concatenated along time."""
        seq = np.asarray(sequence)
        steps = seq.shape[self.time_axis] if seq.ndim > self.time_axis else 0
        if steps == 0 or steps % self.chunk:
            raise ValueError(f"sequence of shape {seq.shape}: expected a positive multiple of "
                             f"{self.chunk} frame(s) on axis {self.time_axis}")
        outs = [self.step(np.take(seq, range(i, i + self.chunk), axis=self.time_axis))
                for i in range(0, steps, self.chunk)]
        return np.concatenate(outs, axis=self.time_axis)

    def prepare(self, frame: Any) -> Callable[[], None]:
        """A zero-argument callable that advances the stream by one staged chunk and waits
        for the device (what the profiler times: per-frame latency with state carried)."""
        staged, sync = self._frame(frame), self.model._sync

        def call() -> None:
            self._advance(staged)
            sync()

        return call


def load(path: str | Path, sha256: str | None = None, warn_ranges: bool = True
         ) -> CompiledModel:
    """Load an artifact directory after checking its manifest (schema, and ``sha256``, the
    digest ``edgekit verify`` prints, when given), that it holds exactly the listed files with
    their digests, that its library is a complete ELF file for this machine, and that its
    recorded memory estimate fits in the memory available (``memory_problem``).
    The library runs from the bytes that were hashed, never from a second read of the file.
    ``warn_ranges``: warn when an input leaves its calibrated range (``CompiledModel.run``)."""
    manifest, library = _check(Path(path), sha256, True)
    problem = memory_problem(manifest, f"running {path}")
    if problem:
        raise ArtifactError(problem)
    return CompiledModel(path, manifest, library, warn_ranges)
