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

from edgekit import shapes
from edgekit.errors import EdgekitError, first_line
from edgekit.manifest import memory_shortfall
from edgekit.verify import (
    TensorSpec,
    dims_of,
    model_dims,
    onnx_input_specs,
    resolve_dims,
    set_model_dims,
)


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
    dims: shapes.Bounds = field(default_factory=dict)  # bounds of the specs' symbolic names
    # ONNX metadata the export adds (an hf: model's app entry and tokenizer)
    metadata: dict[str, str] = field(default_factory=dict)
    # real inputs the export is checked on besides the seeded ones (hf: tokenized text)
    real_inputs: list[dict[str, Any]] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)  # names for the graph's outputs


_SOURCE_KEY = "edgekit.source"


def set_source(model: onnx.ModelProto, source: Source) -> None:
    """Record in the ONNX metadata which torch model it came from (for torch baselines)."""
    import json

    props = {p.key: p.value for p in model.metadata_props}  # others kept (edgekit.dims)
    onnx.helper.set_model_props(model, {**props, _SOURCE_KEY: json.dumps(source.to_dict())})


def set_metadata(model: onnx.ModelProto, metadata: dict[str, str]) -> None:
    """Add ``metadata`` to the ONNX model's metadata_props (others kept)."""
    if metadata:
        props = {p.key: p.value for p in model.metadata_props}
        onnx.helper.set_model_props(model, {**props, **metadata})


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
    """Load and check an ONNX file; one-line errors for missing, garbage or invalid files.

    Symbolic dims (the file's ``dim_param`` names, or names in ``overrides``) need bounds:
    the ``--dim`` bounds that come with ``overrides`` (``verify.InputSpecs``) over those the
    file records (``verify.model_dims``); the result records the bounds it was loaded with."""
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
    # surfaces unnamed dynamic dims, unknown --input names and --input that contradicts the
    # model, and symbolic dims without bounds
    specs = onnx_input_specs(model, overrides)
    bounds = resolve_dims(specs, model_dims(model), dims_of(overrides))
    _fix_input_dims(model, overrides)
    set_model_dims(model, bounds)
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
    """``MemoryEstimate`` of a shape-inferred model (see its docstring for what it counts);
    a model with symbolic dims is estimated at their upper bounds (its largest run)."""
    import numpy as np

    bounds = model_dims(model)
    if bounds:
        model = at_lengths(model, {k: hi for k, (lo, hi) in bounds.items()})
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


def at_lengths(model: onnx.ModelProto, values: dict[str, int]) -> onnx.ModelProto:
    """A shape-inferred copy of ``model`` with its symbolic input dims set to ``values``."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    del fixed.graph.value_info[:]
    for value in fixed.graph.input:
        for d in value.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param in values:
                d.dim_value = values[d.dim_param]
    try:
        return onnx.shape_inference.infer_shapes(fixed)
    except Exception:  # an estimate: the shapes inferred so far are used as they are
        return fixed


def _fix_input_dims(model: onnx.ModelProto, overrides: Sequence[TensorSpec]) -> None:
    """Write each ``--input`` shape (checked by ``onnx_input_specs``) into the model's declared
    input: dynamic dims given as numbers become static, so shape inference (and every pass
    that needs static shapes) sees them; names become the dim's ``dim_param``."""
    by_name = {o.name: o for o in overrides}
    for value in model.graph.input:
        if value.name in by_name:
            dims = value.type.tensor_type.shape.dim
            for d, n in zip(dims, by_name[value.name].shape, strict=True):
                if shapes.is_symbolic(n):
                    d.dim_param = n  # also clears dim_value (a oneof)
                else:
                    d.dim_value = n


def load_torch(spec: str, overrides: Sequence[TensorSpec] = (),
               weights: str | Path | None = None, task: str | None = None,
               pooling: str | None = None) -> TorchModel:
    """Resolve a built-in graph name, ``file.py:factory`` or ``hf:PATH`` (with ``task``,
    ``edgekit.hf``) to an eval-mode module."""
    from edgekit import graphs, hf

    if hf.is_hf_spec(spec):
        if weights is not None:
            raise EdgekitError("--weights applies to file.py:factory models; an hf: folder "
                               "holds its own weights")
        return _load_hf(spec, overrides, task, pooling)
    if task is not None or pooling is not None:
        raise EdgekitError("--task and --pooling apply to hf:PATH models only")
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
                           "path/to/file.py:factory, hf:PATH --task T, or a .onnx file")
    if weights is not None:
        _load_weights(module, Path(weights))
        source.weights = str(Path(weights).resolve())
    specs = _merge_specs(defaults, overrides, spec)
    return TorchModel(module.eval(), specs, source, resolve_dims(specs, {}, dims_of(overrides)))


def _load_hf(spec: str, overrides: Sequence[TensorSpec], task: str | None,
             pooling: str | None) -> TorchModel:
    """``hf:PATH``: the task module, its default specs (``seq`` bounded by the model's
    longest input unless ``--input``/``--dim`` say otherwise), the app metadata and the
    tokenized check texts."""
    import json

    from edgekit import hf

    if task is None:
        raise EdgekitError(f"{spec}: give the task with --task ({', '.join(hf.TASKS)})")
    model = hf.load(spec, task, pooling)
    specs = _merge_specs(model.specs, overrides, spec)
    dims = resolve_dims(specs, model.bounds, dims_of(overrides))
    metadata = {hf.APP_KEY: json.dumps(model.app)}
    if model.tokenizer_json is not None:
        metadata[hf.TOKENIZER_KEY] = model.tokenizer_json
    real = [r for r in hf.check_texts_inputs(model, [s.name for s in specs])
            if shapes.fits(specs, r, dims)]
    source = Source("hf", model.details["folder"], details={
        "task": task, "pooling": model.app.get("pooling")})
    return TorchModel(model.module, specs, source, dims, metadata, real, [model.app["output"]])


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
