"""MODEL specs -> a torch module or an ONNX model, with static input specs.

A MODEL is one of:
- a built-in graph name (``edgekit graphs`` lists them);
- ``path/to/file.py:factory``: ``factory()`` returns an ``nn.Module``; ``--weights`` loads a
  state dict with ``torch.load(weights_only=True)``; inputs come from ``--input`` or the
  file's ``INPUTS`` list;
- ``path/to/model.onnx``: its opsets checked against what onnx (and so TVM's frontend and
  onnxruntime) knows, then ``onnx.checker`` and strict shape inference.

``check_memory`` compares an estimate of the memory a model's run needs (from the inferred
shapes) with the memory available, so an impossible size fails in a second with the sizes
named instead of a ``MemoryError`` after a full TVM build.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import onnx

from edgekit.errors import EdgekitError, first_line
from edgekit.manifest import memory_shortfall
from edgekit.verify import TensorSpec, onnx_input_specs


@dataclass
class Source:
    """Where a model came from, enough to rebuild the torch reference later."""

    kind: str  # "graph" | "python" | "onnx"
    spec: str
    weights: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "spec": self.spec, "weights": self.weights, **self.details}


@dataclass
class TorchModel:
    module: Any
    specs: list[TensorSpec]
    source: Source


_SOURCE_KEY = "edgekit.source"


def set_source(model: onnx.ModelProto, source: Source) -> None:
    """Record in the ONNX metadata which torch model it came from (for torch baselines)."""
    import json

    onnx.helper.set_model_props(model, {_SOURCE_KEY: json.dumps(source.to_dict())})


def get_source(model: onnx.ModelProto) -> dict[str, Any] | None:
    import json

    for prop in model.metadata_props:
        if prop.key == _SOURCE_KEY:
            try:
                data = json.loads(prop.value)
            except json.JSONDecodeError:
                return None
            return data if isinstance(data, dict) and "kind" in data else None
    return None


def is_onnx_spec(spec: str) -> bool:
    return spec.lower().endswith(".onnx")


def load_onnx(path: str | Path, overrides: Sequence[TensorSpec] = ()) -> onnx.ModelProto:
    """Load and check an ONNX file; one-line errors for missing, garbage or invalid files."""
    path = Path(path)
    if not path.is_file():
        raise EdgekitError(f"ONNX file not found: {path}")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf DecodeError, truncated files, bad external data
        raise EdgekitError(f"{path} is not a readable ONNX model: {first_line(exc)}") from None
    if not model.graph.node and not model.graph.output:
        raise EdgekitError(f"{path} is not a readable ONNX model: it has an empty graph")
    check_opsets(model, path)
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise EdgekitError(f"{path} fails the ONNX checker: {first_line(exc)}") from None
    # surfaces dynamic dims, unknown --input names and --input that contradicts the model
    onnx_input_specs(model, overrides)
    _fix_input_dims(model, overrides)
    try:
        model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as exc:
        raise EdgekitError(f"{path} fails ONNX shape inference: {first_line(exc)}") from None
    return model


def check_opsets(model: onnx.ModelProto, path: str | Path) -> None:
    """Refuse a default-domain (``ai.onnx``) opset that this onnx release does not define.

    onnx's checker accepts any opset number and TVM's ONNX frontend picks, per op, the newest
    converter at or below it, so an opset from the future (``99``) used to compile for minutes
    and fail only in onnxruntime's check ("Opset 99 is under development"). onnxruntime's
    supported range follows onnx's releases (onnxruntime 1.32 and onnx's newest: 28)."""
    newest = onnx.defs.onnx_opset_version()
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and not 1 <= imp.version <= newest:
            raise EdgekitError(
                f"{path} declares ONNX opset {imp.version}; onnx {onnx.__version__} (and so "
                f"TVM's importer and onnxruntime) know opsets 1 to {newest}: convert it with "
                f"onnx.version_converter or re-export it with opset <= {newest}")


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a run of a model needs, roughly: inputs + weights + the two largest other
    tensors (one op's input and output alive at once). An estimate from ONNX shape inference:
    TVM's memory planner may reuse more or less than that."""

    inputs: int
    weights: int
    activations: int

    @property
    def total(self) -> int:
        return self.inputs + self.weights + self.activations


def _tensor_bytes(value: onnx.ValueInfoProto) -> int:
    """Bytes of a tensor with a fully known static shape, else 0."""
    t = value.type.tensor_type
    if not t.HasField("shape") or not t.elem_type:
        return 0
    n = 1
    for d in t.shape.dim:
        if not d.HasField("dim_value"):
            return 0
        n *= d.dim_value
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).itemsize
    except (KeyError, ValueError, TypeError):
        itemsize = 4
    return n * itemsize


