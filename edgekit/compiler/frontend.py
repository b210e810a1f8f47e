"""ONNX -> Relax: the unsupported-op report, two ONNX tidy-ups, the import, the Relax rewrites.

Steps of ``to_relax``:

1. ``tidy_onnx`` (onnx-ir): Constant nodes become initializers (TVM cannot read
   ``Constant(value_ints)``); n-ary Sum becomes a chain of Add; a Dropout whose mask is unused
   becomes Identity; a ConstantOfShape of an empty shape becomes its scalar;
   QLinearMatMul/QLinearConv/ConvInteger become QDQ (see ``tidy_onnx``);
2. ``unsupported_nodes``: every op TVM's ONNX frontend has no converter for, all of them with
   node names, before trying (one ``EdgekitError``);
3. TVM's ONNX import; a symbolic dim (a name in a spec's shape, ``edgekit.shapes``) becomes one
   Relax/TIR shape variable shared by every input that names it, its upper bound attached as
   the ``tir_var_upper_bound`` attribute of ``main`` (Relax's memory planning then plans
   every buffer at its largest size, constant across calls; without it a buffer of symbolic
   size is left to the runtime allocator on every call).
   Before it, ``Range(0, n, 1)`` over a symbolic length ``n`` becomes a slice of a constant
   ``0 .. hi - 1`` (``symbolic_ranges``): TVM imports Range through a tensor and a fresh
   shape variable, which loses ``n == seq`` and with it every shape downstream;
4. ``relax_rewrites``: one ``tvm.transform.Sequential`` of edgekit's Relax module passes, in
   order ``LowerQDQ``, ``Int8Kernels``, ``GatherDequantized``, ``BoundedTake``, ``FastMath``,
   ``SplitGroupedConvs``, ``ChannelsLast``, ``PackConvWeights``, ``PackMatmulWeights``,
   ``PropagateNaN``, ``ExactQuantize`` (each module
   of this package says what it rewrites and why TVM's own pass was not enough).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnx

from edgekit.compiler.progress import Progress, no_progress
from edgekit.errors import EdgekitError, last_line
from edgekit.verify import TensorSpec

if TYPE_CHECKING:
    import onnx_ir as ir


def unsupported_nodes(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """(op_type, node name) of every node TVM's ONNX frontend has no converter for."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    from edgekit.compiler.qlinear import CONVERTED  # tidy_onnx rewrites them into QDQ

    known = set(_get_convert_map()) | {"Constant", "If"} | set(CONVERTED)
    missing = []
    for i, node in enumerate(model.graph.node):
        if node.domain not in ("", "ai.onnx") or node.op_type not in known:
            missing.append((node.op_type, node.name or f"node #{i}"))
        elif node.op_type == "Constant" and any(
                a.name in ("value_ints", "value_floats", "value_strings") for a in node.attribute):
            missing.append((f"Constant({node.attribute[0].name})", node.name or f"node #{i}"))
    return missing


