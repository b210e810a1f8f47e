"""fold-constants: subgraphs of constants become initializers, exactly; fold-bn then applies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from _bn_graphs import Graph, ops, run_checked, samples
from onnx import TensorProto, helper, numpy_helper

from edgekit.passes import fold_bn
from edgekit.passes.core import run_pass, run_pipeline
from edgekit.passes.fold_constants import PASS
from edgekit.verify import run_ort

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def _fill(g: Graph, name: str, shape: list[int], value: float) -> str:
    """``ConstantOfShape(shape)`` filled with ``value``: how the light-zoo models store weights."""
    g.const(f"{name}_shape", shape, np.int64)
    return g.node("ConstantOfShape", [f"{name}_shape"], name,
                  value=numpy_helper.from_array(np.array([value], g.dtype)))


def test_constant_of_shape_bn_params_fold_then_fold_bn_folds_into_conv():
    """The light-zoo pattern: BN parameters from ConstantOfShape are not constants to fold-bn
    until this pass has run; afterwards the BN folds into its conv."""
    g = Graph()
    y = g.node("Conv", [g.input("x", 1, 3, 6, 6), g.rand("w", 4, 3, 3, 3)], "conv",
               pads=[1, 1, 1, 1])
    params = [_fill(g, n, [4], v) for n, v in
              (("gamma", 1.5), ("beta", 0.25), ("mean", -0.5), ("var", 2.0))]
    model = g.model(g.node("BatchNormalization", [y, *params], "bn", epsilon=1e-3))
    _, alone = run_pass(model, fold_bn.PASS, fold_bn.PASS.params, samples(model))
    assert alone.status == "refused"  # fold-bn alone sees no constant parameters: says why
    assert alone.report.skipped[0] == (
        "bn", "parameter 'gamma' is computed from constants (ConstantOfShape) but not yet one: "
              "run fold-constants first (--passes fold-constants,fold-bn)")
    new, ledger = run_pipeline(model, [(PASS, PASS.params), (fold_bn.PASS, fold_bn.PASS.params)],
                               samples(model))
    assert [r.status for r in ledger] == ["applied", "applied"]
    assert dict(ledger[0].report.changed) == {"ConstantOfShape": 4}
    assert dict(ledger[1].report.changed) == {"into-conv": 1}
    assert [n.op_type for n in new.graph.node] == ["Conv"]
    assert ledger[0].max_rel == 0.0 and ledger[1].max_rel <= 1e-6


def test_weight_transforms_and_static_shapes_fold_exactly():
    """Transpose + Cast of a weight, and a Reshape target computed from Shape of a static
    input, all fold; what reads the graph input stays."""
    g = Graph()
    x = g.input("x", 2, 3, 8)
    w = g.node("Cast", [g.node("Transpose", [g.const("w64", g.rng.standard_normal((6, 8)),
                                                     np.float64)], "wt", perm=[1, 0])],
               "w32", to=TensorProto.FLOAT)
    shape = g.node("Shape", [x], "shape", end=2)
    target = g.node("Concat", [shape, g.const("minus1", [-1], np.int64)], "target", axis=0)
    y = g.node("Reshape", [g.node("MatMul", [x, w], "mm"), target], "y")
    model = g.model(y)
    new, report, err = run_checked(model, PASS)
    assert dict(report.changed) == {"Cast": 1, "Transpose": 1, "Shape": 1, "Concat": 1}
    assert sorted(n.op_type for n in new.graph.node) == ["MatMul", "Reshape"]
    assert err == 0.0 and not report.skipped


def test_constant_nodes_become_initializers():
    """Constant(value_ints), which TVM's importer rejects, is lifted to an initializer."""
    g = Graph()
    g.nodes.append(helper.make_node("Constant", [], ["s"], value_ints=[4, 3], name="s"))
    model = g.model(g.node("Reshape", [g.input("x", 3, 4), "s"], "y"))
    new, report, err = run_checked(model, PASS)
    assert dict(report.changed) == {"Constant-to-initializer": 1}
    assert [n.op_type for n in new.graph.node] == ["Reshape"]
    assert [list(numpy_helper.to_array(i)) for i in new.graph.initializer] == [[4, 3]]
    assert err == 0.0


