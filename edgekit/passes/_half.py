"""Half-precision machinery of ``convert-fp16`` / ``convert-bf16``: islands, per-op error, casts.

A float32 graph becomes a graph in ``fmt`` (float16: 1 sign, 5 exponent, 10 mantissa bits,
max 65504, unit roundoff u = 2⁻¹¹; bfloat16: 8 exponent bits as fp32, 7 mantissa bits,
u = 2⁻⁸) where every node computes in ``fmt`` except the fp32 *islands*:

* by rule (``rule_island``): norms and their statistics (mean, variance, RMS: Σx² overflows
  fp16 once |x| > 256, and CRMSNorm's (Σx)²/d − Σx² cancels), softmax (max and Σ exp),
  statistics reductions (ReduceMean, ReduceSumSquare, ReduceL2, …) and sums over at least
  ``long_axis`` elements (the sum's rounding error grows with its length), custom-domain ops,
  ops whose ONNX schema at the model's opset has no ``fmt`` form (Conv has no bfloat16 before
  opset 22), random ops, a constant input beyond ``fmt``'s range, and any node carrying the
  metadata key ``edgekit.keep_fp32`` (its value is the reason);
* by measurement (``local_errors``): each remaining node is run once more on the fp32
  reference values of its inputs rounded to ``fmt``, in fp32 arithmetic, its outputs rounded
  to ``fmt``; ``‖ŷ − y‖₂ / ‖y‖₂`` (max over the samples; inf when ŷ is non-finite where y is
  finite: overflow) above the pass's threshold makes the node an island. This is the per-op
  error table that locates the op that breaks accuracy.

``convert`` then rewrites the graph: float32 initializers read by 16-bit nodes get ``fmt``
copies (the fp32 ones go when nothing else reads them; so do the weights of an island that
is fp32 only because its schema lacks ``fmt``, read through a Cast to fp32: a bfloat16 model
of Convs at opset < 22 still halves its weights), ``Cast`` goes where a value crosses
between precisions (one per value and direction), ``Cast(to=FLOAT)`` / ``Constant`` /
``ConstantOfShape`` inside 16-bit regions produce ``fmt``, and every float32 graph input and
output keeps its declared type (a Cast at the boundary: exact for fp32 → fmt → fp32 of values
representable in ``fmt``).

onnxruntime's CPU provider has no bfloat16 MatMul/Add/…, so ``ort_form`` gives the form in
which bfloat16 graphs are run by the pass check and by this module: every bfloat16 value
computed in fp32 and rounded to bfloat16 (``Cast`` to bfloat16 and back, round to nearest
even, as onnxruntime and ml_dtypes do) at each node output; bfloat16 constants become the
fp32 numbers they represent. That is a bfloat16 kernel accumulating in fp32, rounding what it
stores, at least as much rounding as a compiled kernel that fuses several ops.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from edgekit.errors import EdgekitError, first_line
from edgekit.verify import ort_session

KEEP_FP32 = "edgekit.keep_fp32"  # node metadata: keep this node in fp32; the value is why


@dataclass(frozen=True)
class Format:
    """A 16-bit float format: ONNX type, numpy dtype, largest finite value, schema name."""

    name: str  # "fp16" | "bf16"
    onnx_type: int
    ir_type: ir.DataType
    numpy: type
    max: float
    schema: str  # as in ONNX type strings: tensor(float16)


def _bf16_dtype() -> type:
    import ml_dtypes  # onnx and onnx-ir depend on it

    return ml_dtypes.bfloat16


FP16 = Format("fp16", TensorProto.FLOAT16, ir.DataType.FLOAT16, np.float16, 65504.0,
              "tensor(float16)")
BF16 = Format("bf16", TensorProto.BFLOAT16, ir.DataType.BFLOAT16, _bf16_dtype(),
              float(np.finfo(np.float32).max), "tensor(bfloat16)")

NORMS = {"LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization",
         "GroupNormalization", "InstanceNormalization", "LpNormalization",
         "MeanVarianceNormalization"}
SOFTMAX = {"Softmax", "LogSoftmax", "Hardmax"}
STATISTICS = {"ReduceMean", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum",
              "ReduceLogSumExp"}
SUMS = {"ReduceSum", "ReduceProd", "GlobalAveragePool", "GlobalLpPool", "CumSum"}
RANDOM = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
          "Multinomial", "Bernoulli", "EyeLike"}
# elementwise ops that turn a reduced statistic into the normaliser (eps, sqrt, 1/x, squares)
STAT_CHAIN = {"Add", "Sub", "Mul", "Div", "Sqrt", "Reciprocal", "Pow", "Max", "Clip"}
FLOAT = ir.DataType.FLOAT


def is_float(value: ir.Value | None) -> bool:
    return value is not None and value.dtype == FLOAT


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's array if it is a constant (initializer or Constant node), else None.
    (``_ir.const_array``'s twin: this module may not import ``_ir``, which imports ``core``,
    which imports ``ort_form`` from here.)"""
    if value is None or value.is_graph_input():
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


