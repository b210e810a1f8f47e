"""The embeddable runtime runs an artifact on numpy and TVM's runtime alone: in a fresh
interpreter it imports no onnx, no torch, no ``tvm`` package and maps no TVM compiler library,
both beside a full edgekit install (torch installed) and in a virtual environment that holds
only numpy, apache-tvm, apache-tvm-ffi and edgekit installed with ``--no-deps``."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from edgekit import verify
from edgekit.artifact import ONNX_FILE
from edgekit.devices.toolchain import cache_dir

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_ONLY = ("numpy", "apache-tvm", "apache-tvm-ffi")

# Runs in the fresh interpreter: load + run, then report what the process holds.
PROBE = """
import json, sys
import numpy as np
from edgekit import runtime

artifact, inputs, outputs, then = sys.argv[1:5]
np.savez(outputs, **runtime.load(artifact).run(dict(np.load(inputs))))

def held():
    maps = {line.split()[-1].rsplit("/", 1)[-1] for line in open("/proc/self/maps")
            if "libtvm" in line}
    mods = [m for m in ("onnx", "onnxruntime", "torch", "tvm") if m in sys.modules]
    return {"libs": sorted(maps), "modules": mods}

report = {"edgekit": runtime.__file__, "light": held()}
if then == "import-compiler":  # the full TVM after the runtime, in the same process
    import tvm
    from tvm import relax
    vm = relax.VirtualMachine(tvm.runtime.load_module(artifact + "/model.so"), tvm.cpu())
    x = dict(np.load(inputs))
    y = vm["main"](*(tvm.runtime.tensor(a) for a in x.values()))
    again = runtime.load(artifact).run(x)
    report["compiler"] = held()
    report["same"] = bool(np.array_equal(y.numpy(), next(iter(again.values()))))
    import torch  # still importable: the runtime only kept tvm_ffi from importing it
    report["torch"] = torch.__version__
print(json.dumps(report))
"""


def _inputs_and_reference(artifact: Path, tmp_path: Path) -> tuple[Path, list[np.ndarray]]:
    manifest = json.loads((artifact / "manifest.json").read_text())
    inputs = verify.seeded_inputs([verify.TensorSpec.from_dict(i) for i in manifest["inputs"]])
    path = tmp_path / "inputs.npz"
    np.savez(path, **inputs)
    return path, verify.run_ort(str(artifact / ONNX_FILE), inputs)


def _probe(python: Path | str, artifact: Path, tmp_path: Path, then: str = "") -> dict:
    inputs, reference = _inputs_and_reference(artifact, tmp_path)
    script, outputs = tmp_path / "probe.py", tmp_path / "outputs.npz"
    script.write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TVM_USE_RUNTIME_LIB")}
    proc = subprocess.run([str(python), str(script), str(artifact), str(inputs), str(outputs),
                           then], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = list(np.load(outputs).values())
    assert len(got) == len(reference)
    for g, r in zip(got, reference, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_light(held: dict) -> None:
    assert held["modules"] == []
    assert "libtvm_runtime.so" in held["libs"]  # the probe does see TVM's libraries
    assert not [lib for lib in held["libs"]
                if lib.startswith("libtvm") and not lib.startswith(("libtvm_runtime.",
                                                                     "libtvm_ffi"))]


def test_fresh_interpreter_runs_without_onnx_torch_or_the_compiler(compiled_default,
                                                                   tmp_path):
    assert importlib.util.find_spec("torch") is not None  # torch is there and not imported
    report = _probe(sys.executable, compiled_default.path, tmp_path, "import-compiler")
    assert Path(report["edgekit"]).is_relative_to(ROOT / "edgekit")
    _assert_light(report["light"])
    # the full compiler afterwards: it maps its library, imports fine, computes the same
    assert "libtvm_compiler.so" in report["compiler"]["libs"]
    assert "tvm" in report["compiler"]["modules"] and report["same"] and report["torch"]


def _runtime_only_env() -> Path:
    """A venv with the runtime's three packages (this environment's versions, so pip takes
    them from its cache), kept under edgekit's cache; edgekit is reinstalled each time."""
    versions = {dist: importlib.metadata.version(dist) for dist in RUNTIME_ONLY}
    key = f"py{sys.version_info[0]}.{sys.version_info[1]}-" + "-".join(
        f"{d}{v}" for d, v in versions.items())
    env = cache_dir() / "runtime-venv" / key
    python = env / "bin" / "python"

    def pip(*args: str) -> None:
        proc = subprocess.run([str(python), "-m", "pip", "install", "-q", *args],
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
            pytest.skip(f"cannot build the runtime-only environment: pip install {args[-1]}: "
                        f"{lines[-1]}")

    if not (env / "ready").is_file():
        shutil.rmtree(env, ignore_errors=True)
        env.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(env)], check=True,
                       timeout=300)
        pip(*(f"{d}=={v}" for d, v in versions.items()))
        (env / "ready").write_text(json.dumps(versions))
    with tempfile.TemporaryDirectory() as build:  # a clean copy: no build/ left in the tree
        pip("--no-deps", "--force-reinstall", "--no-cache-dir", str(_source_copy(build)))
    return python


def _source_copy(build: str) -> Path:
    src = Path(build) / "edgekit-src"
    ignore = shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.egg-info", "build",
                                    "tests", "bench", "docs", "examples")
    shutil.copytree(ROOT, src, ignore=ignore)
    return src


def test_runtime_only_environment_runs_an_artifact(compiled_default, tmp_path):
    python = _runtime_only_env()
    report = _probe(python, compiled_default.path, tmp_path)
    assert Path(report["edgekit"]).is_relative_to(python.parents[1])  # the installed copy
    _assert_light(report["light"])
    absent = subprocess.run([str(python), "-c", "import importlib.util as u; print([m for m in "
                             "('torch', 'onnx', 'onnxruntime') if u.find_spec(m)])"],
                            capture_output=True, text=True, check=True)
    assert absent.stdout.strip() == "[]"  # really runtime-only, not merely unimported
