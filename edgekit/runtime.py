"""Load and run an edgekit artifact. Apps embed this module: it imports numpy and TVM only.

An artifact is a directory ``NAME.edgekit/`` holding ``manifest.json``, the compiled
library ``model.so`` and the ONNX model it was compiled from. ``load`` refuses an artifact
whose files do not match the sha256 digests in its manifest.
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
LIBRARY = "model.so"


class ArtifactError(ValueError):
    """The artifact is missing, malformed, tampered with, or built for another machine."""


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


class CompiledModel:
    """A loaded artifact: ``run(inputs)`` with inputs checked against the manifest."""

    def __init__(self, path: str | Path, manifest: dict[str, Any]):
        import tvm
        from tvm import relax

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
        if target.get("device") == "cuda":
            if not tvm.cuda().exist:
                raise ArtifactError(f"artifact was built for {target.get('name')!r} (a CUDA "
                                    "GPU); this machine has no CUDA GPU or driver: run it on "
                                    "the device")
            from edgekit.devices.cuda import register_ptx

            register_ptx(self.path, manifest)  # load the artifact's PTX, not nvcc's output
        self.device = tvm.cuda() if target.get("device") == "cuda" else tvm.cpu()
        lib = tvm.runtime.load_module(str(self.path / LIBRARY))
        self._vm = relax.VirtualMachine(lib, self.device)
        self._main = self._vm["main"]

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
        import tvm

        return [tvm.runtime.tensor(a, self.device) for a in arrays]

    def _collect(self, result) -> dict[str, np.ndarray]:
        flat = list(result) if not hasattr(result, "numpy") else [result]
        names = [o["name"] for o in self.outputs]
        return {n: t.numpy() for n, t in zip(names, flat, strict=True)}

    def run(self, *args: Any, **kwargs: Any) -> dict[str, np.ndarray]:
        """Run once. Inputs: one dict, keyword arrays, or positional arrays in input order.
        Returns ``{output name: array}`` in output order."""
        tensors = self._to_device(self._check(args, kwargs))
        return self._collect(self._main(*tensors))

    def prepare(self, *args: Any, **kwargs: Any) -> Callable[[], None]:
        """A zero-argument callable that runs on pre-staged inputs and waits for the device
        (what the profiler times)."""
        tensors = self._to_device(self._check(args, kwargs))
        main, device = self._main, self.device

        def call() -> None:
            main(*tensors)
            device.sync()

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
        return {s["input"]: t.numpy() for s, t in zip(self.states, self._state, strict=True)}

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
        return self._advance(self._frame(frame)).numpy()

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
        staged, device = self._frame(frame), self.model.device

        def call() -> None:
            self._advance(staged)
            device.sync()

        return call


def load(path: str | Path) -> CompiledModel:
    """Load an artifact directory after checking its manifest and file digests."""
    return CompiledModel(path, read_manifest(path))