def tidy_onnx(model: onnx.ModelProto, specs: Sequence[TensorSpec] = (),
              bounds: Mapping[str, tuple[int, int]] | None = None) -> onnx.ModelProto:
    """The model with Constant nodes lifted to initializers and two ops TVM imports badly
    rewritten (the input is not modified):

    - n-ary Sum -> a chain of Add, ((a + b) + c) ...: the same float sums in the same order
      (TVM imports Sum as stack + reduce: a copy of every input into a 5-D tensor);
    - Dropout (inference: the identity) whose mask output is unused -> Identity (TVM imports
      it as a tuple-valued op that the layout pass cannot follow);
    - ``ConstantOfShape`` of a constant empty shape (a scalar; the TorchScript exporter
      writes one in transformers' BERT attention mask) -> that scalar (TVM's converter
      broadcasts to a shape of rank 0 and fails);
    - QLinearMatMul, QLinearConv, ConvInteger (no TVM converter) -> their QDQ form
      (``compiler.qlinear``);
    - ``Range(0, n, 1)`` over an input's length: ``symbolic_ranges`` (``specs`` give the
      inputs' shapes, ``bounds`` the symbolic dims' bounds)."""
    import onnx_ir as ir
    from onnx_ir.passes.common import LiftConstantsToInitializersPass

    from edgekit.compiler.qlinear import to_qdq

    work = ir.from_proto(model)
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(work)
    graph = work.graph
    to_qdq(graph, _replace)  # QLinearMatMul, QLinearConv, ConvInteger -> QDQ form
    for i, node in enumerate(list(graph)):
        name = node.name or f"{node.op_type}#{i}"
        if node.domain == "" and node.op_type == "Sum" and len(node.inputs) >= 2:
            _replace(graph, node, _add_chain(node, name))
        elif (node.domain == "" and node.op_type == "Dropout" and len(node.inputs) == 1
              and not any(v.uses() or v.is_graph_output() for v in node.outputs[1:])):
            _replace(graph, node, [ir.Node("", "Identity", node.inputs[:1], name=name)])
        elif node.domain == "" and node.op_type == "ConstantOfShape" and _empty(node.inputs[0]):
            value = node.attributes.get("value")
            scalar = (value.as_tensor().numpy() if value is not None
                      else np.zeros(1, np.float32)).reshape(())
            init = ir.Value(name=f"{name}_scalar", const_value=ir.tensor(scalar))
            graph.register_initializer(init)
            _replace(graph, node, [ir.Node("", "Identity", [init], name=name)])
    symbolic_ranges(graph, {s.name: s.shape for s in specs}, bounds or {})
    return ir.to_proto(work)


def symbolic_ranges(graph: ir.Graph, shapes: Mapping[str, Sequence], bounds: Mapping[str, tuple[
        int, int]]) -> int:
    """Rewrite ``Range(0, n, 1)`` where ``n`` is one dim of a tensor's shape (``Squeeze`` or
    ``Gather`` of ``Shape(x)``): a symbolic dim with bounds becomes
    ``Slice(arange(hi), [0], Shape(x)[axis:axis + 1])``, the same values for every ``n`` inside
    the bounds (``n <= hi``), whose length TVM's import keeps as the shape variable; a static
    dim becomes the constant ``arange(n)``. (TVM imports Range through a tensor and a fresh
    shape variable even for a static ``n``: a model exported with dynamic axes then fails to
    import with ``n`` fixed.) ``shapes``: the graph inputs' declared shapes. Returns the count."""
    import onnx_ir as ir

    count = 0
    for i, node in enumerate(list(graph)):
        if node.domain != "" or node.op_type != "Range" or len(node.inputs) != 3:
            continue
        start, delta = (_scalar(v) for v in (node.inputs[0], node.inputs[2]))
        found = _dim_source(node.inputs[1])
        if start != 0 or delta != 1 or found is None:
            continue
        x, axis = found
        declared = shapes.get(x.name) if x.is_graph_input() else None
        rank = len(declared) if declared is not None else (
            len(x.shape) if x.shape is not None else 0)
        axis = axis + rank if axis < 0 else axis
        if declared is not None:
            dim = declared[axis] if 0 <= axis < rank else None
        else:
            shape = x.shape
            dim = getattr(shape[axis], "value", None) if 0 <= axis < rank else None
        if isinstance(dim, str) and dim in bounds:
            size = bounds[dim][1]
        elif isinstance(dim, int) and dim >= 0:
            size = dim
        else:
            continue
        dtype = node.outputs[0].dtype or ir.DataType.INT64
        table = ir.Value(name=f"{node.name or i}__arange",
                         const_value=ir.tensor(np.arange(size).astype(dtype.numpy())))
        graph.register_initializer(table)
        count += 1
        if isinstance(dim, int):  # a static length: the range is a constant
            _replace(graph, node, [ir.Node("", "Identity", [table], name=f"{node.name or i}")])
            continue
        zero = ir.Value(name=f"{node.name or i}__zero",
                        const_value=ir.tensor(np.zeros(1, np.int64)))
        graph.register_initializer(zero)
        length = ir.Node("", "Shape", [x], attributes=[ir.AttrInt64("start", axis),
                                                        ir.AttrInt64("end", axis + 1)],
                         name=f"{node.name or i}__len")
        sliced = ir.Node("", "Slice", [table, zero, length.outputs[0], zero],
                         name=f"{node.name or i}__slice")
        _replace(graph, node, [length, sliced])
    return count


