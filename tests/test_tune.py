"""Tuning inside compile: MetaSchedule writes the database, a second compile of another model
with the same kernel reuses it without tuning, the manifest records both, outputs verified."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from edgekit import api, runtime, tune, verify
from edgekit.cli import cli
from edgekit.targets import load_target


def _matmul_relu(path, seed):
    """y = relu(x @ w), x: 4x32, w: 32x64 (weights differ per seed; the kernel does not)."""
    w = np.random.default_rng(seed).standard_normal((32, 64)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
         helper.make_node("Relu", ["m"], ["y"], name="relu")],
        "mm_relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 64])],
        [helper.make_tensor("w", TensorProto.FLOAT, [32, 64], w.ravel())])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    d = tmp_path_factory.mktemp("tune")
    db = d / "db"
    first = api.compile(_matmul_relu(d / "a.onnx", 0), "host", d / "a.edgekit", tune=True,
                        trials=2, tuning_db=db)
    second = api.compile(_matmul_relu(d / "b.onnx", 1), "host", d / "b.edgekit", tuning_db=db)
    return d, db, first, second


def test_tuning_writes_the_database_and_the_manifest(tuned):
    _, db, first, _ = tuned
    assert tune.has_records(db)
    records = (db / "database_tuning_record.json").read_text().splitlines()
    assert records and all(json.loads(line) for line in records)
    info = first.manifest["tuning"]
    assert info["tuned"] is True and info["trials"] >= 1 and info["budget_trials"] == 2
    assert info["tasks"] == 1 and info["db"] == str(db) and info["cost_model"] in ("xgb",
                                                                                    "random")
    assert info["records_applied"] == 1 and info["kernels"] == 1
    assert all(c["ok"] for c in first.manifest["verification"]["outputs"])


def test_second_compile_reuses_records_without_tuning(tuned):
    d, _, _, second = tuned
    info = second.manifest["tuning"]
    assert info["tuned"] is False and info["records_applied"] == 1
    assert info["default_schedules"] == 0
    model = onnx.load(str(d / "b.onnx"))
    inputs = verify.seeded_inputs(verify.onnx_input_specs(model, []), 3)
    ref = verify.run_ort(model, inputs)[0]
    got = runtime.load(second.path).run(inputs)["y"]
    assert np.abs(got - ref).max() / np.abs(ref).max() <= 1e-5


def test_database_is_keyed_by_target(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEKIT_TUNING_DB", str(tmp_path))
    host, rpi = load_target("host"), load_target("rpi4")
    assert tune.db_dir(host).parent == tmp_path
    assert tune.db_dir(host) != tune.db_dir(rpi)
    assert tune.db_dir(host) == tune.db_dir(load_target("host"))
    assert tune.db_dir(host, tmp_path / "mine") == tmp_path / "mine"


def test_tuning_a_cross_target_is_a_one_line_error(tmp_path):
    src = _matmul_relu(tmp_path / "m.onnx", 0)
    result = CliRunner().invoke(cli, ["tune", str(src), "--target", "rpi4", "--trials", "2",
                                      "--tuning-db", str(tmp_path / "db")])
    assert result.exit_code == 1
    assert result.output.startswith("error: tuning measures on this machine")
    assert len(result.output.strip().splitlines()) == 1
    assert not tune.has_records(tmp_path / "db")
