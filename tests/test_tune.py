"""Tuning inside compile: MetaSchedule writes the database, a second compile of another model
with the same kernel reuses it without tuning, the manifest records both, outputs verified.
A record is applied only if it was timed faster than the default schedule of its kernel."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from edgekit import api, runtime, verify
from edgekit.cli import cli
from edgekit.compiler import pipeline, tune_check, tuning_db
from edgekit.targets import load_target


def _matmul_relu(path, seed, rows=4, k=32, n=64):
    """y = relu(x @ w), x: rows x k, w: k x n (weights differ per seed; the kernel does not)."""
    w = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
         helper.make_node("Relu", ["m"], ["y"], name="relu")],
        "mm_relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, n])],
        [helper.make_tensor("w", TensorProto.FLOAT, [k, n], w.ravel())])
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
    assert tuning_db.has_records(db)
    records = (db / "database_tuning_record.json").read_text().splitlines()
    assert records and all(json.loads(line) for line in records)
    info = first.manifest["tuning"]
    assert info["tuned"] is True and info["trials"] >= 1 and info["budget_trials"] == 2
    assert info["tasks"] == 1 and info["db"] == str(db) and info["cost_model"] in ("xgb",
                                                                                    "random")
    assert info["kernels"] == 1 and info["records_kept"] + info["records_rejected"] == 1
    # the record is used only if it was timed faster than the default schedule
    assert info["records_applied"] == info["records_kept"]
    assert info["default_schedules"] == info["records_rejected"]
    assert info["records_unchecked"] == 0
    (check,) = tune_check.load_checks(db).values()
    assert check.default_us > 0 and check.tuned_us > 0
    assert check.tuned_wins == bool(info["records_kept"])
    assert all(c["ok"] for c in first.manifest["verification"]["outputs"])


def test_second_compile_reuses_records_without_tuning(tuned):
    d, _, first, second = tuned
    info = second.manifest["tuning"]
    assert info["tuned"] is False and info["records_unchecked"] == 0
    assert info["records_applied"] == first.manifest["tuning"]["records_kept"]
    assert info["records_rejected"] == first.manifest["tuning"]["records_rejected"]
    assert info["records_applied"] + info["default_schedules"] == 1
    model = onnx.load(str(d / "b.onnx"))
    inputs = verify.seeded_inputs(verify.onnx_input_specs(model, []), 3)
    ref = verify.run_ort(model, inputs)[0]
    got = runtime.load(second.path).run(inputs)["y"]
    assert np.abs(got - ref).max() / np.abs(ref).max() <= 1e-5


def test_a_record_slower_than_the_default_schedule_is_not_applied(tmp_path):
    """A record whose schedule is the unscheduled serial loop nest (a trace that only looks up a
    block; MetaSchedule ignores empty traces), claiming 1 ns, is applied until checked; the
    check times it against the default schedule (vectorized, parallel: many times faster on
    this 64x256x256 matmul) and later compiles leave it out."""
    import tvm
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms

    from edgekit.compiler import to_relax

    src = _matmul_relu(tmp_path / "big.onnx", 0, rows=64, k=256, n=256)
    model = onnx.load(str(src))
    host = load_target("host")
    mod = pipeline.lower(to_relax(model, verify.onnx_input_specs(model, [])),
                     host.tvm_target())
    (func,) = [f for _, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    db = tmp_path / "db"
    database = tuning_db.open_database(db)
    workload = database.commit_workload(tune_check.workload_module(func))
    naive = s_tir.Schedule(tune_check.workload_module(func))
    naive.get_sblock("relu")  # the epilogue block PropagateNaN writes
    database.commit_tuning_record(ms.database.TuningRecord(
        naive.trace, workload, [1e-9], host.tvm_target(),
        ms.arg_info.ArgInfo.from_prim_func(func)))
    _, counts = tune_check.apply_database(mod, host.tvm_target(), db)
    assert (counts.applied, counts.rejected, counts.unchecked) == (1, 0, 1)
    assert tune_check.check_records(mod, host.tvm_target(), db) == (0, 1)
    (check,) = tune_check.load_checks(db).values()
    assert check.default_us < check.tuned_us
    _, counts = tune_check.apply_database(mod, host.tvm_target(), db)
    assert (counts.applied, counts.rejected, counts.unchecked) == (0, 1, 0)
    result = api.compile(src, "host", tmp_path / "big.edgekit", tuning_db=db)
    info = result.manifest["tuning"]
    assert info["records_applied"] == 0 and info["records_rejected"] == 1
    assert info["default_schedules"] == info["kernels"] == 1
    assert all(c["ok"] for c in result.manifest["verification"]["outputs"])


def test_database_is_keyed_by_target(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEKIT_TUNING_DB", str(tmp_path))
    host, rpi = load_target("host"), load_target("rpi4")
    assert tuning_db.db_dir(host).parent == tmp_path
    assert tuning_db.db_dir(host) != tuning_db.db_dir(rpi)
    assert tuning_db.db_dir(host) == tuning_db.db_dir(load_target("host"))
    assert tuning_db.db_dir(host, tmp_path / "mine") == tmp_path / "mine"


def test_tuning_a_cross_target_is_a_one_line_error(tmp_path):
    src = _matmul_relu(tmp_path / "m.onnx", 0)
    result = CliRunner().invoke(cli, ["tune", str(src), "--target", "rpi4", "--trials", "2",
                                      "--tuning-db", str(tmp_path / "db")])
    assert result.exit_code == 1
    assert result.output.startswith("error: tuning measures on this machine")
    assert len(result.output.strip().splitlines()) == 1
    assert not tuning_db.has_records(tmp_path / "db")


def _two_kernels(path):
    """y = relu(x @ w1) @ w2 + 1: a matmul-relu kernel and a matmul-add kernel."""
    rng = np.random.default_rng(0)
    w1, w2 = (rng.standard_normal((32, 32)).astype(np.float32) for _ in range(2))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["m"]), helper.make_node("Relu", ["m"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["n"]),
         helper.make_node("Add", ["n", "one"], ["y"])],
        "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 32])],
        [helper.make_tensor("w1", TensorProto.FLOAT, [32, 32], w1.ravel()),
         helper.make_tensor("w2", TensorProto.FLOAT, [32, 32], w2.ravel()),
         helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_a_time_budget_ends_the_session_and_the_build_is_still_verified(tmp_path):
    """A budget far shorter than one batch per kernel: the scheduler stops at the deadline
    (MetaSchedule joins what is in flight), fewer kernels than exist may be measured, and the
    compile goes on with records or default schedules, verified."""
    src = _two_kernels(tmp_path / "two.onnx")
    result = api.compile(src, "host", tmp_path / "two.edgekit", tune=True, tune_minutes=0.01,
                         tuning_db=tmp_path / "db")
    info = result.manifest["tuning"]
    assert info["tuned"] is True and info["budget_minutes"] == 0.01 and info["tasks"] == 2
    assert 0 <= info["tasks_tuned"] <= info["tasks"]
    assert info["trials"] <= 16 * max(info["tasks_tuned"], 1)  # at most the batch in flight
    assert info["records_applied"] + info["default_schedules"] == info["kernels"] == 2
    assert all(c["ok"] for c in result.manifest["verification"]["outputs"])


def test_the_budget_measures_the_largest_kernels_first_then_the_most_time_left():
    from types import SimpleNamespace

    from edgekit.compiler.tune_budget import Budget

    def result(secs):
        return SimpleNamespace(error_msg=None, run_secs=[secs])

    Task = SimpleNamespace
    tasks = [Task(is_terminated=False, task_weight=1.0, flop=10.0),
             Task(is_terminated=False, task_weight=2.0, flop=100.0),
             Task(is_terminated=True, task_weight=9.0, flop=1e9),  # finished: never picked
             Task(is_terminated=False, task_weight=1.0, flop=50.0)]
    budget = Budget(total=100, minutes=None, progress=lambda _: None)
    assert [budget.pick(tasks) for _ in range(3)] == [1, 3, 0]  # weight x FLOPs, largest first
    budget.record(1, [result(1e-3)])
    budget.record(3, [result(8e-3), SimpleNamespace(error_msg="build failed", run_secs=[])])
    budget.record(0, [result(5e-3)])
    # then weight x best time / batches: task 3 (8 ms), task 0 (5 ms) and task 3 again
    # (8/2 = 4 ms) before task 1 (2 x 1 ms)
    assert [budget.pick(tasks) for _ in range(3)] == [3, 0, 3]
    assert budget.best == {1: 1e-3, 3: 8e-3, 0: 5e-3} and budget.done == 4
    expired = Budget(total=100, minutes=0.0, progress=lambda _: None)  # deadline = now
    assert expired.pick(tasks) == -1