class Refused(Exception):
    """The graph cannot be converted; the pass turns this into ``PassRefused``."""

    def __init__(self, reason: str, node: str = ""):
        super().__init__(reason)
        self.reason, self.node = reason, node


def _reduced_extent(node: ir.Node) -> int | None:
    """How many elements each output of a reduction sums (None when shapes are unknown)."""
    x = node.inputs[0]
    if x is None or x.shape is None or not all(isinstance(d, int) for d in x.shape):
        return None
    shape = list(x.shape)
    if node.op_type.startswith("Global"):
        return int(np.prod(shape[2:], dtype=np.int64))
    if node.op_type == "CumSum":
        return max(shape) if shape else 1
    axes = node.attributes.get("axes")
    axes = list(axes.as_ints()) if axes is not None else None
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        arr = const_array(node.inputs[1])
        if arr is None:
            return None
        axes = [int(a) for a in arr.ravel()]
    if not axes:  # all axes (noop_with_empty_axes aside)
        return int(np.prod(shape, dtype=np.int64))
    return int(np.prod([shape[a] for a in axes], dtype=np.int64))


def _schema_allows(node: ir.Node, opset: int, fmt: Format) -> str:
    """Why ``node``'s ONNX schema has no ``fmt`` form for its float outputs, or ''."""
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain or "")
    except onnx.defs.SchemaError:
        return f"{node.op_type} has no schema at opset {opset}"
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    for i, out in enumerate(node.outputs):
        if not is_float(out) or not schema.outputs:
            continue
        formal = schema.outputs[min(i, len(schema.outputs) - 1)]
        if fmt.schema not in allowed.get(formal.type_str, {formal.type_str}):
            return (f"ONNX {node.op_type}-{schema.since_version} has no "
                    f"{fmt.schema[7:-1]} form")
    return ""


def input_allows(node: ir.Node, index: int, opset: int, fmt: Format) -> bool:
    """Whether input ``index`` of ``node`` may be ``fmt`` (Resize's scales must stay fp32)."""
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain or "")
    except onnx.defs.SchemaError:
        return False
    if not schema.inputs:
        return False
    formal = schema.inputs[min(index, len(schema.inputs) - 1)]
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    return fmt.schema in allowed.get(formal.type_str, {formal.type_str})


def rule_island(node: ir.Node, opset: int, fmt: Format, long_axis: int) -> str:
    """Why ``node`` stays fp32 by rule, or '' when it may compute in ``fmt``."""
    marked = node.metadata_props.get(KEEP_FP32)
    if marked is not None:
        return f"marked {KEEP_FP32}: {marked}"
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return f"custom-domain op {node.domain}::{op}: its 16-bit semantics are unknown"
    if op in NORMS:
        return "norm statistics (mean/variance/RMS) stay fp32"
    if op in SOFTMAX:
        return "softmax max and sum stay fp32"
    if op in STATISTICS:
        return "a norm statistic (mean/variance/RMS reduction) stays fp32"
    if op in SUMS:
        n = _reduced_extent(node)
        if n is None or n >= long_axis:
            size = "an unknown number of" if n is None else str(n)
            return f"a reduction over {size} elements (long_axis {long_axis}) stays fp32"
    if op in RANDOM:
        return "random/dtype-attribute op stays fp32"
    why = _schema_allows(node, opset, fmt)
    if why:
        return why
    for i, x in enumerate(node.inputs):
        arr = const_array(x) if is_float(x) and input_allows(node, i, opset, fmt) else None
        if arr is not None and arr.size and float(np.abs(arr).max()) > fmt.max:
            return f"constant {x.name!r} reaches {float(np.abs(arr).max()):.3g} > {fmt.name} max"
    return ""


