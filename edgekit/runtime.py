"""Load and run an edgekit artifact. Apps embed this module: it needs numpy and TVM's runtime
(the ``apache-tvm`` and ``apache-tvm-ffi`` wheels), nothing else from edgekit or beyond.

An artifact is a directory ``NAME.edgekit/`` holding ``manifest.json``, the compiled
library ``model.so`` and the ONNX model it was compiled from. ``load`` refuses an artifact
whose files do not match the sha256 digests in its manifest.

"TVM's runtime" means ``libtvm_runtime.so`` driven through ``tvm_ffi``: this module never
imports the ``tvm`` package, whose ``__init__`` loads the compiler library
(``libtvm_compiler.so``, LLVM inside) and imports Relax and its frontends, seconds of start-up
an app does not need. It loads the runtime library itself and calls the functions that
library registers (the Relax VM's ``vm_load_executable`` / ``vm_initialization``, the
``runtime.TVMTensor*`` copies). The same process may import the full ``tvm`` before or after:
both load the same library file, which the dynamic loader maps once.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.util
import json
import os
import platform
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
LIBRARY = "model.so"
_POOLED_ALLOCATOR = 2  # the Relax VM's allocator kinds: 1 naive, 2 pooled (what tvm uses)


class ArtifactError(ValueError):
    """The artifact is missing, malformed, tampered with, or built for another machine (or
    TVM's runtime, which runs it, is not installed)."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(path: str | Path, check_hashes: bool = True) -> dict[str, Any]:
    """Read ``manifest.json`` and (by default) verify every listed file's digest."""
    root = Path(path)
    if not root.is_dir():
        raise ArtifactError(f"{root} is not an edgekit artifact directory")
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{root} has no {MANIFEST}: not an edgekit artifact") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{root / MANIFEST} is not valid JSON: {exc}") from None
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if version != SCHEMA_VERSION:
        raise ArtifactError(f"{root / MANIFEST}: unsupported schema version {version}")
    if check_hashes:
        for name, digest in manifest.get("files", {}).items():
            file = root / name
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise ArtifactError(f"manifest lists a file outside the artifact: {name}")
            if not file.is_file():
                raise ArtifactError(f"artifact file {name} is missing")
            if sha256_file(file) != digest:
                raise ArtifactError(f"artifact file {name} does not match its sha256 in the "
                                    "manifest (modified or corrupted)")
    return manifest


@functools.cache
def _tvm_ffi() -> ModuleType:
    """``tvm_ffi`` with ``libtvm_runtime`` loaded, without torch unless the app imported it.

    tvm_ffi's ``__init__`` (and its ``core``, ``_convert`` and ``stream`` modules) run
    ``try: import torch`` for torch-tensor interop: seconds of start-up that running an
    artifact never needs. While tvm_ffi is first imported, a ``None`` entry in
    ``sys.modules`` makes that import fail as if torch were absent; the entry is removed
    afterwards, so the app (or edgekit's compiler) can still import torch. tvm_ffi then
    passes torch tensors through the DLPack protocol instead of its torch fast path."""
    block = "tvm_ffi" not in sys.modules and "torch" not in sys.modules
    if block:
        sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        import tvm_ffi
        from tvm_ffi.libinfo import load_lib_ctypes
    except ImportError as exc:
        raise ArtifactError(f"TVM's runtime is not installed ({exc}): pip install "
                            "apache-tvm==0.27.0.post1 'apache-tvm-ffi<0.1.15'") from None
    finally:
        if block and "torch" in sys.modules and sys.modules["torch"] is None:
            del sys.modules["torch"]
    # RTLD_GLOBAL, as tvm.base does: compiled libraries resolve TVMBackend* symbols from it
    load_lib_ctypes("tvm", "tvm_runtime", "RTLD_GLOBAL", extra_lib_paths=_tvm_lib_dirs())
    return tvm_ffi


def _tvm_lib_dirs() -> list[Path]:
    """Where the apache-tvm wheel keeps its libraries, found without importing ``tvm``
    (the search ``tvm.libinfo.package_lib_paths`` does, so both pick the same file)."""
    dirs = [Path(os.environ["TVM_LIBRARY_PATH"])] if os.environ.get("TVM_LIBRARY_PATH") else []
    spec = importlib.util.find_spec("tvm")
    if spec is None or not spec.submodule_search_locations:
        raise ArtifactError("TVM's runtime is not installed: pip install apache-tvm==0.27.0.post1")
    return dirs + [Path(p) / "lib" for p in spec.submodule_search_locations]


@functools.cache
def _func(name: str) -> Callable:
    """A global function registered by TVM's runtime library."""
    return _tvm_ffi().get_global_func(name)