def _empty(value: ir.Value | None) -> bool:
    """Whether ``value`` is a constant with no elements (an empty shape)."""
    const = None if value is None else value.const_value
    return const is not None and const.size == 0


def _scalar(value: ir.Value | None) -> float | None:
    """The single element of a constant value, else None."""
    if value is None or value.const_value is None:
        return None
    array = value.const_value.numpy()
    return array.reshape(-1)[0].item() if array.size == 1 else None


def _dim_source(value: ir.Value | None) -> tuple[ir.Value, int] | None:
    """(x, axis) when ``value`` is one dim of ``x``'s shape: ``Squeeze`` / ``Reshape`` /
    ``Cast`` of ``Shape(x, start=a, end=a + 1)``, or ``Gather(Shape(x), a)``."""
    node = value.producer() if value is not None else None
    if node is None or node.domain != "":
        return None
    if node.op_type in ("Squeeze", "Reshape", "Cast", "Identity"):
        return _dim_source(node.inputs[0])
    if node.op_type == "Shape":
        rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
        start = node.attributes.get_int("start", 0)
        end = node.attributes.get_int("end", rank if rank is not None else 0)
        if rank is not None:
            start, end = (a + rank if a < 0 else a for a in (start, end))
        return (node.inputs[0], start) if end - start == 1 else None
    if node.op_type == "Gather" and node.inputs[0] is not None:
        shape_of = node.inputs[0].producer()
        index = _scalar(node.inputs[1])
        if (shape_of is not None and shape_of.op_type == "Shape" and not shape_of.attributes
                and index is not None):
            return shape_of.inputs[0], int(index)
    return None


def _add_chain(node: ir.Node, name: str) -> list[ir.Node]:
    """``Add`` nodes summing ``node``'s inputs left to right (the last one stands for it)."""
    import onnx_ir as ir

    acc, adds = node.inputs[0], []
    for k, term in enumerate(node.inputs[1:], start=1):
        adds.append(ir.Node("", "Add", [acc, term], name=f"{name}__add{k}"))
        acc = adds[-1].outputs[0]
        if k < len(node.inputs) - 1:  # the last sum takes the original output's name
            acc.name = f"{name}__sum{k}"
    return adds


def _replace(graph: ir.Graph, old: ir.Node, new: list[ir.Node]) -> None:
    """Put ``new`` where ``old`` was; the last new node's output takes over ``old``'s first
    output (name, type, readers, graph output)."""
    import onnx_ir as ir

    ir.convenience.replace_nodes_and_values(graph, old, [old], new, old.outputs[:1],
                                            new[-1].outputs[:1])


def relax_rewrites(progress: Progress = no_progress):
    """edgekit's Relax module passes, in the order ``to_relax`` runs them: Gather in clip mode,
    fast float32 math, narrow grouped convs split per group (which needs NCHW, so before the
    layout change), 2-D convs in NHWC, then NaN-propagating relu/clip/max/min (late: the
    layout pass follows ``nn.relu`` and ``clip`` through, not the kernels they become).
    First of all, QDQ matmuls/convs become integer ones (``LowerQDQ``: later passes see the
    int8 ops), then those with constant weights become packed-weight integer kernels
    (``Int8Kernels``); last, ``R.quantize`` becomes onnxruntime's QuantizeLinear compute
    (``ExactQuantize``: the layout pass follows ``R.quantize``, not a kernel)."""
    import tvm

    from edgekit.compiler.bounded_take import BoundedTake
    from edgekit.compiler.channels_last import ChannelsLast
    from edgekit.compiler.conv_layout import PackConvWeights
    from edgekit.compiler.fast_math import FastMath
    from edgekit.compiler.gather_dequantize import GatherDequantized
    from edgekit.compiler.grouped_conv import SplitGroupedConvs
    from edgekit.compiler.int8_kernels import Int8Kernels
    from edgekit.compiler.matmul_layout import PackMatmulWeights
    from edgekit.compiler.nan_propagation import PropagateNaN
    from edgekit.compiler.qdq import ExactQuantize, LowerQDQ

    return tvm.transform.Sequential(
        [LowerQDQ(), Int8Kernels(), GatherDequantized(), BoundedTake(), FastMath(),
         SplitGroupedConvs(), ChannelsLast(progress), PackConvWeights(), PackMatmulWeights(),
         PropagateNaN(), ExactQuantize()],
        name="edgekit.RelaxRewrites")


