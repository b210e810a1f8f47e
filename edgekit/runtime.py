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


def load(path: str | Path) -> CompiledModel:
    """Load an artifact directory after checking its manifest and file digests."""
    return CompiledModel(path, read_manifest(path))