def _cuda_available() -> bool:
    """Whether TVM's CUDA runtime loads (it links the driver's libcuda) and sees a GPU."""
    tvm_ffi = _tvm_ffi()
    from tvm_ffi.libinfo import load_lib_ctypes

    try:  # RTLD_LOCAL, as tvm.backend.cuda does: it only registers the CUDA device API
        load_lib_ctypes("tvm", "tvm_runtime_cuda", "RTLD_LOCAL", extra_lib_paths=_tvm_lib_dirs())
        cuda = tvm_ffi.device("cuda", 0)
        exist = _func("runtime.GetDeviceAttr")(cuda.dlpack_device_type(), cuda.index, 0)
    except (OSError, RuntimeError):
        return False
    return bool(exist)


def set_threads(threads: int) -> int:
    """Use ``threads`` TVM worker threads (env var for a fresh runtime, pool reset otherwise)."""
    os.environ["TVM_NUM_THREADS"] = str(threads)
    _func("runtime.config_threadpool")(1, threads)
    return threads


def _to_device(a: np.ndarray, device: Any) -> Any:
    """A TVM tensor on ``device`` holding a copy of the C-contiguous array ``a``."""
    ffi = _tvm_ffi()
    t = _func("runtime.TVMTensorAllocWithScope")(ffi.Shape(a.shape), ffi.dtype(str(a.dtype)),
                                                 device, None)
    _func("runtime.TVMTensorCopyFromBytes")(t, a.ctypes.data_as(ctypes.c_void_p), a.nbytes)
    return t


def _to_numpy(t: Any) -> np.ndarray:
    """A host copy of a TVM tensor (from any device)."""
    out = np.empty(tuple(t.shape), dtype=np.dtype(str(t.dtype)))
    _func("runtime.TVMTensorCopyToBytes")(t, out.ctypes.data_as(ctypes.c_void_p), out.nbytes)
    return out


class CompiledModel:
    """A loaded artifact: ``run(inputs)`` with inputs checked against the manifest."""

    def __init__(self, path: str | Path, manifest: dict[str, Any]):
        self.path = Path(path)
        self.manifest = manifest
        self.inputs: list[dict] = manifest["inputs"]
        self.outputs: list[dict] = manifest["outputs"]
        target = manifest["target"]
        machine = platform.machine()
        if target.get("machine") not in (None, machine):
            raise ArtifactError(
                f"artifact was built for {target.get('name')!r} ({target.get('machine')}); "
                f"this machine is {machine}: run it on the device")
        tvm_ffi = _tvm_ffi()
        cuda = target.get("device") == "cuda"
        if cuda:
            if not _cuda_available():
                raise ArtifactError(f"artifact was built for {target.get('name')!r} (a CUDA "
                                    "GPU); this machine has no CUDA GPU or driver: run it on "
                                    "the device")
            from edgekit.devices.cuda import register_ptx

            register_ptx(self.path, manifest)  # load the artifact's PTX, not nvcc's output
        self.device = tvm_ffi.device("cuda" if cuda else "cpu", 0)
        lib = tvm_ffi.load_module(str(self.path / LIBRARY))
        self._vm = lib["vm_load_executable"]()
        # (device type, index, allocator) per device; the VM runs shape functions on the CPU
        devices = [self.device, *([tvm_ffi.device("cpu", 0)] if cuda else [])]
        self._vm["vm_initialization"](*(v for d in devices for v in
                                        (d.dlpack_device_type(), d.index, _POOLED_ALLOCATOR)))
        self._main = self._vm["main"]
        self._sync = functools.partial(_func("runtime.Device_StreamSync"), self.device, 0)

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
        arrays = []
        for spec in self.inputs:
            name = spec["name"]
            if name not in kwargs:
                raise ValueError(f"missing input {name!r}")
            a = np.asarray(kwargs[name])
            if tuple(a.shape) != tuple(spec["shape"]):
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
        flat = [result] if isinstance(result, _tvm_ffi().Tensor) else list(result)
        names = [o["name"] for o in self.outputs]
        return {n: _to_numpy(t) for n, t in zip(names, flat, strict=True)}

    def run(self, *args: Any, **kwargs: Any) -> dict[str, np.ndarray]:
        """Run once. Inputs: one dict, keyword arrays, or positional arrays in input order.
        Returns ``{output name: array}`` in output order."""
        tensors = self._to_device(self._check(args, kwargs))
        return self._collect(self._main(*tensors))

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


def load(path: str | Path) -> CompiledModel:
    """Load an artifact directory after checking its manifest and file digests."""
    return CompiledModel(path, read_manifest(path))
