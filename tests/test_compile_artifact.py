"""Compile, artifact manifest and runtime checks, on real TVM builds."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgekit import api, runtime
from edgekit.compiler import unsupported_nodes
from edgekit.errors import EdgekitError
from edgekit.manifest import SCHEMA_VERSION
from edgekit.verify import run_ort, seeded_inputs


def test_manifest_contents(compiled_default):
    m = compiled_default.manifest
    assert m["schema_version"] == SCHEMA_VERSION
    assert {"edgekit", "apache-tvm", "onnx"} <= set(m["versions"])
    assert m["target"]["name"] == "host"
    assert m["inputs"] == [{"name": "image", "shape": [1, 3, 64, 64], "dtype": "float32"}]
    assert m["outputs"][0]["shape"] == [1, 10]
    assert set(m["files"]) == {"model.so", "model.onnx"}
    assert len(m["source"]["onnx_sha256"]) == 64 and m["source"]["kind"] == "graph"
    (check,) = m["verification"]["outputs"]
    assert check["ok"] and check["rel"] < 1e-5
    assert m["passes"] == []


def test_runtime_matches_onnxruntime(compiled_default):
    model = runtime.load(compiled_default.path)
    x = seeded_inputs([api.TensorSpec("image", (1, 3, 64, 64), "float32")], seed=7)
    ref = run_ort(onnx.load(compiled_default.path / "model.onnx"), x)[0]
    for out in (model.run(x), model.run(x["image"]), model.run(image=x["image"])):
        (y,) = out.values()
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_runtime_input_validation(compiled_default):
    model = runtime.load(compiled_default.path)
    good = np.zeros((1, 3, 64, 64), np.float32)
    with pytest.raises(ValueError, match=r"input 'image': expected shape \(1, 3, 64, 64\), "
                                         r"got \(1, 3, 32, 32\)"):
        model.run(np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(ValueError, match="input 'image': expected dtype float32, got float64"):
        model.run(good.astype(np.float64))
    with pytest.raises(ValueError, match="unknown input 'img'"):
        model.run({"img": good})
    with pytest.raises(ValueError, match="expected 1 inputs"):
        model.run(good, good)


def test_tampered_artifact_is_refused(compiled_default, tmp_path):
    copy = tmp_path / "copy.edgekit"
    shutil.copytree(compiled_default.path, copy)
    with open(copy / "model.so", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(runtime.ArtifactError, match="model.so does not match its sha256"):
        runtime.load(copy)
    (copy / "model.so").unlink()
    with pytest.raises(runtime.ArtifactError, match="model.so is missing"):
        runtime.load(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(runtime.ArtifactError, match="not valid JSON"):
        runtime.load(copy)
    with pytest.raises(runtime.ArtifactError, match="not an edgekit artifact"):
        runtime.load(tmp_path / "nothing-here")


def test_manifest_paths_cannot_escape(compiled_default, tmp_path):
    copy = tmp_path / "escape.edgekit"
    shutil.copytree(compiled_default.path, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["../secret"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(runtime.ArtifactError, match="outside the artifact"):
        runtime.load(copy)


def test_compile_onnx_file_and_overwrite(add_relu_onnx, tmp_path):
    out = tmp_path / "a.edgekit"
    api.compile(add_relu_onnx, "host", out)
    api.compile(add_relu_onnx, "host", out)  # an existing artifact is replaced
    y = runtime.load(out).run(np.array([[1.0, 1.0, -5.0, 5.0]], np.float32))["y"]
    np.testing.assert_allclose(y, [[1.5, 0.0, 0.0, 2.0]])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.edgekit"]


def test_compile_refuses_to_overwrite_foreign_directory(add_relu_onnx, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "data.txt").write_text("keep me")
    with pytest.raises(EdgekitError, match="not an edgekit artifact"):
        api.compile(add_relu_onnx, "host", out)
    assert (out / "data.txt").read_text() == "keep me"


def test_failed_verification_writes_nothing(add_relu_onnx, tmp_path):
    out = tmp_path / "never.edgekit"
    with pytest.raises(EdgekitError, match="differs from onnxruntime.*nothing written"):
        api.compile(add_relu_onnx, "host", out, atol=-1.0, rtol=0.0)
    assert list(tmp_path.iterdir()) == []


def test_unsupported_ops_are_all_listed(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["a"], name="ok"),
         helper.make_node("LpNormalization", ["a"], ["b"], name="lpnorm_1"),
         helper.make_node("Col2Im", ["b", "img", "blk"], ["c"], name="col2im_1")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 4])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 1, 3, 3])],
        [helper.make_tensor("img", TensorProto.INT64, [2], [3, 3]),
         helper.make_tensor("blk", TensorProto.INT64, [2], [2, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    missing = unsupported_nodes(model)
    assert ("LpNormalization", "lpnorm_1") in missing and ("Col2Im", "col2im_1") in missing
    path = tmp_path / "unsupported.onnx"
    onnx.save(model, path)
    with pytest.raises(EdgekitError, match="TVM cannot convert 2 node.*col2im_1 \\(Col2Im\\)"):
        api.compile(path, "host", tmp_path / "x.edgekit", inputs=())


def test_light_zoo_model_compiles_and_matches(tmp_path):
    from conftest import LIGHT_ZOO

    path = LIGHT_ZOO / "light_squeezenet.onnx"
    if not path.is_file():
        pytest.skip(f"onnx light zoo model missing: {path}")
    result = api.compile(path, "host", tmp_path / "sq.edgekit")
    assert all(c["ok"] for c in result.manifest["verification"]["outputs"])


def test_cross_compile_rpi4(add_relu_onnx, tmp_path):
    if not shutil.which("aarch64-linux-gnu-g++"):
        pytest.skip("aarch64-linux-gnu-g++ not installed (apt-get install g++-aarch64-linux-gnu)")
    result = api.compile(add_relu_onnx, "rpi4", tmp_path / "pi.edgekit")
    header = (result.path / "model.so").read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183
    assert "skipped" in result.manifest["verification"]
    assert result.manifest["target"]["machine"] == "aarch64"
    with pytest.raises(runtime.ArtifactError, match="this machine is"):
        runtime.load(result.path)


def test_token_ids_out_of_the_embedding_table_are_refused(tmp_path):
    from onnx import numpy_helper

    table = numpy_helper.from_array(np.arange(40, dtype=np.float32).reshape(10, 4), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["y"])], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 4])], [table])
    path = tmp_path / "emb.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    result = api.compile(path, "host", tmp_path / "emb.edgekit")
    assert result.manifest["inputs"][0]["high"] == 10
    model = runtime.load(result.path)
    ids = np.array([[0, 9, -10, -3, 4, 5]], np.int64)
    np.testing.assert_array_equal(model.run(ids)["y"], run_ort(onnx.load(path), {"ids": ids})[0])
    with pytest.raises(ValueError, match="table of 10 rows"):
        model.run(np.array([[0, 1, 2, 3, 4, 10]], np.int64))
