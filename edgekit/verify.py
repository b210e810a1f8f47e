"""One place for "is it still right?": seeded inputs, onnxruntime runs, error metrics.

Error metric, used everywhere in edgekit: for each output, ``max_abs = max|y - ref|`` and
``rel = max_abs / max|ref|`` (norm-wise relative error, robust to near-zero elements).
An output passes when ``max_abs <= atol + rtol * max|ref|``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import onnx

from edgekit import shapes
from edgekit.errors import EdgekitError, first_line

_ONNX_TO_NUMPY = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.DOUBLE: "float64",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.BOOL: "bool",
}


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and numpy dtype name of one model input or output.

    ``shape``: ints, or names for symbolic dims (``(1, "seq")``, see ``edgekit.shapes``);
    an output dim that is neither (an expression of names) is -1.

    ``high``: for an integer input used as indices into a table (token ids into an embedding),
    the table's size, so seeded inputs cover the whole table instead of rows 0 and 1.
    """

    name: str
    shape: tuple[shapes.Dim, ...]
    dtype: str
    high: int | None = field(default=None, compare=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorSpec:
        """The inverse of ``to_dict`` (a manifest's ``inputs`` entries)."""
        return cls(d["name"], tuple(d["shape"]), d["dtype"], d.get("high"))

    def to_dict(self) -> dict:
        out = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        return out if self.high is None else {**out, "high": self.high}


@dataclass(frozen=True)
class Comparison:
    """How far one output is from its reference."""

    name: str
    max_abs: float
    rel: float
    ok: bool

    def to_dict(self) -> dict:
        return asdict(self)


class InputSpecs(list):
    """``--input`` specs together with the bounds (``--dim``) of the symbolic names they
    use: a shape with names is incomplete without them. A plain list of specs has none."""

    def __init__(self, specs: Sequence[TensorSpec] = (),
                 dims: Mapping[str, tuple[int, int]] | None = None):
        super().__init__(specs)
        self.dims: shapes.Bounds = dict(dims or {})


def dims_of(specs: Sequence[TensorSpec]) -> shapes.Bounds:
    """The ``--dim`` bounds that came with ``specs`` (an ``InputSpecs``), else ``{}``."""
    return dict(getattr(specs, "dims", {}))


def parse_inputs(inputs: Sequence[str], dims: Sequence[str] = ()) -> InputSpecs:
    """``--input`` texts and ``--dim NAME=LO..HI`` texts -> ``InputSpecs``."""
    return InputSpecs([parse_input_spec(t) for t in inputs], shapes.parse_dim_options(dims))


def _parse_dim(text: str, spec: str) -> shapes.Dim:
    if shapes.NAME.match(text):
        return text
    try:
        dim = int(text)
    except ValueError:
        raise EdgekitError(f"bad input spec {spec!r}: a dimension is a positive integer or a "
                           f"name (a symbolic dim, bounded with --dim NAME=LO..HI), not "
                           f"{text!r}") from None
    if dim <= 0:
        raise EdgekitError(f"bad input spec {spec!r}: dimensions must be positive")
    return dim


def parse_input_spec(text: str) -> TensorSpec:
    """Parse ``name:1x3x224x224[:dtype]`` (the one input-shape syntax of edgekit); a dim may
    be a name (``ids:1xseq:int64``), symbolic, bounded with ``--dim seq=1..256``. Without a
    dtype the spec's dtype is "": the model's declared input type is kept (float32 for a
    PyTorch model that declares none)."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0]:
        raise EdgekitError(f"bad input spec {text!r}: expected name:1x3x224x224[:dtype]")
    # "x" separates dims, so a name is split on it too: 1xseq -> 1, seq; a name holding an x
    # (max_len) cannot be written here (an ONNX file's own dim_param keeps any name)
    shape = tuple(_parse_dim(d, text) for d in parts[1].split("x")) if parts[1] else ()
    if len(parts) == 2:
        return TensorSpec(parts[0], shape, "")
    try:
        dtype = str(np.dtype(parts[2]))
    except TypeError:
        raise EdgekitError(f"bad input spec {text!r}: unknown dtype {parts[2]!r}") from None
    return TensorSpec(parts[0], shape, dtype)


def _value_spec(value: onnx.ValueInfoProto, override: TensorSpec | None) -> TensorSpec:
    ttype = value.type.tensor_type
    dtype = _ONNX_TO_NUMPY.get(ttype.elem_type)
    if dtype is None:
        raise EdgekitError(f"input {value.name!r}: unsupported element type {ttype.elem_type}")
    if override is not None:
        _check_fits(value, override, dtype)
        return TensorSpec(value.name, override.shape, override.dtype or dtype)
    dims: list[shapes.Dim] = []
    for d in ttype.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(d.dim_value)
        elif d.HasField("dim_param") and d.dim_param:  # the file's own name: kept, symbolic
            dims.append(d.dim_param)
        else:
            raise EdgekitError(
                f"input {value.name!r} has a dynamic dimension with no name: give its shape "
                f"with --input {value.name}:1x... (a name there makes it symbolic)")
    return TensorSpec(value.name, tuple(dims), dtype)


def _check_fits(value: onnx.ValueInfoProto, override: TensorSpec, dtype: str) -> None:
    """An ``--input`` may fix the model's dynamic dims (to a number or a name), not
    contradict what it declares: a static dim stays that number."""
    given = f"--input {value.name}:{'x'.join(map(str, override.shape))}"
    if override.dtype and override.dtype != dtype:
        raise EdgekitError(f"{given}:{override.dtype}: the model declares {value.name!r} as "
                           f"{dtype}")
    declared = ["?" if not d.HasField("dim_value") else str(d.dim_value)
                for d in value.type.tensor_type.shape.dim]
    if len(declared) != len(override.shape) or any(
            d not in ("?", str(n)) for d, n in zip(declared, override.shape, strict=False)):
        raise EdgekitError(f"{given} does not fit the model's declared shape "
                           f"{'x'.join(declared) or 'scalar'}")


def onnx_input_specs(
    model: onnx.ModelProto, overrides: Sequence[TensorSpec] = ()
) -> list[TensorSpec]:
    """Input specs of an ONNX model (graph inputs that are not initializers): static dims,
    the ``overrides``' dims, and the file's own ``dim_param`` names (symbolic) elsewhere."""
    inits = {i.name for i in model.graph.initializer}
    values = [v for v in model.graph.input if v.name not in inits]
    by_name = {o.name: o for o in overrides}
    unknown = set(by_name) - {v.name for v in values}
    if unknown:
        names = ", ".join(v.name for v in values)
        raise EdgekitError(f"unknown input {sorted(unknown)[0]!r}: the model's inputs are {names}")
    bounds = index_bounds(model)
    return [replace(_value_spec(v, by_name.get(v.name)), high=bounds.get(v.name))
            for v in values]


DIMS_KEY = "edgekit.dims"  # ONNX metadata: the bounds of the model's symbolic input dims


def model_dims(model: onnx.ModelProto) -> shapes.Bounds:
    """The bounds recorded in ``model``'s metadata (``set_model_dims``), else ``{}``."""
    import json

    for prop in model.metadata_props:
        if prop.key == DIMS_KEY:
            try:
                return shapes.bounds_from_json(json.loads(prop.value))
            except json.JSONDecodeError:
                raise EdgekitError(f"the model's {DIMS_KEY} metadata is not JSON") from None
    return {}


def set_model_dims(model: onnx.ModelProto, bounds: Mapping[str, tuple[int, int]]) -> None:
    """Record the bounds of the symbolic input dims in ``model``'s metadata (none: removed),
    so a later rewrite or compile of the file needs no ``--dim`` again."""
    import json

    props = [p for p in model.metadata_props if p.key != DIMS_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(props)
    if bounds:
        model.metadata_props.add(key=DIMS_KEY, value=json.dumps(
            {k: list(v) for k, v in bounds.items()}))


def resolve_dims(specs: Sequence[TensorSpec], recorded: Mapping[str, tuple[int, int]],
                 given: Mapping[str, tuple[int, int]]) -> shapes.Bounds:
    """Bounds of the symbolic names ``specs`` use: ``given`` (``--dim``) over ``recorded``
    (the model's metadata; names no input uses any more are dropped). A name without bounds,
    or a ``--dim`` no input uses, is a one-line error."""
    used = shapes.symbolic_names(s.shape for s in specs)
    merged = {**{k: v for k, v in recorded.items() if k in used}, **given}
    unbounded = next((s for s in specs for d in s.shape
                      if shapes.is_symbolic(d) and d not in merged), None)
    if unbounded is not None:  # the other way out: a fixed size
        name = next(d for d in unbounded.shape if shapes.is_symbolic(d) and d not in merged)
        fixed = "x".join("N" if d == name else str(d) for d in unbounded.shape)
        raise EdgekitError(f"input {unbounded.name!r} has the symbolic dim {name!r}: bound it "
                           f"with --dim {name}=LO..HI, or fix its size with --input "
                           f"{unbounded.name}:{fixed}")
    return shapes.check_bounds({s.name: s.shape for s in specs}, merged)


# Ops that pass integer indices through unchanged on their first input.
_INDEX_PASSTHROUGH = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"}


def index_bounds(model: onnx.ModelProto) -> dict[str, int]:
    """Integer graph inputs used as Gather indices into an initializer: input -> table size.

    An input reaching several tables gets the smallest; one reaching anything else (a mask
    turned into an additive bias) gets no bound, so it keeps the 0/1 values of a mask.
    """
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def bound(name: str, depth: int = 0) -> int | None:
        uses = consumers.get(name, [])
        if not uses or depth > 8:
            return None
        sizes = []
        for node in uses:
            if node.op_type == "Gather" and node.input[1] == name and node.input[0] in inits:
                axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                dims = inits[node.input[0]]
                sizes.append(dims[axis] if dims else None)
            elif node.op_type in _INDEX_PASSTHROUGH and node.input[0] == name:
                sizes.append(bound(node.output[0], depth + 1))
            else:
                return None
        return min(sizes) if sizes and None not in sizes else None

    out = {}
    for value in model.graph.input:
        if value.type.tensor_type.elem_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
            size = bound(value.name)
            if size and size > 2:
                out[value.name] = size
    return out


def seeded_inputs(specs: Sequence[TensorSpec], seed: int = 0) -> dict[str, np.ndarray]:
    """Reproducible inputs: floats ~ N(0, 1); integers in [0, spec.high) for index inputs
    with a known table size, else 0/1 (masks). Shapes must be concrete (``seeded_at``)."""
    symbolic = next((s for s in specs if any(map(shapes.is_symbolic, s.shape))), None)
    if symbolic is not None:
        raise EdgekitError(f"input {symbolic.name!r} has symbolic dims "
                           f"({shapes.format_shape(symbolic.shape)}): pick lengths first")
    rng = np.random.default_rng(seed)
    out = {}
    for s in specs:
        dt = np.dtype(s.dtype)
        if dt.kind == "f":
            out[s.name] = rng.standard_normal(s.shape).astype(dt)
        elif dt.kind == "b":
            out[s.name] = np.ones(s.shape, dtype=dt)
        else:
            out[s.name] = rng.integers(0, s.high or 2, size=s.shape).astype(dt)
    return out


def seeded_at(specs: Sequence[TensorSpec], bounds: Mapping[str, tuple[int, int]],
              seed: int = 0) -> list[tuple[dict[str, int], dict[str, np.ndarray]]]:
    """Seeded inputs at every ``shapes.check_points(bounds)`` length: (lengths, inputs)
    pairs; one pair, ``({}, inputs)``, for static specs."""
    return [(point, seeded_inputs(shapes.concrete(specs, point), seed))
            for point in shapes.check_points(bounds)]


def at_length(name: str, point: Mapping[str, int]) -> str:
    """An output's name with the lengths it was checked at: ``emb [seq=17]`` (static: name)."""
    return f"{name} [{shapes.format_point(point)}]" if point else name


def compare(
    names: Sequence[str],
    outputs: Sequence[np.ndarray],
    references: Sequence[np.ndarray],
    atol: float,
    rtol: float,
) -> list[Comparison]:
    """Compare outputs with references, one ``Comparison`` per output."""
    result = []
    for name, y, ref in zip(names, outputs, references, strict=True):
        y = np.asarray(y)
        ref = np.asarray(ref)
        if y.shape != ref.shape:
            result.append(Comparison(name, math.inf, math.inf, False))
            continue
        if y.dtype.kind in "fc" or ref.dtype.kind in "fc":
            diff = np.abs(y.astype(np.float64) - ref.astype(np.float64))
            scale = float(np.max(np.abs(ref))) if ref.size else 0.0
        else:
            diff = (y != ref).astype(np.float64)
            scale = 1.0
        max_abs = float(np.nanmax(diff)) if diff.size else 0.0
        if np.isnan(diff).any():
            max_abs = math.inf
        rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
        result.append(Comparison(name, max_abs, rel, max_abs <= atol + rtol * scale))
    return result


def describe_failures(comparisons: Sequence[Comparison]) -> str:
    """One line naming the outputs that differ and by how much."""
    bad = [c for c in comparisons if not c.ok]
    return "; ".join(f"{c.name}: max abs {c.max_abs:.3g}, rel {c.rel:.3g}" for c in bad)


# onnxruntime 1.32's MatMulAddFusion fails to load some valid graphs with "Attempt to replace
# the existing tensor" (graph.cc AddInitializedOrtValue): two MatMul+Add pairs sharing a bias
# initializer, as token-prune leaves on a BERT pruned after its first layer. Such a model is
# loaded again without that optimizer (a fusion only: the outputs are the same ops' outputs).
ORT_FALLBACK_OPTIMIZERS = ("MatMulAddFusion",)

# The onnxruntime 1.32 optimizers that replace DequantizeLinear -> op (-> QuantizeLinear) by
# integer kernels (QLinearConv, MatMulIntegerToFloat, DynamicQuantizeMatMul, ...). On x86
# without AVX-512 VNNI those kernels multiply u8 x s8 with vpmaddubsw, which saturates each
# pair sum to int16 (255 * 127 * 2 > 32767): measured here (AVX2 only) on a uint8 input at
# full range into a MatMul with weights at +-127, 2.74 absolute error, 0 without them. Off,
# the QDQ graph runs as written (DQ, the float op, Q): its own math, the one TVM lowers
# exactly; every other optimization stays on.
QDQ_FUSIONS = ("QDQSelectorActionTransformer", "MatMulIntegerToFloatFusion",
               "DynamicQuantizeMatMulFusion")
# Ops that compute in integers: their graphs are checked on the QDQ math (compiler.qdq_check)
QUANTIZED_OPS = ("QuantizeLinear", "DynamicQuantizeLinear", "QLinearMatMul", "QLinearConv",
                 "ConvInteger", "MatMulInteger")


def quantizes(model: onnx.ModelProto) -> bool:
    """Whether ``model`` computes in integers (one of ``QUANTIZED_OPS``)."""
    return any(n.op_type in QUANTIZED_OPS for n in model.graph.node)


def ort_session(model: onnx.ModelProto | bytes | str, threads: int | None = None,
                qdq_fusions: bool = True):
    """An onnxruntime CPU session (``threads`` intra-op threads, default: ORT's choice).

    ``qdq_fusions=False`` leaves out ``QDQ_FUSIONS``: the session computes the QDQ math, not
    onnxruntime's integer kernels (which saturate on x86 without VNNI). A model that fails to
    load is tried once more without ``ORT_FALLBACK_OPTIMIZERS`` too; when that works, a
    warning says so."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # load errors come back as the exception, not as log lines
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    disabled = [] if qdq_fusions else list(QDQ_FUSIONS)
    try:
        return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=disabled)
    except Exception as exc:  # ORT raises several unrelated types for bad graphs
        error = exc
    try:
        sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=[*disabled, *ORT_FALLBACK_OPTIMIZERS])
    except Exception:
        raise EdgekitError(f"onnxruntime cannot load the model: {first_line(error)}"
                           ) from error
    warnings.warn(f"onnxruntime could not load the model with all its optimizers "
                  f"({first_line(error).rsplit(': ', 1)[-1]}); loaded it without "
                  f"{', '.join(ORT_FALLBACK_OPTIMIZERS)}", RuntimeWarning, stacklevel=2)
    return sess


def run_ort(model, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Run a model (or an open ``ort_session``) once; outputs in graph order."""
    sess = model if hasattr(model, "run") else ort_session(model)
    try:
        return sess.run(None, dict(inputs))
    except Exception as exc:
        raise EdgekitError(f"onnxruntime failed to run the model: {first_line(exc)}") from exc