def _is_square(node: ir.Node) -> bool:
    if node.op_type == "Pow":
        exp = const_array(node.inputs[1])
        return exp is not None and exp.size == 1 and float(exp.ravel()[0]) == 2.0
    return node.op_type == "Mul" and node.inputs[0] is node.inputs[1]


def extend_statistics(graph: ir.Graph, islands: dict[ir.Node, str]) -> None:
    """Grow each statistic reduction's island over the square feeding it (x², which overflows
    fp16 first) and the elementwise ops that turn the statistic into the normaliser (+eps,
    sqrt, 1/x) while they read only the statistic and constants."""
    for node in [n for n in islands if n.op_type in STATISTICS or n.op_type == "ReduceSum"]:
        src = node.inputs[0].producer() if node.inputs[0] is not None else None
        if src is not None and src not in islands and _is_square(src):
            islands[src] = f"the square feeding the statistic {node.name!r} stays fp32"
        stack, chain = [node], {node}
        while stack:
            cur = stack.pop()
            for out in cur.outputs:
                for use in out.uses():
                    reader = use.node
                    if reader in islands or reader.op_type not in STAT_CHAIN:
                        continue
                    if all(x is None or const_array(x) is not None
                           or (x.producer() in chain) for x in reader.inputs):
                        islands[reader] = f"part of the statistic {node.name!r} stays fp32"
                        chain.add(reader)
                        stack.append(reader)


def candidates(graph: ir.Graph) -> list[ir.Node]:
    """Nodes that compute with float32 values (Constant nodes aside: constants are cast)."""
    return [n for n in graph if n.op_type != "Constant"
            and (any(is_float(x) for x in n.inputs) or any(is_float(y) for y in n.outputs)
                 or (n.op_type == "Cast" and n.attributes.get("to") is not None
                     and n.attributes["to"].as_int() == TensorProto.FLOAT))]


def round_cast(name: str, out: str, fmt: Format) -> list[onnx.NodeProto]:
    """``out = float(fmt(name))``: round to ``fmt`` (nearest even) in fp32."""
    return [helper.make_node("Cast", [name], [f"{out}__r16"], to=fmt.onnx_type),
            helper.make_node("Cast", [f"{out}__r16"], [out], to=TensorProto.FLOAT)]


def local_errors(model: onnx.ModelProto, names: Sequence[str], fmt: Format,
                 samples: Sequence[dict[str, np.ndarray]]) -> dict[str, tuple[float, float]]:
    """Per node (by name): its ``fmt`` output's relative L2 error against fp32 (max over
    samples, inf on overflow) and its fp32 output's max |y|, all nodes in one run."""
    g = model.graph
    pick = set(names)
    extra, probes, nodes = [], {}, []
    rounded: dict[str, str] = {}
    float_vals = _float_values(model)
    for node in g.node:
        if node.name not in pick:
            continue
        inputs = []
        for x in node.input:
            if x in float_vals:
                if x not in rounded:
                    rounded[x] = f"{x}__in16"
                    nodes += round_cast(x, rounded[x], fmt)
                x = rounded[x]
            inputs.append(x)
        outs = [f"{y}__raw16" for y in node.output]
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = f"{node.name}__probe16"
        del copy.input[:], copy.output[:]
        copy.input.extend(inputs)
        copy.output.extend(outs)
        nodes.append(copy)
        pairs = []
        for y, raw in zip(node.output, outs, strict=True):
            if y in float_vals:
                nodes += round_cast(raw, f"{y}__out16", fmt)
                pairs.append((y, f"{y}__out16"))
        probes[node.name] = pairs
        extra += [n for pair in pairs for n in pair]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.node.extend(nodes)
    have = {o.name for o in probe.graph.output}
    for name in dict.fromkeys(extra):
        if name not in have:
            probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    order = [o.name for o in probe.graph.output]
    session = ort_session(probe)
    result = {n: (0.0, 0.0) for n in probes}
    for sample in samples:
        try:
            got = dict(zip(order, session.run(None, dict(sample)), strict=True))
        except Exception as exc:  # ORT raises several unrelated types
            raise EdgekitError(f"onnxruntime failed measuring per-op error: {first_line(exc)}") \
                from exc
        for name, pairs in probes.items():
            err, peak = result[name]
            for y, yh in pairs:
                r, h = np.asarray(got[y]), np.asarray(got[yh])
                finite = np.isfinite(r)
                if not finite.all():
                    r, h = r[finite], h[finite]
                if r.size:
                    peak = max(peak, float(np.abs(r).max()))
                if not np.isfinite(h).all():  # overflow where the fp32 value is finite
                    err = float("inf")
                    continue
                # sums of squares in float64 (no BLAS: its threads fight on a busy machine)
                den = float(np.sqrt(np.sum(np.square(r, dtype=np.float64))))
                num = float(np.sqrt(np.sum(np.square(h - r, dtype=np.float64))))
                err = max(err, num / den if den else (0.0 if num == 0 else float("inf")))
            result[name] = (err, peak)
    return result


