"""fold-constants: evaluate once every node whose inputs are all constants; store the results.

A node whose inputs are all constants (initializers, Constant nodes, or outputs of such
nodes) computes the same tensor on every run, so replacing its outputs by initializers
holding that tensor changes nothing the model computes. The evaluation is onnxscript's
constant folder (``onnxscript.optimizer.fold_constants``, the ONNX reference implementation
of each op, run in the op's own dtype), which also folds ``Shape``/``Size`` of values whose
shape is static and drops no-op ``Reshape``/``Cast``/``Expand``. Typical finds:
``ConstantOfShape`` weights (the onnx light-zoo models build every weight that way, so
``fold-bn`` sees no constant BatchNorm parameters until this pass has run), Transpose, Reshape
or Cast of weights, shape arithmetic on static shapes. Constant nodes left over become
initializers too (TVM's importer rejects ``Constant(value_ints)``). A node the reference
implementation fails to evaluate (onnx 1.23's GatherElements on a table wider than 64 along
the gathered axis: TorchScript BERT exports build their position ids that way) is evaluated
once more by onnxruntime, alone in a one-node model, and folding resumes after it.

Preconditions and limits: a graph input, even one with an initializer (an overridable
default), is not a constant. Random ops (RandomNormal...) and control flow are not folded. A
result with more than ``max_elements`` elements is not stored unless folding removes at
least as many constant elements (it would grow the file: a 100M-element ConstantOfShape is
smaller computed than stored); such nodes are listed as skipped with their size.
"""

from __future__ import annotations

import logging
import math
from collections import Counter

import numpy as np
import onnx_ir as ir
import onnxscript.optimizer
from onnx_ir.passes.common import (
    LiftConstantsToInitializersPass,
    RemoveUnusedNodesPass,
    ShapeInferencePass,
)

from edgekit.errors import first_line
from edgekit.passes.core import Pass, PassContext, PassRefused, PassReport

_RANDOM = ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
           "Multinomial", "Bernoulli")


def _op_counts(graph: ir.Graph) -> Counter:
    return Counter(n.op_type for n in graph if n.op_type != "Constant")


def _is_constant(value: ir.Value | None) -> bool:
    return value is None or (value.const_value is not None and not value.is_graph_input())


def _why_left(node: ir.Node, max_elements: int) -> str:
    """Why a node computing from constants only is still in the graph."""
    if node.op_type in _RANDOM:
        return "random op: not a constant"
    sizes = [math.prod(o.shape.numpy()) if o.shape is not None and o.shape.is_static()
             else None for o in node.outputs]
    if any(s is not None and s > max_elements for s in sizes):
        return f"result of {max(s for s in sizes if s is not None)} elements is over " \
               f"max_elements={max_elements}"
    return f"the constant folder does not evaluate {node.op_type} here"


def _fold_with_onnxruntime(model: ir.Model, max_elements: int) -> int:
    """Replace the outputs of constant-input nodes the folder left by onnxruntime's results."""
    graph, done = model.graph, 0
    outputs = set(map(id, graph.outputs))
    for node in list(graph):
        if (node.op_type in (*_RANDOM, "Constant") or node.domain not in ("", "ai.onnx")
                or not node.inputs or not all(map(_is_constant, node.inputs))
                or any(id(o) in outputs for o in node.outputs)
                or any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                       for a in node.attributes.values())):
            continue
        if any(o.shape is not None and o.shape.is_static() and math.prod(o.shape.numpy())
               > max_elements for o in node.outputs):
            continue  # known to be too large to store: do not even compute it
        try:
            results = _run_alone(node, model.opset_imports.get("", 17))
        except Exception:  # noqa: BLE001 - it stays in the graph, listed as skipped
            continue
        if any(r.size > max_elements for r in results):
            continue
        for out, arr in zip(node.outputs, results, strict=True):
            const = ir.node("Constant", [], attributes={"value": ir.tensor(arr)})
            graph.insert_before(node, const)
            ir.convenience.replace_all_uses_with(out, const.outputs[0])
        graph.remove(node, safe=True)
        done += 1
    return done


