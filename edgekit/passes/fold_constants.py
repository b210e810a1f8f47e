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
initializers too (TVM's importer rejects ``Constant(value_ints)``).

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

import onnx_ir as ir
import onnxscript.optimizer
from onnx_ir.passes.common import LiftConstantsToInitializersPass, RemoveUnusedNodesPass

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


def apply(model: ir.Model, ctx: PassContext, max_elements: int = 1 << 22) -> PassReport:
    del ctx  # exact: evaluates the same ops once, at rewrite time
    report, graph = PassReport(), model.graph
    before = _op_counts(graph)
    bytes_before = sum(v.const_value.nbytes for v in graph.initializers.values()
                       if v.const_value is not None)
    # ConstantOfShape is on onnxscript's keep list (it can expand a tiny shape into a huge
    # tensor); output_size_limit still bounds what is stored, so fold it like any other op
    folder_log = logging.getLogger("onnxscript.optimizer._constant_folding")
    level = folder_log.level
    folder_log.setLevel(logging.ERROR)  # "Evaluation failed" per node: reported as skipped below
    try:
        onnxscript.optimizer.fold_constants(
            model, input_size_limit=max_elements, output_size_limit=max_elements,
            should_fold=lambda n: True if n.op_type == "ConstantOfShape" else None)
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
    params={"max_elements": 1 << 22},
)
