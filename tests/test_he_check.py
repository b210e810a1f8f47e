"""The HE checker and ``edgekit he-check``: verdicts, offenders, degree and depth."""

from __future__ import annotations

import json

import numpy as np
import onnx
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from edgekit.cli import cli
from edgekit.he.check import check
from edgekit.he.models import poly_mlp


def graph(nodes, inputs=("x",), inits=None, shape=(1, 4)) -> onnx.ModelProto:
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(i, TensorProto.FLOAT, list(shape))
                     for i in inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in (inits or {}).items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def test_polynomial_mlp_degree_and_depth():
    report = check(poly_mlp())
    assert report.he_friendly and report.offenders == []
    assert (report.degree, report.depth) == (2, 3)  # x·W (1), square (2), ·W2 (3)
    assert report.tensors["hb"].depth == 1 and report.tensors["sq"].degree == 2


def test_rules_for_products_powers_and_means():
    n = helper.make_node
    model = graph([n("Mul", ["x", "x"], ["x2"], name="sq"),
                   n("Mul", ["x2", "x"], ["x3"], name="cube"),
                   n("Pow", ["x", "five"], ["x5"], name="pow"),
                   n("ReduceMean", ["x3"], ["m"], name="mean", keepdims=1),
                   n("ReduceSum", ["x5"], ["s"], name="sum", keepdims=1),
                   n("Div", ["s", "two"], ["half"], name="half"),
                   n("Add", ["m", "half"], ["y"], name="add")],
                  inits={"five": 5.0, "two": 2.0})
    t = check(model).tensors
    assert (t["x3"].degree, t["x3"].depth) == (3, 2)
    assert (t["x5"].degree, t["x5"].depth) == (5, 3)
    assert t["m"].depth == 3 and t["s"].depth == 3 and t["half"].depth == 4
    assert (t["y"].degree, t["y"].depth) == (5, 4)


def test_offenders_are_named_and_propagation_continues(add_relu_onnx):
    n = helper.make_node
    model = graph([n("Exp", ["x"], ["e"], name="the_exp"),
                   n("ReduceSum", ["e"], ["s"], name="sum", keepdims=1),
                   n("Div", ["e", "s"], ["p"], name="divide"),
                   n("Mul", ["p", "p"], ["y"], name="sq")])
    report = check(model)
    assert not report.he_friendly
    assert [(o.node, o.op) for o in report.offenders] == [("the_exp", "Exp"), ("divide", "Div")]
    assert "ciphertext" in report.offenders[1].reason
    assert report.tensors["y"].depth == 1
    relu = check(onnx.load(add_relu_onnx))
    assert [o.node for o in relu.offenders] == ["relu"]


def test_plain_inputs_and_shape_arithmetic_are_computed_in_the_clear():
    n = helper.make_node
    model = graph([n("Shape", ["x"], ["shp"], name="shape"),
                   n("Cast", ["shp"], ["shf"], name="cast", to=TensorProto.FLOAT),
                   n("Sqrt", ["shf"], ["root"], name="sqrt"),
                   n("Exp", ["mask"], ["emask"], name="mask_exp"),
                   n("Mul", ["x", "emask"], ["xm"], name="apply_mask"),
                   n("Div", ["xm", "root"], ["y"], name="norm")], inputs=("x", "mask"))
    assert [o.node for o in check(model).offenders] == ["mask_exp"]
    report = check(model, plain_inputs=["mask"])
    assert report.he_friendly and report.depth == 2


def test_cli_json_verdicts(tmp_path, add_relu_onnx):
    good = tmp_path / "mlp.onnx"
    onnx.save(poly_mlp(), good)
    runner = CliRunner()
    ok = runner.invoke(cli, ["he-check", str(good), "--json"])
    assert ok.exit_code == 0, ok.output
    data = json.loads(ok.output)
    assert data["he_friendly"] is True and data["depth"] == 3 and data["offenders"] == []
    assert data["tensors"]["y"] == {"degree": 2, "depth": 3}
    bad = runner.invoke(cli, ["he-check", str(add_relu_onnx), "--json"])
    assert bad.exit_code == 1
    verdict = json.loads(bad.output)
    assert verdict["he_friendly"] is False and verdict["offenders"][0]["node"] == "relu"
    text = runner.invoke(cli, ["he-check", str(add_relu_onnx)])
    assert text.exit_code == 1 and "offender relu (Relu)" in text.output
    missing = runner.invoke(cli, ["he-check", str(tmp_path / "nope.onnx")])
    assert missing.exit_code == 1 and missing.output.startswith("error: ")
    plain = runner.invoke(cli, ["he-check", str(good), "--plain", "nope"])
    assert plain.exit_code == 1 and "not an input" in plain.output


def test_attention_block_depth_before_and_after_poly_softmax():
    """The softmax is the only offender; after poly-softmax the block's depth is the
    projections (1) + QKᵀ (1) + the softmax design + AV (1) + the output projection (1)."""
    from edgekit.he.models import attention_block, poly_attention_block

    before = check(attention_block(seq=4, width=8, heads=2))
    assert [(o.node, o.op) for o in before.offenders] == [("softmax", "Softmax")]
    assert "poly-softmax" in before.offenders[0].reason
    _, poly, details = poly_attention_block(seq=4, width=8, heads=2, calibration=8)
    after = check(poly)
    assert after.he_friendly
    assert after.depth == 4 + details["replaced"]["softmax"]["depth"]
    assert after.tensors["scores"].depth == 2 and after.tensors["scores"].degree == 2
