"""convert-fp16 / convert-bf16: islands by rule and by measurement, refusals, exact casts at
the graph's boundaries, the bfloat16 emulation the check runs, and the per-op table."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from edgekit.cli import cli
from edgekit.passes import _half
from edgekit.passes.convert_bf16 import PASS as BF16
from edgekit.passes.convert_fp16 import PASS as FP16
from edgekit.passes.core import load_samples, run_pass
from edgekit.verify import run_ort

D = 16


def _f32(name: str, a) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(a, np.float32), name)


def _block_model() -> onnx.ModelProto:
    """x → MatMul → LayerNorm → decomposed RMS (x², mean, +eps, sqrt, ÷) → MatMul → ×1000
    (overflows fp16 on inputs ~N(0,1)) → Tanh (marked keep_fp32) → Softmax → y."""
    rng = np.random.default_rng(0)
    inits = [_f32("w1", rng.standard_normal((D, D)) / 4), _f32("g", np.ones(D)),
             _f32("b", np.zeros(D)), _f32("eps", 1e-6), _f32("two", 2.0),
             _f32("w2", rng.standard_normal((D, D)) * 20), _f32("big", 1000.0),
             numpy_helper.from_array(np.array([-1], np.int64), "axes")]
    n = helper.make_node
    nodes = [n("MatMul", ["x", "w1"], ["h"], name="mm1"),
             n("LayerNormalization", ["h", "g", "b"], ["ln"], name="ln", axis=-1),
             n("Pow", ["ln", "two"], ["sq"], name="square"),
             n("ReduceMean", ["sq", "axes"], ["ms"], name="mean_sq", keepdims=1),
             n("Add", ["ms", "eps"], ["mse"], name="add_eps"),
             n("Sqrt", ["mse"], ["rms"], name="sqrt"),
             n("Div", ["ln", "rms"], ["normed"], name="normalize"),
             n("MatMul", ["normed", "w2"], ["m2"], name="mm2"),
             n("Mul", ["m2", "big"], ["scaled"], name="scale"),
             n("Tanh", ["scaled"], ["t"], name="marked"),
             n("Softmax", ["t"], ["y"], name="softmax", axis=-1)]
    nodes[9].metadata_props.add(key=_half.KEEP_FP32, value="test: CRMSNorm statistic")
    graph = helper.make_graph(
        nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, D]),
         helper.make_tensor_value_info("normed", TensorProto.FLOAT, [4, D])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def _calibration(n: int = 4, seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((n, 4, D)).astype(np.float32)}


def _run(p, model, calibration=None, **params):
    samples = load_samples(model, calibration=calibration or _calibration())
    return run_pass(model, p, {**p.params, **params}, samples)


@pytest.fixture(scope="module")
def fp16_block():
    return _run(FP16, _block_model())


def _node_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every node's first output, by node name."""
    typed = onnx.shape_inference.infer_shapes(model)
    vals = {v.name: v.type.tensor_type.elem_type
            for v in [*typed.graph.value_info, *typed.graph.output]}
    return {n.name: vals.get(n.output[0]) for n in typed.graph.node}


def test_islands_by_rule_and_by_measurement(fp16_block):
    new, run = fp16_block
    assert run.status == "applied", run.message
    islands = run.report.details["islands"]
    assert islands["ln"].startswith("norm statistics")
    assert islands["softmax"].startswith("softmax")
    assert islands["mean_sq"].startswith("a norm statistic")
    assert "square feeding" in islands["square"]
    assert "part of the statistic" in islands["add_eps"] and "sqrt" in islands
    assert islands["marked"] == "marked edgekit.keep_fp32: test: CRMSNorm statistic"
    assert islands["scale"].startswith("measured:") and "> 65504" in islands["scale"]
    # the division reads the full tensor, the matmuls are fine in fp16
    assert set(islands).isdisjoint({"mm1", "mm2", "normalize"})
    skipped = dict(run.report.skipped)
    assert skipped["scale"] == "fp32 island: " + islands["scale"]
    types = _node_types(new)
    assert types["mm1"] == types["mm2"] == types["normalize"] == TensorProto.FLOAT16
    assert types["ln"] == types["softmax"] == types["scale"] == TensorProto.FLOAT
    assert run.report.changed["fp16 MatMul"] == 2


