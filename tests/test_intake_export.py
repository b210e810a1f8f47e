"""Model intake and export: built-in graphs, file.py:factory with weights, ONNX files."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from edgekit import api, intake
from edgekit.errors import EdgekitError
from edgekit.verify import TensorSpec, parse_input_spec, seeded_inputs


def test_parse_input_spec():
    assert parse_input_spec("x:1x3x224x224") == TensorSpec("x", (1, 3, 224, 224), "")
    assert parse_input_spec("ids:1x16:int64").dtype == "int64"
    for bad in ("x", "x:1xa-b", "x:0x3", "x:1x3:notatype", ":1x3"):
        with pytest.raises(EdgekitError, match="bad input spec"):
            parse_input_spec(bad)


def test_seeded_inputs_are_reproducible_and_ints_small():
    specs = [TensorSpec("x", (2, 3), "float32"), TensorSpec("ids", (1, 8), "int64")]
    a, b = seeded_inputs(specs, 0), seeded_inputs(specs, 0)
    np.testing.assert_array_equal(a["x"], b["x"])
    assert a["ids"].min() >= 0 and a["ids"].max() < 2


def test_export_builtin_graph(tmp_path):
    out = tmp_path / "cnn.onnx"
    result = api.export("mobile-cnn", out)
    assert out.is_file() and not list(tmp_path.glob("*.data"))
    onnx.checker.check_model(onnx.load(out))
    assert all(c.ok and c.rel < 1e-5 for c in result.comparisons)


def test_export_python_factory_with_weights(tiny_net_file, tmp_path):
    import torch

    weights = tiny_net_file.parent / "weights.pt"
    out = tmp_path / "net.onnx"
    result = api.export(f"{tiny_net_file}:make", out, weights=weights)
    assert result.source.weights == str(weights.resolve())
    # the weights really were loaded: ORT output equals the saved module's output
    torch.manual_seed(1)
    ref = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x = seeded_inputs(result.specs)["x"]
    from edgekit.verify import run_ort

    np.testing.assert_allclose(run_ort(onnx.load(out), {"x": x})[0],
                               ref(torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_export_input_override_changes_shape(tiny_net_file, tmp_path):
    result = api.export(f"{tiny_net_file}:make", tmp_path / "n.onnx",
                        inputs=[parse_input_spec("x:3x8")])
    assert result.specs[0].shape == (3, 8)


def test_export_refuses_when_tolerance_is_impossible(tmp_path):
    out = tmp_path / "cnn.onnx"
    # a negative tolerance can never be met: the check must fail and write nothing
    with pytest.raises(EdgekitError, match="differs from torch"):
        api.export("mobile-cnn", out, atol=-1.0, rtol=0.0)
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("spec, message", [
    ("no-such-graph", "unknown model"),
    ("missing.py:make", "Python file not found"),
])
def test_bad_model_specs(spec, message):
    with pytest.raises(EdgekitError, match=message):
        intake.load_torch(spec)


def test_bad_factory_and_weights(tiny_net_file, tmp_path):
    with pytest.raises(EdgekitError, match="has no function 'nope'"):
        intake.load_torch(f"{tiny_net_file}:nope")
    with pytest.raises(EdgekitError, match="weights file not found"):
        intake.load_torch(f"{tiny_net_file}:make", weights=tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(EdgekitError, match="cannot load weights"):
        intake.load_torch(f"{tiny_net_file}:make", weights=garbage)


def test_weights_that_do_not_fit(tiny_net_file, tmp_path):
    import torch

    path = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(3, 3).state_dict(), path)
    with pytest.raises(EdgekitError, match="do not fit the model"):
        intake.load_torch(f"{tiny_net_file}:make", weights=path)


def test_weights_refuse_pickled_objects(tiny_net_file, tmp_path):
    import torch

    path = tmp_path / "pickled.pt"
    torch.save(torch.nn.Linear(8, 16), path)  # a whole module: needs unsafe unpickling
    with pytest.raises(EdgekitError, match="cannot load weights"):
        intake.load_torch(f"{tiny_net_file}:make", weights=path)


def test_onnx_garbage_and_truncated(add_relu_onnx, tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\xffthis is not protobuf" * 10)
    with pytest.raises(EdgekitError, match="not a readable ONNX model|fails the ONNX checker"):
        intake.load_onnx(garbage)
    data = add_relu_onnx.read_bytes()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(EdgekitError, match="not a readable ONNX model|fails the ONNX checker"):
        intake.load_onnx(truncated)
    with pytest.raises(EdgekitError, match="ONNX file not found"):
        intake.load_onnx(tmp_path / "absent.onnx")


def test_onnx_dynamic_dim_needs_input_shape(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    path = tmp_path / "dyn.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(EdgekitError, match="symbolic dim .batch.: bound it with --dim batch="):
        intake.load_onnx(path)
    fixed = intake.load_onnx(path, [parse_input_spec("x:2x4")])
    assert [d.dim_value for d in fixed.graph.input[0].type.tensor_type.shape.dim] == [2, 4]
    with pytest.raises(EdgekitError, match=r"x:2x5 does not fit the model's declared shape \?x4"):
        intake.load_onnx(path, [parse_input_spec("x:2x5")])
    with pytest.raises(EdgekitError, match="unknown input 'z'"):
        intake.load_onnx(path, [parse_input_spec("z:2x4")])


def test_an_input_shape_keeps_the_models_dtype(tmp_path):
    """``--input ids:1x16`` on an int64 input: still int64 (was float32, and every check failed)."""
    from onnx import TensorProto, helper

    from edgekit.verify import onnx_input_specs

    graph = helper.make_graph(
        [helper.make_node("Cast", ["ids"], ["y"], to=TensorProto.FLOAT)], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "n"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert onnx_input_specs(model, [parse_input_spec("ids:1x16")]) == [
        TensorSpec("ids", (1, 16), "int64")]
    onnx.save(model, tmp_path / "ids.onnx")
    with pytest.raises(EdgekitError, match="ids:1x16:int32: the model declares 'ids' as int64"):
        intake.load_onnx(tmp_path / "ids.onnx", [parse_input_spec("ids:1x16:int32")])
    assert intake._merge_specs([], [parse_input_spec("x:2x4")], "f.py:f")[0].dtype == "float32"
    defaults = [TensorSpec("ids", (1, 8), "int64")]
    assert intake._merge_specs(defaults, [parse_input_spec("ids:1x16")], "g")[0] == TensorSpec(
        "ids", (1, 16), "int64")


def test_seeded_token_ids_cover_the_embedding_table_and_masks_stay_binary():
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgekit.verify import index_bounds, onnx_input_specs

    table = numpy_helper.from_array(np.zeros((50, 4), np.float32), "table")
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["ids", "flat"], ["ids1"]),
         helper.make_node("Gather", ["table", "ids1"], ["emb"]),
         helper.make_node("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT),
         helper.make_node("ReduceSum", ["emb"], ["s"], keepdims=0),
         helper.make_node("Mul", ["s", "maskf"], ["y"])],
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 64]),
         helper.make_tensor_value_info("mask", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        [table, numpy_helper.from_array(np.array([64], np.int64), "flat")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    assert index_bounds(model) == {"ids": 50}
    x = seeded_inputs(onnx_input_specs(model), seed=0)
    assert x["ids"].max() > 1 and x["ids"].max() < 50 and x["ids"].min() >= 0
    assert set(np.unique(x["mask"])) <= {0, 1}
