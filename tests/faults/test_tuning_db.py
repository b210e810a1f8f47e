"""The tuning database under faults, for real: two `edgekit tune` processes on one database, a
torn last record (a crash mid-append), `kill -9` of a tune mid-session. Each time the next
`edgekit compile` must pass, bad lines must be skipped with one warning naming the file and the
fix, and `edgekit tune --repair` must leave a database with no bad line.

Why: the default database is shared per user and target (two CI jobs are enough), and
MetaSchedule's JSONDatabase appended without a lock, numbered workloads per process and failed
for good on one torn line ("Unexpected end of string")."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from _tiny_graphs import chain
from onnx import TensorProto, helper

from edgekit.compiler import tuning_db

EDGEKIT = [sys.executable, "-c", "from edgekit.cli import main; main()"]
RECORDS = "database_tuning_record.json"
WORKLOADS = "database_workload.json"


def two_kernels(path: Path) -> Path:
    """y = relu(x @ w1) @ w2 + 1: a matmul-relu kernel and a matmul-add kernel (tiny)."""
    rng = np.random.default_rng(0)
    w1, w2 = (rng.standard_normal((16, 16)).astype(np.float32) for _ in range(2))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["m"]), helper.make_node("Relu", ["m"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["n"]),
         helper.make_node("Add", ["n", "one"], ["y"])],
        "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor("w1", TensorProto.FLOAT, [16, 16], w1.ravel()),
         helper.make_tensor("w2", TensorProto.FLOAT, [16, 16], w2.ravel()),
         helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def edgekit(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGEKIT, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def tune_proc(model: Path, db: Path, trials: int) -> subprocess.Popen:
    """`edgekit tune` in its own process group (its MetaSchedule workers die with it)."""
    return subprocess.Popen([*EDGEKIT, "tune", str(model), "--trials", str(trials),
                             "--tuning-db", str(db)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def assert_compiles(model: Path, db: Path, out: Path) -> dict:
    result = edgekit("compile", model, "-o", out, "--tuning-db", db)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(c["ok"] for c in manifest["verification"]["outputs"])
    return manifest["tuning"]


def no_temp_files(db: Path) -> bool:
    return not [p for p in db.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return two_kernels(tmp_path_factory.mktemp("tdb") / "two.onnx")


def test_two_concurrent_tunes_then_a_compile_passes(tmp_path):
    """Two models sharing kernel P: a = (P, Q), b = (R, P). Before, each process numbered
    workloads itself, so b's records named a's lines: 2 of 4 records belonged to another
    kernel and the workload file held P twice."""
    a, b = chain(tmp_path / "a.onnx", [16, 32, 8]), chain(tmp_path / "b.onnx", [8, 16, 32])
    db = tmp_path / "db"
    procs = [tune_proc(m, db, 2) for m in (a, b)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, out + err
        assert "of 2 kernel(s) got measured candidates" in out
    contents = tuning_db.read(db)
    assert contents.bad == []  # every record names its own kernel's line
    assert len(contents.database.get_all_tuning_records()) >= 2
    assert len((db / WORKLOADS).read_text().splitlines()) == 3  # P, Q, R: P once
    for m in (a, b):
        info = assert_compiles(m, db, tmp_path / f"{m.stem}.edgekit")
        assert info["records_skipped"] == []
        assert info["records_applied"] + info["default_schedules"] == info["kernels"] == 2
    assert no_temp_files(db)


def test_a_torn_last_record_is_skipped_reported_and_repaired(model, tmp_path):
    db = tmp_path / "db"
    proc = tune_proc(model, db, 1)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out + err
    # truthful counts: one trial reaches at most one of the two kernels (was "2 kernel(s) tuned")
    assert re.search(r"[01] of 2 kernel\(s\) got measured candidates", out), out
    assert "the others keep edgekit's default schedules" in out
    whole = (db / RECORDS).read_bytes()
    line = whole.splitlines()[0]
    with open(db / RECORDS, "ab") as f:  # a crash mid-append: half a record, no newline
        f.write(line[: len(line) // 2])
    info = assert_compiles(model, db, tmp_path / "a.edgekit")
    assert len(info["records_skipped"]) == 1 and "torn" in info["records_skipped"][0]
    result = edgekit("compile", model, "-o", tmp_path / "b.edgekit", "--tuning-db", db)
    assert result.returncode == 0
    (warning,) = [ln for ln in result.stderr.splitlines() if "warning" in ln]
    assert f"{RECORDS} line 2: torn" in warning and "edgekit tune --repair" in warning
    # a write after the fragment stays whole: the fragment becomes its own (bad) line
    database = tuning_db.open_database(db, quiet=True)
    (record,) = database.get_all_tuning_records()[:1]
    tuning_db.commit(db, record.workload, record)
    assert len(tuning_db.read(db).bad) == 1
    repaired = edgekit("tune", "--repair", "--tuning-db", db)
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert "removed 1 bad line" in repaired.stdout
    assert tuning_db.read(db).bad == [] and no_temp_files(db)
    assert (db / RECORDS).read_bytes().startswith(whole)
    assert assert_compiles(model, db, tmp_path / "c.edgekit")["records_skipped"] == []


def test_kill_9_mid_tune_then_a_compile_passes(model, tmp_path):
    db = tmp_path / "db"
    proc = tune_proc(model, db, 64)
    deadline = time.monotonic() + 600
    while not tuning_db.has_records(db):  # mid-session: the first records are in
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert tuning_db.read(db).bad == []
    info = assert_compiles(model, db, tmp_path / "x.edgekit")
    assert info["records_skipped"] == []


def test_a_foreign_database_is_skipped_and_an_unreadable_one_named(tmp_path, model):
    db = tmp_path / "db"
    db.mkdir()
    (db / WORKLOADS).write_text('["1", "bm90IGEgbW9kdWxl"]\n{"a": 1}\n')
    (db / RECORDS).write_text('[0, []]\n[7, []]\nnot json\n')
    bad = tuning_db.read(db).bad
    assert [(b.file, b.line) for b in bad] == [(WORKLOADS, 1), (WORKLOADS, 2), (RECORDS, 1),
                                                (RECORDS, 2), (RECORDS, 3)]
    assert "foreign" in bad[0].reason and "torn" in bad[4].reason
    info = assert_compiles(model, db, tmp_path / "x.edgekit")
    assert len(info["records_skipped"]) == 5
    (db / RECORDS).chmod(0)
    if os.access(db / RECORDS, os.R_OK):  # root reads anything
        return
    result = edgekit("compile", model, "-o", tmp_path / "y.edgekit", "--tuning-db", db)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: cannot read {db / RECORDS}: Permission denied"]