def test_boundaries_keep_declared_types_and_weights_halve(fp16_block):
    new, run = fp16_block
    model = _block_model()
    assert [(v.name, v.type.tensor_type.elem_type) for v in new.graph.input] == \
        [(v.name, v.type.tensor_type.elem_type) for v in model.graph.input]
    assert [(v.name, v.type.tensor_type.elem_type) for v in new.graph.output] == \
        [(v.name, v.type.tensor_type.elem_type) for v in model.graph.output]
    inits = {t.name: t.data_type for t in new.graph.initializer}
    assert inits["w1_fp16"] == TensorProto.FLOAT16 and "w1" not in inits
    # w2 is read by mm2 (fp16): halved; `big` is read by the island only: stays fp32
    assert inits["big"] == TensorProto.FLOAT and "big_fp16" not in inits
    sizes = run.report.details["weight_bytes"]
    assert sizes["after"] < sizes["before"]


@pytest.mark.parametrize("p, dtype", [(FP16, np.float16), (BF16, ml_dtypes.bfloat16)])
def test_casts_at_the_boundaries_are_exact(p, dtype):
    """x → Relu → Neg → y: fp32 values representable in 16 bits come back bit for bit."""
    n = helper.make_node
    graph = helper.make_graph(
        [n("Relu", ["x"], ["r"], name="relu"), n("Neg", ["r"], ["y"], name="neg")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.random.default_rng(2).standard_normal((3, 2, 64)).astype(dtype).astype(np.float32)
    new, run = _run(p, model, {"x": x})
    assert run.status == "applied" and run.max_rel == 0.0
    casts = [a.i for node in new.graph.node if node.op_type == "Cast" for a in node.attribute]
    assert casts == [p is FP16 and TensorProto.FLOAT16 or TensorProto.BFLOAT16,
                     TensorProto.FLOAT]
    got = run_ort(_half.ort_form(new), {"x": x[0]})[0]
    assert got.dtype == np.float32 and np.array_equal(got, -np.maximum(x[0], 0))


def test_bf16_graph_and_the_emulation_the_check_runs():
    new, run = _run(BF16, _block_model())
    assert run.status == "applied", run.message
    types = _node_types(new)
    assert types["mm1"] == TensorProto.BFLOAT16 and types["ln"] == TensorProto.FLOAT
    # bfloat16 has fp32's range: ×1000 does not overflow, so no measured island there
    assert "scale" not in run.report.details["islands"]
    emulated = _half.ort_form(new)
    assert all(t.data_type != TensorProto.BFLOAT16 for t in emulated.graph.initializer)
    x = _calibration(1, seed=5)["x"][0]
    ref = run_ort(_block_model(), {"x": x})[1]  # `normed`: y is tanh(×1000), saturated
    got = run_ort(emulated, {"x": x})[1]
    assert np.max(np.abs(got - ref)) <= BF16.budget * np.max(np.abs(ref))
    assert not np.array_equal(got, ref)  # the rounding is really there
    assert np.array_equal(got, got.astype(ml_dtypes.bfloat16).astype(np.float32))


def _conv_model() -> onnx.ModelProto:
    """x → Conv(w, b) → Relu → y at opset 18 (Conv has no bfloat16 form before opset 22)."""
    rng = np.random.default_rng(3)
    n = helper.make_node
    graph = helper.make_graph(
        [n("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         n("Relu", ["c"], ["y"], name="relu")], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])],
        [_f32("w", rng.standard_normal((8, 3, 3, 3)) / 3), _f32("b", rng.standard_normal(8))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def test_bf16_conv_island_stores_its_weights_in_bf16():
    """The Conv stays fp32 (schema) but reads bfloat16 copies of w and b through Casts: half
    the weight bytes, the arithmetic fp32; the fp16 form computes the Conv in fp16 instead."""
    x = np.random.default_rng(4).standard_normal((3, 1, 3, 8, 8)).astype(np.float32)
    new, run = _run(BF16, _conv_model(), {"x": x})
    assert run.status == "applied", run.message
    islands = run.report.details["islands"]
    assert islands["conv"] == "ONNX Conv-11 has no bfloat16 form"
    assert dict(run.report.skipped)["conv"].endswith("; weights stored in bf16")
    inits = {t.name: t.data_type for t in new.graph.initializer}
    assert inits == {"w_bf16": TensorProto.BFLOAT16, "b_bf16": TensorProto.BFLOAT16}
    conv = next(n for n in new.graph.node if n.op_type == "Conv")
    producers = {o: n for n in new.graph.node for o in n.output}
    for name in conv.input[1:]:
        cast = producers[name]
        assert cast.op_type == "Cast" and cast.attribute[0].i == TensorProto.FLOAT
        assert cast.input[0] in inits
    sizes = run.report.details["weight_bytes"]
    assert sizes["after"] * 2 == sizes["before"]
    ref = run_ort(_conv_model(), {"x": x[0]})[0]
    got = run_ort(_half.ort_form(new), {"x": x[0]})[0]
    assert 0 < np.linalg.norm(got - ref) / np.linalg.norm(ref) <= BF16.budget
    new16, run16 = _run(FP16, _conv_model(), {"x": x})
    assert "conv" not in run16.report.details["islands"]
    assert {t.name for t in new16.graph.initializer} == {"w_fp16", "b_fp16"}


def test_ort_form_rounds_like_ml_dtypes():
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["h"], to=TensorProto.BFLOAT16),
         helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Cast", ["r"], ["y"], to=TensorProto.FLOAT)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -8 + 2 ** -20, 3.3e38, 7.0], np.float32)
    got = run_ort(_half.ort_form(model), {"x": x})[0]
    assert np.array_equal(got, x.astype(ml_dtypes.bfloat16).astype(np.float32))
    assert _half.ort_form(_block_model()) is not None  # no bfloat16: unchanged
    plain = _block_model()
    assert _half.ort_form(plain) is plain


def test_refusals():
    then = helper.make_graph([helper.make_node("Identity", ["x"], ["o"])], "then", [],
                             [helper.make_tensor_value_info("o", TensorProto.FLOAT, [2])])
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
         helper.make_node("Greater", ["s", "zero"], ["c"]),
         helper.make_node("If", ["c"], ["y"], name="branch", then_branch=then,
                          else_branch=then)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], [_f32("zero", 0.0)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    new, run = _run(FP16, model, {"x": np.ones((2, 2), np.float32)})
    assert run.status == "refused" and new is model
    assert "If holds subgraphs" in run.message and run.report.skipped[-1][0] == "branch"
    ints = helper.make_model(helper.make_graph(
        [helper.make_node("Add", ["i", "i"], ["o"])], "ints",
        [helper.make_tensor_value_info("i", TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("o", TensorProto.INT64, [3])]),
        opset_imports=[helper.make_opsetid("", 17)])
    _, run = _run(BF16, ints, {"i": np.ones((2, 3), np.int64)})
    assert run.status == "refused" and "no float32 computation" in run.message
    samples = load_samples(_block_model())  # seeded only: the pass is fitted
    _, run = run_pass(_block_model(), FP16, FP16.params, samples, "none")
    assert run.status == "refused"


def test_explain_prints_the_per_op_table(tmp_path):
    src, out, cal = tmp_path / "m.onnx", tmp_path / "h.onnx", tmp_path / "cal.npz"
    onnx.save(_block_model(), src)
    np.savez(cal, **_calibration())
    res = CliRunner().invoke(cli, ["rewrite", str(src), "-o", str(out), "--passes",
                                   "convert-fp16", "--calibration", str(cal), "--explain"])
    assert res.exit_code == 0, res.output
    assert "convert-fp16: applied" in res.output
    assert "skipped scale: fp32 island: measured:" in res.output
    table = [line.split() for line in res.output.splitlines() if line.startswith("    mm")]
    assert [row[:3] for row in table] in (
        [["mm1", "MatMul", "fp16"], ["mm2", "MatMul", "fp16"]],
        [["mm2", "MatMul", "fp16"], ["mm1", "MatMul", "fp16"]])