def test_results_over_max_elements_stay_computed_with_the_reason():
    g = Graph()
    big = _fill(g, "big", [64, 64], 0.5)
    model = g.model(g.node("Add", [g.input("x", 64, 64), big], "y"))
    kept, report, _ = run_checked(model, PASS, max_elements=1000)
    assert not report.modified and ops(kept, "ConstantOfShape") == 1
    assert report.skipped == [("big", "result of 4096 elements is over max_elements=1000")]
    new, report, err = run_checked(model, PASS)
    assert dict(report.changed) == {"ConstantOfShape": 1} and err == 0.0
    assert report.details["initializer_bytes"] == {"before": 16, "after": 4096 * 4}


def test_overridable_initializer_and_plain_graph_are_left_alone():
    """An initializer that is also a graph input can be fed at run time: not a constant.
    A graph with nothing constant to compute is reported unchanged."""
    g = Graph()
    model = g.model(g.node("Relu", [g.node("Neg", [g.input("x", 2, 3)], "n")], "y"))
    _, run = run_pass(model, PASS, PASS.params, samples(model))
    assert run.status == "unchanged" and run.message == "found nothing this pass rewrites"
    g = Graph()
    bias = g.rand("bias", 3)
    g.inputs.append(helper.make_tensor_value_info("bias", TensorProto.FLOAT, [3]))
    model = g.model(g.node("Add", [g.input("x", 2, 3), g.node("Neg", [bias], "nb")], "y"))
    kept, run = run_pass(model, PASS, PASS.params, samples(model))
    assert run.status == "unchanged" and ops(kept, "Neg") == 1


def test_light_zoo_shufflenet_all_bns_fold_after_fold_constants():
    model = onnx.load(str(LIGHT / "light_shufflenet.onnx"))
    assert ops(model, "BatchNormalization") == 49
    data = samples(model)[:1]
    new, ledger = run_pipeline(model, [(PASS, PASS.params), (fold_bn.PASS, fold_bn.PASS.params)],
                               data)
    assert [r.status for r in ledger] == ["applied", "applied"]
    assert dict(ledger[0].report.changed) == {"ConstantOfShape": 243}
    assert dict(ledger[1].report.changed) == {"into-conv": 49}
    assert ops(new, "BatchNormalization") == ops(new, "ConstantOfShape") == 0


def test_a_node_the_folder_cannot_evaluate_stays_listed():
    """Reshape of 6 constant elements to (4,) fails in the folder: left in place, named."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["c", "s"], ["r"], name="bad"),
         helper.make_node("Add", ["x", "r"], ["y"], name="add")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ones(6, np.float32), "c"),
         numpy_helper.from_array(np.array([4], np.int64), "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    kept, run = run_pass(model, PASS, PASS.params, samples(model))
    assert run.status == "unchanged" and ops(kept, "Reshape") == 1
    assert run.report.skipped == [("bad", "the constant folder does not evaluate Reshape here")]


def test_what_the_reference_op_fails_on_onnxruntime_evaluates():
    """onnx 1.23's reference GatherElements fails on a table wider than 64 along the axis (a
    TorchScript BERT builds its position ids that way): onnxruntime evaluates it, and what
    depends on it folds too."""
    table = np.zeros((1, 80), np.int64)
    idx = np.arange(16, dtype=np.int64)[None]
    graph = helper.make_graph(
        [helper.make_node("GatherElements", ["table", "idx"], ["pos"], name="gather", axis=1),
         helper.make_node("Cast", ["pos"], ["posf"], to=TensorProto.FLOAT),
         helper.make_node("Add", ["x", "posf"], ["h"]),
         helper.make_node("Shape", ["posf"], ["shape"]),
         helper.make_node("Reshape", ["h", "shape"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(idx, "idx")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    new, run = run_pass(model, PASS, PASS.params, samples(model))
    assert run.status == "applied", run.message
    assert run.report.changed["evaluated-by-onnxruntime"] == 1
    assert ops(new, "GatherElements") == ops(new, "Shape") == 0
    x = samples(model)[0]["x"]
    assert np.array_equal(run_ort(new, {"x": x})[0], x)