def _float_values(model: onnx.ModelProto) -> set[str]:
    """Names of the model's float32 values (inputs, initializers, node outputs)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    vals = {v.name for v in [*g.input, *g.value_info, *g.output]
            if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    vals |= {t.name for t in g.initializer if t.data_type == TensorProto.FLOAT}
    for n in g.node:
        if n.op_type == "Constant":
            t = next((a.t for a in n.attribute if a.name == "value"), None)
            if t is not None and t.data_type == TensorProto.FLOAT:
                vals.update(n.output)
    return vals


class _Names:
    """Fresh value/node names for what ``convert`` inserts."""

    def __init__(self, graph: ir.Graph):
        self.used = set(graph.initializers) | {v.name for v in graph.inputs}
        self.used |= {v.name for n in graph for v in n.outputs} | {n.name for n in graph}

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.used:
            name, i = f"{base}_{i}", i + 1
        self.used.add(name)
        return name


def convert(model: ir.Model, half: set[ir.Node], fmt: Format,
            stored: frozenset[ir.Node] = frozenset()) -> None:
    """Rewrite ``model`` so the nodes in ``half`` compute in ``fmt`` and the rest in fp32;
    the fp32 nodes in ``stored`` read their float constants from ``fmt`` copies through a
    Cast (the weights take ``fmt``'s bytes and rounding, the arithmetic stays fp32)."""
    graph = model.graph
    fresh = _Names(graph)
    floats = {x for n in graph for x in (*n.inputs, *n.outputs) if is_float(x)}
    floats |= {x for x in graph.inputs if is_float(x)}
    consts: dict[str, ir.Value] = {}
    casts: dict[tuple[str, int], ir.Value] = {}
    opset = graph.opset_imports.get("", 1)
    produced_half: set[ir.Value] = set()

    def cast(x: ir.Value, to: int, anchor: ir.Node, after: bool) -> ir.Value:
        node = ir.node("Cast", [x], {"to": to}, name=fresh(f"{x.name}_Cast"))
        y = node.outputs[0]
        y.name = fresh(f"{x.name}_to{fmt.name if to == fmt.onnx_type else 'fp32'}")
        y.type = ir.TensorType(fmt.ir_type if to == fmt.onnx_type else FLOAT)
        y.shape = x.shape
        (graph.insert_after if after else graph.insert_before)(anchor, node)
        return y

    def cast_once(x: ir.Value, to: int, reader: ir.Node) -> ir.Value:
        if (x.name, to) not in casts:
            src = x.producer()
            casts[x.name, to] = cast(x, to, src, True) if src is not None else cast(
                x, to, next(iter(graph)), False)  # a graph input: cast before everything
        return casts[x.name, to]

    def half_const(x: ir.Value, arr: np.ndarray) -> ir.Value:
        if x.name not in consts:
            name = fresh(f"{x.name}_{fmt.name}")
            tensor = ir.tensor(np.ascontiguousarray(arr.astype(fmt.numpy)), name=name)
            value = ir.Value(name=name, shape=ir.Shape(tensor.shape.numpy()),
                             type=ir.TensorType(fmt.ir_type), const_value=tensor)
            graph.register_initializer(value)
            consts[x.name] = value
        return consts[x.name]

    for node in list(graph):
        in_half = node in half
        for i, x in enumerate(node.inputs):
            if x is None:
                continue
            wants_half = in_half and x in floats and input_allows(node, i, opset, fmt)
            if x in produced_half and not wants_half:
                node.replace_input_with(i, cast_once(x, TensorProto.FLOAT, node))
            elif node in stored and is_float(x) and _storable(arr := const_array(x), fmt):
                node.replace_input_with(i, cast_once(half_const(x, arr), TensorProto.FLOAT, node))
            elif wants_half and x not in produced_half:
                arr = const_array(x)
                node.replace_input_with(i, half_const(x, arr) if arr is not None
                                        else cast_once(x, fmt.onnx_type, node))
        if not in_half:
            continue
        if node.op_type == "Cast" and node.attributes["to"].as_int() == TensorProto.FLOAT:
            node.attributes["to"] = ir.AttrInt64("to", fmt.onnx_type)
        if node.op_type == "ConstantOfShape" and "value" in node.attributes:
            t = node.attributes["value"].as_tensor()
            if t.dtype == FLOAT:
                node.attributes["value"] = ir.AttrTensor(
                    "value", ir.tensor(t.numpy().astype(fmt.numpy)))
        for y in node.outputs:
            if y in floats or (node.op_type in ("Cast", "ConstantOfShape") and is_float(y)):
                y.type = ir.TensorType(fmt.ir_type)
                produced_half.add(y)
    for i, y in enumerate(list(graph.outputs)):
        if y in produced_half:  # declared types stay: fp32 out through one Cast
            back = cast(y, TensorProto.FLOAT, y.producer(), True)
            name = y.name
            y.name = fresh(f"{name}_{fmt.name}")
            back.name = name
            graph.outputs[i] = back


def _storable(arr: np.ndarray | None, fmt: Format) -> bool:
    """A constant worth storing in ``fmt`` (a weight, not a scalar) that fits its range."""
    return arr is not None and arr.size > 1 and float(np.abs(arr).max()) <= fmt.max


def ort_form(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model as onnxruntime's CPU provider runs it: unchanged without bfloat16, else
    bfloat16 emulated in fp32 (module docstring)."""
    g = model.graph
    if not any(t.data_type == TensorProto.BFLOAT16 for t in g.initializer) and not any(
            a.i == TensorProto.BFLOAT16 for n in g.node if n.op_type == "Cast"
            for a in n.attribute if a.name == "to"):
        return model
    typed = onnx.shape_inference.infer_shapes(model)
    bf16 = {v.name for v in [*typed.graph.value_info, *typed.graph.output]
            if v.type.tensor_type.elem_type == TensorProto.BFLOAT16}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.value_info[:]
    for i, t in enumerate(out.graph.initializer):
        if t.data_type == TensorProto.BFLOAT16:
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(
                numpy_helper.to_array(t).astype(np.float32), t.name))
    for v in out.graph.output:
        if v.type.tensor_type.elem_type == TensorProto.BFLOAT16:
            v.type.tensor_type.elem_type = TensorProto.FLOAT
    nodes = []
    for node in out.graph.node:
        for a in node.attribute:
            if node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.BFLOAT16:
                a.i = TensorProto.FLOAT
            if a.name == "value" and a.t.data_type == TensorProto.BFLOAT16:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t)
                                                     .astype(np.float32), a.t.name))
        rounds = []
        for k, y in enumerate(node.output):
            if y in bf16:
                node.output[k] = f"{y}__f32"
                rounds += round_cast(f"{y}__f32", y, BF16)
        nodes += [node, *rounds]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the float initializers (any width)."""
    floats = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)
    return sum(int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(
        t.data_type).itemsize for t in model.graph.initializer if t.data_type in floats)


def _subgraph_node(graph: ir.Graph) -> ir.Node | None:
    for node in graph:
        if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
               for a in node.attributes.values()):
            return node
    return None