def _static(graph: ir.Graph) -> bool:
    return all(out.shape is not None and out.shape.is_static()
               for node in graph for out in node.outputs)


def _infer_shapes_again(model: ir.Model) -> None:
    """Shapes inferred while some values were not yet constants are stale (onnxscript's folder
    keeps the shapes it is given): clear and infer them again, so Shape of a now-static value
    folds in the next round."""
    outputs = set(map(id, model.graph.outputs))
    values = [*model.graph.initializers.values(), *(o for n in model.graph for o in n.outputs)]
    for value in values:
        if value.const_value is not None:  # the folder may keep a symbolic shape on its result
            value.shape = ir.Shape(value.const_value.shape)
        elif id(value) not in outputs:
            value.shape = None
    ShapeInferencePass()(model)  # in place


def _run_alone(node: ir.Node, opset: int) -> list[np.ndarray]:
    from onnx import helper, numpy_helper

    from edgekit.verify import run_ort

    proto = ir.serde.serialize_node(node)
    names = [f"in{i}" for i in range(len(node.inputs))]
    outs = [f"out{i}" for i in range(len(node.outputs))]
    inits = [numpy_helper.from_array(v.const_value.numpy(), n)
             for v, n in zip(node.inputs, names, strict=True) if v is not None]
    one = helper.make_node(proto.op_type, [n if v is not None else "" for v, n in
                                           zip(node.inputs, names, strict=True)], outs,
                           domain=proto.domain)
    one.attribute.extend(proto.attribute)
    graph = helper.make_graph([one], "one", [], [helper.make_empty_tensor_value_info(o)
                                                 for o in outs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return run_ort(model, {})


def apply(model: ir.Model, ctx: PassContext, *, max_elements: int = 1 << 22) -> PassReport:
    report, graph = ctx.report, model.graph  # exact: no samples needed
    before = _op_counts(graph)
    bytes_before = sum(v.const_value.nbytes for v in graph.initializers.values()
                       if v.const_value is not None)
    # ConstantOfShape is on onnxscript's keep list (it can expand a tiny shape into a huge
    # tensor); output_size_limit still bounds what is stored, so fold it like any other op
    folder_log = logging.getLogger("onnxscript.optimizer._constant_folding")
    level = folder_log.level
    folder_log.setLevel(logging.ERROR)  # "Evaluation failed" per node: reported as skipped below
    by_ort = 0
    try:
        for _ in range(16):  # the folder, onnxruntime on what it left, fresh shapes; again
            count = sum(n.op_type != "Constant" for n in graph)
            onnxscript.optimizer.fold_constants(
                model, input_size_limit=max_elements, output_size_limit=max_elements,
                should_fold=lambda n: True if n.op_type == "ConstantOfShape" else None)
            by_ort += _fold_with_onnxruntime(model, max_elements)
            if sum(n.op_type != "Constant" for n in graph) == count or _static(graph):
                break
            _infer_shapes_again(model)
    except Exception as exc:  # noqa: BLE001 - the folder's evaluator failed on some node
        raise PassRefused(f"onnxscript's constant folder failed: {first_line(exc)}") from None
    finally:
        folder_log.setLevel(level)
    RemoveUnusedNodesPass()(model)
    constants = sum(n.op_type == "Constant" for n in graph)
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    lifted = constants - sum(n.op_type == "Constant" for n in graph)
    for op, n in (before - _op_counts(graph)).items():
        report.change(op, n)
    if lifted:
        report.change("Constant-to-initializer", lifted)
    if by_ort:
        report.change("evaluated-by-onnxruntime", by_ort)
    for node in graph:
        if node.op_type != "Constant" and node.inputs and all(map(_is_constant, node.inputs)):
            report.skip(node.name or node.op_type, _why_left(node, max_elements))
    report.details["initializer_bytes"] = {
        "before": bytes_before,
        "after": sum(v.const_value.nbytes for v in graph.initializers.values()
                     if v.const_value is not None)}
    return report


PASS = Pass(
    name="fold-constants",
    summary="evaluate subgraphs of constants (ConstantOfShape, Shape of static shapes, "
            "Reshape/Transpose/Cast of weights) into initializers",
    exact=True,
    apply=apply,
)
