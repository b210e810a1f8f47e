"""fold-bn: BatchNormalization folded into Conv/ConvTranspose/Gemm/MatMul, else Mul+Add."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from _bn_graphs import Graph, exported, ops, rel_error, run_checked, samples

from edgekit.passes.core import run_pass
from edgekit.passes.fold_bn import PASS


def _run(model: onnx.ModelProto, **params):
    return run_checked(model, PASS, **params)


def test_export_with_bn_preserved():
    """An unoptimised export keeps its 9 BNs; all fold into their convs, exactly."""
    _, model = exported("mobile-cnn", optimize=False)
    assert ops(model, "BatchNormalization") == 9
    new, report, err = _run(model)
    assert ops(new, "BatchNormalization") == 0 and ops(new, "Conv") == 9
    assert ops(new, "Mul") == ops(new, "Add") == 0
    assert dict(report.changed) == {"into-conv": 9} and not report.skipped
    assert err <= 1e-5 and rel_error(new, model) <= 1e-5


def test_default_export_leftover_bn_becomes_mul_add():
    """The exporter folds conv+BN itself; the identity-branch BNs of repvgg-cnn remain."""
    _, model = exported("repvgg-cnn")
    new, report, err = _run(model)
    assert ops(model, "BatchNormalization") == 3 and ops(new, "BatchNormalization") == 0
    assert dict(report.changed) == {"to-mul-add": 3} and ops(new, "Mul") == 3
    assert all("is also used by Conv" in r for _, r in report.skipped)
    assert err <= 1e-5


def test_fp64_export():
    _, model = exported("mobile-cnn", optimize=False, dtype="float64")
    new, report, err = _run(model)
    assert ops(new, "BatchNormalization") == 0 and dict(report.changed) == {"into-conv": 9}
    assert err <= 1e-10


# float64 runs in onnx's reference runtime, whose grouped ConvTranspose is broken: not tested
@pytest.mark.parametrize("op, group, bias, dtype, tol", [
    ("Conv", 1, True, np.float32, 1e-5), ("Conv", 2, False, np.float32, 1e-5),
    ("ConvTranspose", 1, True, np.float32, 1e-5), ("ConvTranspose", 2, False, np.float32, 1e-5),
    ("Conv", 1, True, np.float64, 1e-10), ("Conv", 2, False, np.float64, 1e-10),
    ("ConvTranspose", 1, True, np.float64, 1e-10)])
def test_into_preceding_conv(op, group, bias, dtype, tol):
    g = Graph(dtype)
    shape = (8, 4 // group, 3, 3) if op == "Conv" else (4, 8 // group, 3, 3)
    inputs = [g.input("x", 1, 4, 6, 6), g.rand("w", *shape)] + ([g.rand("b", 8)] if bias else [])
    y = g.node(op, inputs, "conv", pads=[1, 1, 1, 1], group=group)
    model = g.model(g.bn(y, 8, "bn"))
    new, report, err = _run(model)
    assert dict(report.changed) == {f"into-{op.lower()}": 1}
    assert [n.op_type for n in new.graph.node] == [op]
    assert new.graph.output[0].name == "bn"  # the graph output keeps its name
    assert err <= tol


@pytest.mark.parametrize("trans_b, bias, beta", [(0, True, 1.0), (1, True, 0.5), (1, False, 1.0)])
def test_into_preceding_gemm(trans_b, bias, beta):
    g = Graph()
    w = g.rand("w", *((6, 5) if trans_b else (5, 6)))
    inputs = [g.input("x", 3, 5), w] + ([g.rand("c", 6)] if bias else [])
    y = g.node("Gemm", inputs, "gemm", transB=trans_b, beta=beta, alpha=1.5)
    new, report, err = _run(g.model(g.bn(y, 6, "bn")))
    assert dict(report.changed) == {"into-gemm": 1} and ops(new, "BatchNormalization") == 0
    assert err <= 1e-5


@pytest.mark.parametrize("bias", [True, False])
def test_into_preceding_matmul(bias):
    g = Graph()
    y = g.node("MatMul", [g.input("x", 3, 5), g.rand("w", 5, 6)], "mm")
    if bias:
        y = g.node("Add", [g.rand("c", 6), y], "mm_bias")
    new, report, err = _run(g.model(g.bn(y, 6, "bn")))
    assert dict(report.changed) == {"into-matmul": 1}
    assert sorted(n.op_type for n in new.graph.node) == ["Add", "MatMul"]
    assert err <= 1e-5


def test_token_bn_through_transposes_into_linear():
    """BN over the channels of (B, N, C) tokens: Linear -> Transpose -> BN -> Transpose."""
    g = Graph()
    y = g.node("Add", [g.node("MatMul", [g.input("x", 2, 7, 5), g.rand("w", 5, 6)], "mm"),
                       g.rand("c", 6)], "linear")
    t = g.bn(g.node("Transpose", [y], "t", perm=[0, 2, 1]), 6, "bn")
    new, report, err = _run(g.model(g.node("Transpose", [t], "back", perm=[0, 2, 1])))
    assert dict(report.changed) == {"into-matmul": 1}
    assert err <= 1e-5


@pytest.mark.parametrize("group", [1, 2])
def test_into_following_unpadded_conv(group):
    """BN on a graph input: nothing before it, so it folds into the 1x1 conv after it."""
    g = Graph()
    x = g.bn(g.input("x", 1, 4, 5, 5), 4, "bn")
    y = g.node("Conv", [x, g.rand("w", 6, 4 // group, 1, 1), g.rand("b", 6)], "conv",
               group=group)
    new, report, err = _run(g.model(y))
    assert dict(report.changed) == {"into-next-conv": 1}
    assert [n.op_type for n in new.graph.node] == ["Conv"]
    assert err <= 1e-5


def test_padded_following_conv_is_refused():
    """Zero padding after BN is not zero padding before it: that fold would be wrong."""
    g = Graph()
    x = g.bn(g.input("x", 1, 4, 5, 5), 4, "bn")
    model = g.model(g.node("Conv", [x, g.rand("w", 6, 4, 3, 3)], "conv", pads=[1, 1, 1, 1]))
    kept, report, err = _run(model, decompose=False)
    assert not report.modified and ops(kept, "BatchNormalization") == 1
    (node, reason), = report.skipped
    assert node == "bn" and "'conv' pads its input" in reason
    assert "'x' is a graph input" in reason
    new, report, err = _run(model)
    assert dict(report.changed) == {"to-mul-add": 1} and ops(new, "BatchNormalization") == 0
    assert err <= 1e-5


def test_shared_weight_blocks_the_fold():
    g = Graph()
    w = g.rand("w", 4, 3, 3, 3)
    a = g.node("Conv", [g.input("x", 1, 3, 5, 5), w], "conv_a", pads=[1, 1, 1, 1])
    b = g.node("Conv", [g.input("y", 1, 3, 5, 5), w], "conv_b", pads=[1, 1, 1, 1])
    new, report, err = _run(g.model(g.bn(a, 4, "bn_a"), b))
    skipped = dict(report.skipped)
    assert "weight 'w' is shared with node 'conv_b'" in skipped["bn_a"]
    assert dict(report.changed) == {"to-mul-add": 1}
    assert {i.name: i for i in new.graph.initializer}["w"] == \
        {i.name: i for i in g.inits}["w"]  # the shared weight is untouched
    assert err <= 1e-5


def test_producer_output_read_elsewhere_blocks_the_fold():
    g = Graph()
    y = g.node("Conv", [g.input("x", 1, 3, 5, 5), g.rand("w", 4, 3, 1, 1)], "conv")
    new, report, err = _run(g.model(g.bn(y, 4, "bn"), g.node("Relu", [y], "relu")))
    assert "'conv' is also used by Relu 'relu'" in dict(report.skipped)["bn"]
    assert err <= 1e-5


def test_training_mode_and_variable_parameters_are_left_alone():
    g = Graph()
    x = g.input("x", 2, 4, 3, 3)
    y = g.node("Conv", [x, g.rand("w", 4, 4, 1, 1)], "conv")
    train = g.bn(y, 4, "train", training_mode=1)
    g.nodes[-1].output.extend(["running_mean", "running_var"])  # required in training mode
    g.inputs.append(onnx.helper.make_tensor_value_info("gamma", onnx.TensorProto.FLOAT, [4]))
    var = g.bn(x, 4, "var")
    g.nodes[-1].input[1] = "gamma"
    new, report, err = _run(g.model(train, var))
    assert not report.modified
    skipped = dict(report.skipped)
    assert "training_mode=1" in skipped["train"]
    assert "parameter 'gamma' is not a constant" in skipped["var"]
    assert ops(new, "BatchNormalization") == 2


def test_model_without_bn_is_refused():
    g = Graph()
    model = g.model(g.node("Relu", [g.input("x", 1, 4)], "relu"))
    _, run = run_pass(model, PASS, PASS.params, samples(model))
    assert run.status == "refused" and "no BatchNormalization" in run.message