def _outputs_cosine(before: onnx.ModelProto, after: onnx.ModelProto,
                    samples: Sequence[dict[str, np.ndarray]]) -> np.ndarray:
    """Cosine of each float output of ``after`` (ort_form) against ``before``, per sample."""
    ref, new = ort_session(before), ort_session(ort_form(after))
    cos = []
    for s in samples:
        for r, y in zip(ref.run(None, dict(s)), new.run(None, dict(s)), strict=True):
            if np.asarray(r).dtype.kind != "f" or not np.asarray(r).size:
                continue
            r, y = np.asarray(r, np.float64).ravel(), np.asarray(y, np.float64).ravel()
            den = float(np.linalg.norm(r) * np.linalg.norm(y))
            cos.append(float(r @ y) / den if den else float(not r.any() and not y.any()))
    return np.array(cos or [1.0])


def _live_weight_bytes(graph: ir.Graph) -> int:
    return sum(v.const_value.nbytes for v in graph.initializers.values()
               if v.const_value is not None and (v.uses() or v.is_graph_output())
               and v.dtype in (FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16))


def run(model: ir.Model, ctx, fmt: Format, op_error: float, long_axis: int):
    """The shared body of ``convert-fp16`` / ``convert-bf16``: islands by rule, per-op error
    on ``ctx``'s real samples (the seeded ones only with ``ctx.seeded``), islands by
    measurement, the rewrite; fills and returns ``ctx.report`` (a ``core.PassReport``)."""
    report, graph = ctx.report, model.graph
    if not op_error > 0 or long_axis < 2:
        raise EdgekitError(f"convert-{fmt.name}: op_error must be > 0 and long_axis >= 2")
    sub = _subgraph_node(graph)
    if sub is not None:
        raise Refused(f"{sub.op_type} holds subgraphs: control flow is not converted "
                      "(its body would keep fp32 types while its inputs turn 16-bit)",
                      sub.name or "")
    nodes = candidates(graph)
    if not nodes:
        raise Refused("the graph has no float32 computation to convert")
    samples = ctx.real_samples or (list(ctx.samples) if ctx.seeded else [])
    if not samples:
        raise Refused("the per-op error is measured on real inputs and none were given: pass "
                      "--calibration FILE.npz")
    fresh = _Names(graph)
    seen: set[str] = set()
    for node in graph:  # the per-op table is keyed by node name
        if not node.name or node.name in seen:
            node.name = fresh(f"{node.op_type}_node")
        seen.add(node.name)
    opset = graph.opset_imports.get("", graph.opset_imports.get("ai.onnx", 1))
    islands = {n: why for n in nodes if (why := rule_island(n, opset, fmt, long_axis))}
    extend_statistics(graph, islands)
    before = ir.to_proto(model)
    errors = local_errors(before, [n.name for n in nodes], fmt, samples)
    for node in nodes:
        err, peak = errors[node.name]
        if node not in islands and err > op_error:
            over = f", max |y| {peak:.3g} > {fmt.max:g}" if peak > fmt.max else ""
            islands[node] = (f"measured: {fmt.name} error {err:.3g} > op_error {op_error:g} "
                             f"on {len(samples)} samples{over}")
    half = {n for n in nodes if n not in islands}
    if not half:
        raise Refused(f"every float op stays fp32 ({len(islands)} islands): nothing to convert")
    # an op that stays fp32 only because its schema lacks fmt (Conv before opset 22 for
    # bfloat16) still takes its weights in fmt: the model's size is what the user asked for
    stored = frozenset(n for n, why in islands.items() if why == _schema_allows(n, opset, fmt))
    weights_before = _live_weight_bytes(graph)
    convert(model, half, fmt, stored)
    for node in nodes:
        if node in half:
            report.change(f"{fmt.name} {node.op_type}")
        else:
            kept = f"; weights stored in {fmt.name}" if node in stored else ""
            report.skip(node.name, f"fp32 island: {islands[node]}{kept}")
    cos = _outputs_cosine(before, ir.to_proto(model), samples)
    total = sum(e for e, _ in errors.values() if np.isfinite(e)) or 1.0
    rows = [{"node": n.name, "op": n.op_type, "precision": fmt.name if n in half else "fp32",
             "rel_error": errors[n.name][0], "max_abs": errors[n.name][1],
             "error_share": errors[n.name][0] / total if np.isfinite(errors[n.name][0]) else 1.0,
             "act_sqnr_db": -20 * float(np.log10(errors[n.name][0]))
             if 0 < errors[n.name][0] < float("inf") else None,
             "act_scale": None, "act_zero_point": None,
             "island": islands.get(n, "")} for n in nodes]
    report.details.update(
        format=fmt.name, op_error=op_error, samples=len(samples),
        islands={n.name: why for n, why in islands.items()},
        locator=sorted(rows, key=lambda r: -r["rel_error"]),
        cosine={"mean": float(cos.mean()), "min": float(cos.min()), "samples": len(samples)},
        weight_bytes={"before": weights_before, "after": _live_weight_bytes(graph)})
    return report
