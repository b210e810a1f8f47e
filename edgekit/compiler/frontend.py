"""ONNX -> Relax: the unsupported-op report, two ONNX tidy-ups, the import, the Relax rewrites.

Steps of ``to_relax``:

1. ``tidy_onnx`` (onnx-ir): Constant nodes become initializers (TVM cannot read
   ``Constant(value_ints)``); n-ary Sum becomes a chain of Add; a Dropout whose mask is unused
   becomes Identity; QLinearMatMul/QLinearConv/ConvInteger become QDQ (see ``tidy_onnx``);
2. ``unsupported_nodes``: every op TVM's ONNX frontend has no converter for, all of them with
   node names, before trying (one ``EdgekitError``);
3. TVM's ONNX import with static input shapes;
4. ``relax_rewrites``: one ``tvm.transform.Sequential`` of edgekit's Relax module passes, in
   order ``LowerQDQ``, ``Int8Kernels``, ``BoundedTake``, ``FastMath``, ``SplitGroupedConvs``,
   ``ChannelsLast``, ``PropagateNaN``, ``ExactQuantize`` (each module
   of this package says what it rewrites and why TVM's own pass was not enough).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

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


def tidy_onnx(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with Constant nodes lifted to initializers and two ops TVM imports badly
    rewritten (the input is not modified):

    - n-ary Sum -> a chain of Add, ((a + b) + c) ...: the same float sums in the same order
      (TVM imports Sum as stack + reduce: a copy of every input into a 5-D tensor);
    - Dropout (inference: the identity) whose mask output is unused -> Identity (TVM imports
      it as a tuple-valued op that the layout pass cannot follow);
    - QLinearMatMul, QLinearConv, ConvInteger (no TVM converter) -> their QDQ form
      (``compiler.qlinear``)."""
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
    return ir.to_proto(work)


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
    from edgekit.compiler.fast_math import FastMath
    from edgekit.compiler.grouped_conv import SplitGroupedConvs
    from edgekit.compiler.int8_kernels import Int8Kernels
    from edgekit.compiler.nan_propagation import PropagateNaN
    from edgekit.compiler.qdq import ExactQuantize, LowerQDQ

    return tvm.transform.Sequential(
        [LowerQDQ(), Int8Kernels(), BoundedTake(), FastMath(), SplitGroupedConvs(),
         ChannelsLast(progress),
         PropagateNaN(), ExactQuantize()],
        name="edgekit.RelaxRewrites")


def to_relax(model: onnx.ModelProto, specs: Sequence[TensorSpec],
             progress: Progress = no_progress, tvm_target=None):
    """Import an ONNX model into a Relax IRModule with static input shapes: what both compiling
    and tuning lower (the steps are in the module docstring). ``tvm_target`` is put in scope
    for the Relax passes: `Int8Kernels` picks its instruction from it (default: this CPU)."""
    from tvm.relax.frontend import onnx as relax_onnx

    from edgekit.compiler.qlinear import CONVERTED

    model = tidy_onnx(model)
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
            shape_dict={s.name: list(s.shape) for s in specs},
            dtype_dict={s.name: s.dtype for s in specs},
        )
    except Exception as exc:
        raise EdgekitError(f"TVM's ONNX import failed: {last_line(exc)}") from exc
    if tvm_target is None:
        return relax_rewrites(progress)(mod)
    with tvm_target:  # passes that pick instructions (Int8Kernels) read the target in scope
        return relax_rewrites(progress)(mod)