def to_relax(model: onnx.ModelProto, specs: Sequence[TensorSpec],
             progress: Progress = no_progress, tvm_target=None,
             dim_bounds: Mapping[str, tuple[int, int]] | None = None):
    """Import an ONNX model into a Relax IRModule: what both compiling and tuning lower (the
    steps are in the module docstring). ``tvm_target`` is put in scope for the Relax passes:
    `Int8Kernels` picks its instruction from it (default: this CPU). A spec's shape may name
    symbolic dims (``edgekit.shapes``); every name needs its inclusive ``dim_bounds``."""
    from tvm.relax.frontend import onnx as relax_onnx

    from edgekit import shapes
    from edgekit.compiler.qlinear import CONVERTED

    bounds = shapes.check_bounds({s.name: s.shape for s in specs}, dim_bounds or {})
    model = tidy_onnx(model, specs, bounds)
    missing = unsupported_nodes(model) + [  # the ones tidy_onnx could not convert
        (n.op_type, n.name or f"node #{i}") for i, n in enumerate(model.graph.node)
        if n.op_type in CONVERTED and n.domain in ("", "ai.onnx")]
    if missing:
        ops = sorted({op for op, _ in missing})
        where = ", ".join(f"{name} ({op})" for op, name in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise EdgekitError(
            f"TVM cannot convert {len(missing)} node(s), ops {', '.join(ops)}: {where}{more}")
    try:
        mod = relax_onnx.from_onnx(
            model,
            shape_dict=symbolic_shape_dict(specs),
            dtype_dict={s.name: s.dtype for s in specs},
        )
    except Exception as exc:
        raise EdgekitError(f"TVM's ONNX import failed: {last_line(exc)}") from exc
    if bounds:
        mod = with_dim_bounds(mod, bounds)
    if tvm_target is None:
        return relax_rewrites(progress)(mod)
    with tvm_target:  # passes that pick instructions (Int8Kernels) read the target in scope
        return relax_rewrites(progress)(mod)


def symbolic_shape_dict(specs: Sequence[TensorSpec]) -> dict[str, list]:
    """TVM's ``shape_dict``: ints stay, each symbolic name becomes one int64 ``tirx.Var``
    shared by every input that names it (so Relax knows the two lengths are equal)."""
    from tvm import tirx

    variables = {d: tirx.Var(d, "int64") for s in specs for d in s.shape if isinstance(d, str)}
    return {s.name: [variables[d] if isinstance(d, str) else int(d) for d in s.shape]
            for s in specs}


def with_dim_bounds(mod, bounds: Mapping[str, tuple[int, int]]):
    """``main`` annotated with its shape variables' bounds: ``tir_var_upper_bound`` (read by
    ``StaticPlanBlockMemory``: buffers planned once at the largest size) and
    ``tir_var_lower_bound`` (as TVM's own torch importer writes them)."""
    main = mod["main"]
    main = main.with_attr("tir_var_upper_bound", {k: hi for k, (_, hi) in bounds.items()})
    main = main.with_attr("tir_var_lower_bound", {k: lo for k, (lo, _) in bounds.items()})
    out = mod.clone()
    out["main"] = main
    return out