def estimate_memory(model: onnx.ModelProto) -> MemoryEstimate:
    """``MemoryEstimate`` of a shape-inferred model (see its docstring for what it counts)."""
    import numpy as np

    inits = {t.name for t in model.graph.initializer}
    weights = sum(int(np.prod(t.dims, dtype=np.int64)) *
                  onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
                  for t in model.graph.initializer if t.data_type)
    inputs = sum(_tensor_bytes(v) for v in model.graph.input if v.name not in inits)
    others = sorted((_tensor_bytes(v) for v in [*model.graph.value_info, *model.graph.output]),
                    reverse=True)
    return MemoryEstimate(inputs, weights, sum(others[:2]))


def check_memory(model: onnx.ModelProto, what: str = "running the model") -> MemoryEstimate:
    """Raise ``EdgekitError`` when ``estimate_memory(model)`` exceeds the memory available now
    (``/proc/meminfo`` MemAvailable), naming the sizes; return the estimate otherwise."""
    est = estimate_memory(model)
    problem = memory_shortfall(asdict(est), what, "estimated from ONNX shape inference")
    if problem:
        raise EdgekitError(f"{problem}: give smaller shapes with --input")
    return est


def _fix_input_dims(model: onnx.ModelProto, overrides: Sequence[TensorSpec]) -> None:
    """Write each ``--input`` shape (checked by ``onnx_input_specs``) into the model's declared
    input: dynamic dims become static, so shape inference (and every pass that needs static
    shapes) sees them."""
    by_name = {o.name: o for o in overrides}
    for value in model.graph.input:
        if value.name in by_name:
            dims = value.type.tensor_type.shape.dim
            for d, n in zip(dims, by_name[value.name].shape, strict=True):
                d.dim_value = n  # also clears dim_param (a oneof)


def load_torch(spec: str, overrides: Sequence[TensorSpec] = (),
               weights: str | Path | None = None) -> TorchModel:
    """Resolve a built-in graph name or ``file.py:factory`` to an eval-mode module."""
    from edgekit import graphs

    builtin = graphs.available()
    if spec in builtin:
        g = builtin[spec]
        module = g.build()
        defaults = [TensorSpec(n, tuple(s), d) for n, s, d in g.inputs]
        source = Source("graph", spec)
    elif ":" in spec and spec.rsplit(":", 1)[0].endswith(".py"):
        file, factory = spec.rsplit(":", 1)
        module, defaults = _call_factory(Path(file), factory)
        source = Source("python", f"{Path(file).resolve()}:{factory}")
    else:
        names = ", ".join(builtin)
        raise EdgekitError(f"unknown model {spec!r}: give a built-in graph ({names}), "
                           "path/to/file.py:factory, or a .onnx file")
    if weights is not None:
        _load_weights(module, Path(weights))
        source.weights = str(Path(weights).resolve())
    specs = _merge_specs(defaults, overrides, spec)
    return TorchModel(module.eval(), specs, source)


def _call_factory(file: Path, factory: str):
    import torch

    if not file.is_file():
        raise EdgekitError(f"Python file not found: {file}")
    name = f"_edgekit_user_{abs(hash(file.resolve()))}"
    mod_spec = importlib.util.spec_from_file_location(name, file)
    if mod_spec is None or mod_spec.loader is None:
        raise EdgekitError(f"cannot import {file}")
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[name] = module
    try:
        mod_spec.loader.exec_module(module)
    except Exception as exc:
        raise EdgekitError(f"importing {file} failed: {type(exc).__name__}: "
                           f"{first_line(exc)}") from exc
    fn = getattr(module, factory, None)
    if not callable(fn):
        raise EdgekitError(f"{file} has no function {factory!r}")
    try:
        model = fn()
    except Exception as exc:
        raise EdgekitError(f"{file}:{factory}() failed: {type(exc).__name__}: "
                           f"{first_line(exc)}") from exc
    if not isinstance(model, torch.nn.Module):
        raise EdgekitError(f"{file}:{factory}() returned {type(model).__name__}, "
                           "not a torch.nn.Module")
    inputs = getattr(module, "INPUTS", ())
    return model, [TensorSpec(n, tuple(s), str(d)) for n, s, d in inputs]


def _load_weights(module, path: Path) -> None:
    import torch

    if not path.is_file():
        raise EdgekitError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise EdgekitError(f"cannot load weights from {path}: {first_line(exc)}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise EdgekitError(f"{path} does not hold a state dict")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise EdgekitError(f"weights in {path} do not fit the model: {detail[:300]}") from None


def _merge_specs(defaults: list[TensorSpec], overrides: Sequence[TensorSpec], spec: str):
    if not overrides:
        if not defaults:
            raise EdgekitError(f"{spec}: give the input shapes with --input name:1x3x224x224")
        return defaults
    if not defaults:
        return [replace(o, dtype=o.dtype or "float32") for o in overrides]
    by_name = {o.name: o for o in overrides}
    unknown = set(by_name) - {d.name for d in defaults}
    if unknown:
        names = ", ".join(d.name for d in defaults)
        raise EdgekitError(f"unknown input {sorted(unknown)[0]!r}: the model's inputs are {names}")
    return [replace(by_name[d.name], dtype=by_name[d.name].dtype or d.dtype)
            if d.name in by_name else d for d in defaults]
