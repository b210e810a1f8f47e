"""Interrupted writes (issue 18, Why 7): SIGTERM / SIGHUP during a compile clean up like
Ctrl-C, staging directories of killed runs are removed by the next compile, and replacing an
artifact never leaves its name missing. Real processes and real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from edgekit import api, artifact, scratch

EDGEKIT = [sys.executable, "-c", "from edgekit.cli import main; main()"]


@pytest.fixture(scope="module")
def add_onnx(tmp_path_factory) -> Path:
    b = helper.make_tensor("b", TensorProto.FLOAT, [4], [1.0] * 4)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "b"], ["y"])], "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [b])
    path = tmp_path_factory.mktemp("m") / "add.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _compile_until_staging(add_onnx: Path, out: Path, tmp: Path) -> subprocess.Popen:
    """Start `edgekit compile` (its TMPDIR private) and return once its staging directory
    exists: the moment a CI cancel hurts most (library linked, check running)."""
    env = {**os.environ, "TMPDIR": str(tmp)}
    proc = subprocess.Popen([*EDGEKIT, "compile", str(add_onnx), "-o", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not any(p.name.startswith(f".{out.name}.") for p in out.parent.iterdir()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no staging directory appeared"
        time.sleep(0.005)
    return proc


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signal_during_compile_leaves_nothing(add_onnx, tmp_path, sig):
    out_dir, tmp = tmp_path / "out", tmp_path / "tmp"
    out_dir.mkdir()
    tmp.mkdir()
    proc = _compile_until_staging(add_onnx, out_dir / "m.edgekit", tmp)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, (proc.returncode, err)
    assert err.strip().splitlines()[-1] == ("error: interrupted" if sig == signal.SIGINT else
                                            f"error: interrupted by {sig.name}")
    assert "Traceback" not in err
    assert sorted(p.name for p in out_dir.iterdir()) == []  # no staging dir, no artifact
    assert sorted(p.name for p in tmp.iterdir()) == []  # no TVM temp directories


def test_next_compile_removes_staging_of_killed_runs_only(add_onnx, tmp_path):
    out_dir, tmp = tmp_path / "out", tmp_path / "tmp"
    out_dir.mkdir()
    tmp.mkdir()
    out = out_dir / "m.edgekit"
    proc = _compile_until_staging(add_onnx, out, tmp)
    proc.kill()  # SIGKILL: nothing can clean up
    proc.communicate(timeout=60)
    (left,) = [p for p in out_dir.iterdir()]
    assert left.name.startswith(".m.edgekit.") and left.is_dir()
    # a staging directory of a process that still runs (this one) must survive
    busy = out_dir / f".m.edgekit.{scratch.host_name()}-{os.getpid()}.busy.staging"
    busy.mkdir()
    api.compile(add_onnx, "host", out)
    assert sorted(p.name for p in out_dir.iterdir()) == sorted([busy.name, "m.edgekit"])


def test_next_command_removes_temporary_files_of_killed_runs(add_onnx, tmp_path):
    """Each command keeps TVM's temporary files in a private folder under TMPDIR; SIGKILL
    leaves it, and the next edgekit command (any) removes it."""
    out_dir, tmp = tmp_path / "out", tmp_path / "tmp"
    out_dir.mkdir()
    tmp.mkdir()
    proc = _compile_until_staging(add_onnx, out_dir / "m.edgekit", tmp)
    proc.kill()
    proc.communicate(timeout=60)
    (left,) = list(tmp.iterdir())
    assert left.name.startswith(f"edgekit-run.{scratch.host_name()}-{proc.pid}.")
    done = subprocess.run([*EDGEKIT, "targets"], env={**os.environ, "TMPDIR": str(tmp)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert list(tmp.iterdir()) == []


def test_replacing_an_artifact_never_leaves_its_name_missing(tmp_path):
    out = tmp_path / "r.edgekit"

    def publish(i: int) -> None:
        with artifact.staging(out) as tmp:
            (tmp / "model.so").write_bytes(b"%d" % i)
            artifact.publish(tmp, out, {"round": i})

    publish(0)
    misses, stop = [], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            if not (out / "manifest.json").is_file():
                misses.append(time.monotonic())

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: between any two calls
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for i in range(1, 200):
            publish(i)
    finally:
        stop.set()
        watcher.join()
        sys.setswitchinterval(interval)
    assert misses == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.edgekit"]
    assert (out / "model.so").read_bytes() == b"199"
