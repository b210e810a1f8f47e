"""NaN and Inf through compiled models, for real (TVM compiles, onnxruntime, the runtime).

Why (issue 18, item 3): TVM lowers max/min to ordered compares, so compiled Relu, Clip,
HardSigmoid, Max and Min turned a NaN input into a number (a NaN image got a confident class)
where onnxruntime and torch give NaN, and the compile check only fed N(0, 1) inputs, so
nothing noticed. Each test compiles a one- or two-op model and feeds NaN, +-Inf and 1e30.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from edgekit import api, runtime
from edgekit.compiler.build import nonfinite_mismatch
from edgekit.errors import EdgekitError

N = helper.make_node


def _model(nodes, in_shape, out_shape, inits=(), opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _scalar(name: str, value: float) -> onnx.TensorProto:
    return helper.make_tensor(name, TensorProto.FLOAT, [], [value])


HALF = helper.make_tensor("half", TensorProto.FLOAT, [1, 8], [0.5] * 8)
MODELS = {
    "relu": _model([N("Relu", ["x"], ["y"])], [2, 8], [2, 8]),
    "clip": _model([N("Clip", ["x", "lo", "hi"], ["y"])], [2, 8], [2, 8],
                   [_scalar("lo", 0.0), _scalar("hi", 6.0)]),
    "hardsigmoid": _model([N("HardSigmoid", ["x"], ["y"])], [2, 8], [2, 8]),
    "max": _model([N("Max", ["x", "half"], ["y"])], [2, 8], [2, 8], [HALF]),
    "min": _model([N("Min", ["x", "half"], ["y"])], [2, 8], [2, 8], [HALF]),
    "reducemax": _model([N("ReduceMax", ["x"], ["y"], axes=[1], keepdims=0)], [2, 8], [2]),
    "conv_relu": _model(
        [N("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), N("Relu", ["c"], ["y"])],
        [1, 2, 4, 4], [1, 3, 4, 4],
        [helper.make_tensor("w", TensorProto.FLOAT, [3, 2, 3, 3],
                            np.random.default_rng(0).standard_normal(54).tolist())]),
    "erf": _model([N("Erf", ["x"], ["y"])], [2, 8], [2, 8]),
    # GELU's erf form as exporters write it: x * 0.5 * (1 + erf(x / sqrt 2))
    "gelu_erf": _model(
        [N("Div", ["x", "sqrt2"], ["s"]), N("Erf", ["s"], ["e"]), N("Add", ["e", "one"], ["a"]),
         N("Mul", ["x", "a"], ["m"]), N("Mul", ["m", "half_s"], ["y"])], [2, 8], [2, 8],
        [_scalar("sqrt2", 2.0**0.5), _scalar("one", 1.0), _scalar("half_s", 0.5)]),
}


def _compile(tmp_path: Path, name: str) -> tuple[Path, runtime.CompiledModel]:
    path = tmp_path / f"{name}.onnx"
    onnx.save(MODELS[name], path)
    api.compile(path, "host", tmp_path / f"{name}.edgekit")
    return path, runtime.load(tmp_path / f"{name}.edgekit")


def _probe(shape, value: float, pos: int = 0) -> np.ndarray:
    x = np.random.default_rng(pos).standard_normal(shape).astype(np.float32)
    x.reshape(-1)[pos] = value
    return x


@pytest.mark.parametrize("name", ["relu", "clip", "hardsigmoid", "max", "min", "conv_relu"])
def test_elementwise_max_min_propagate_nan_like_onnxruntime(tmp_path, name):
    """Before: relu/clip/hardsigmoid/max gave a number for NaN (0, 0.5, the other operand);
    after: NaN and Inf land exactly where onnxruntime puts them, wherever the NaN sits."""
    path, model = _compile(tmp_path, name)
    session = ort.InferenceSession(str(path))
    shape = [d.dim_value for d in MODELS[name].graph.input[0].type.tensor_type.shape.dim]
    for value in (np.nan, np.inf, -np.inf, 1e30):
        for pos in (0, 1, 5):
            x = _probe(shape, value, pos)
            ref = session.run(None, {"x": x})[0]
            got = model.run(x)["y"]
            assert nonfinite_mismatch(got, ref) == "", (value, pos)
    x = _probe(shape, np.nan, 1)
    assert np.isnan(model.run(x)["y"]).any()


@pytest.mark.parametrize("name", ["erf", "gelu_erf"])
def test_erf_keeps_nan_and_saturates_inf_like_onnxruntime(tmp_path, name):
    """Before: a bare Erf turned NaN into 1 (TVM's fast_erf clamps to [-4, 4] with max/min),
    so the compile check refused the model; after: it compiles (the check's NaN/Inf/1e30
    probes pass), NaN stays NaN, +-Inf give +-1 exactly, as in onnxruntime."""
    path, model = _compile(tmp_path, name)
    session = ort.InferenceSession(str(path))
    for value in (np.nan, np.inf, -np.inf, 1e30, -1e30):
        for pos in (0, 1, 5):
            x = _probe([2, 8], value, pos)
            ref, got = session.run(None, {"x": x})[0], model.run(x)["y"]
            assert nonfinite_mismatch(got, ref) == "", (value, pos)
            finite = np.isfinite(ref)
            np.testing.assert_allclose(got[finite], ref[finite], rtol=1e-5, atol=1e-6)
    if name == "erf":
        y = model.run(np.array([[np.nan, np.inf, -np.inf, 4.0, -4.0, 0, 1, -1]] * 2,
                               np.float32))["y"][0]
        assert np.isnan(y[0]) and y[1] == 1.0 and y[2] == -1.0


def test_reductions_keep_a_leading_nan(tmp_path):
    """ReduceMax: onnxruntime keeps a NaN in the first element (TVM dropped it), the library now
    keeps any NaN (torch's and numpy's answer)."""
    _, model = _compile(tmp_path, "reducemax")
    for pos in (0, 3, 7):
        x = _probe([2, 8], np.nan, pos)
        y = model.run(x)["y"]
        assert np.isnan(y[0]) and np.isfinite(y[1])


def test_compile_check_refuses_a_library_that_swallows_nan(tmp_path):
    """The rule the compile check applies, on real outputs: a NaN onnxruntime keeps and the
    library drops (TVM's max lowering, before the fix) is named; matching outputs pass."""
    ref = np.array([np.nan, 1.0, np.inf, -np.inf], np.float32)
    assert nonfinite_mismatch(ref.copy(), ref) == ""
    swallowed = np.array([0.0, 1.0, np.inf, -np.inf], np.float32)
    assert "not NaN at 1 element(s)" in nonfinite_mismatch(swallowed, ref)
    overflowed = np.array([np.nan, np.inf, np.inf, -np.inf], np.float32)
    assert "is +Inf at 1 element(s)" in nonfinite_mismatch(overflowed, ref)


def test_compile_check_feeds_nonfinite_inputs_and_keeps_token_ids_in_range(tmp_path):
    """A model whose output is finite for NaN in one place would be caught: Where(IsNaN(x), 0,
    x) in onnxruntime vs the library agree, so it compiles; and an int64 index input next to
    a float one is left in range (Gather of a 4-row table would fail on a wild index)."""
    table = helper.make_tensor("t", TensorProto.FLOAT, [4, 8],
                               np.arange(32, dtype=np.float32).tolist())
    graph = helper.make_graph(
        [N("IsNaN", ["x"], ["m"]), N("Where", ["m", "zero", "x"], ["clean"]),
         N("Gather", ["t", "ids"], ["rows"]), N("Add", ["rows", "clean"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8]),
              helper.make_tensor_value_info("ids", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
        [table, _scalar("zero", 0.0)])
    path = tmp_path / "guard.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    api.compile(path, "host", tmp_path / "guard.edgekit",
                inputs=[api.parse_input_spec("ids:2:int64")])
    y = runtime.load(tmp_path / "guard.edgekit").run(
        {"x": _probe([2, 8], np.nan), "ids": np.array([0, 3], np.int64)})["y"]
    assert np.isfinite(y).all()


def test_compile_check_refuses_tvms_own_relu(tmp_path):
    """Before the fix, for real: relu imported by TVM's ONNX frontend and built without
    ``PropagateNaN`` (TVM's lowering, max(x, 0)) passes the seeded check but the non-finite
    check refuses it in one line naming the input and the output."""
    from tvm.relax.frontend import onnx as relax_onnx

    from edgekit import compiler, verify
    from edgekit.targets import load_target

    model = MODELS["relu"]
    specs = verify.onnx_input_specs(model, [])
    target = load_target("host")
    library = tmp_path / "relu.so"
    compiler.export_library(compiler.build(relax_onnx.from_onnx(model), target), target,
                            library)
    with pytest.raises(EdgekitError) as err:
        compiler.check_library(library, model, specs, [
            verify.TensorSpec("y", (2, 8), "float32")], target, 1e-4, 1e-4)
    text = str(err.value)
    assert "x[0] = nan" in text and "'y' is not NaN at 1 element(s)" in text
    assert "\n" not in text
