"""examples/cpp/minimal.cc: built with the Makefile against the installed wheels, run on a
compiled artifact, and its printed output equal to the Python runtime's on the same input."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgekit import runtime

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "cpp"


@pytest.fixture(scope="module")
def minimal(tmp_path_factory) -> Path:
    if shutil.which("g++") is None or shutil.which("make") is None:
        pytest.skip("needs g++ and make (apt-get install g++ make)")
    out = tmp_path_factory.mktemp("cpp")
    shutil.copy(EXAMPLES / "Makefile", out)
    shutil.copy(EXAMPLES / "minimal.cc", out)
    subprocess.run(["make", "-s", "minimal", f"PYTHON={sys.executable}"], cwd=out, check=True,
                   capture_output=True)
    return out / "minimal"


def test_minimal_prints_what_the_python_runtime_computes(minimal, compiled_default, tmp_path):
    model = runtime.load(compiled_default.path)
    spec = model.manifest["inputs"][0]
    x = np.sin(np.arange(np.prod(spec["shape"]))).astype(np.float32).reshape(spec["shape"])
    x.tofile(tmp_path / "x.bin")
    dims = "x".join(map(str, spec["shape"]))
    printed = subprocess.run([str(minimal), str(compiled_default.path / "model.so"),
                              str(tmp_path / "x.bin"), dims], check=True, capture_output=True,
                             text=True).stdout.split()
    expected = next(iter(model.run(x).values())).reshape(-1)
    assert printed == [f"{v:.6g}" for v in expected]


def test_minimal_rejects_an_input_of_the_wrong_size(minimal, compiled_default, tmp_path):
    np.zeros(3, np.float32).tofile(tmp_path / "short.bin")
    result = subprocess.run([str(minimal), str(compiled_default.path / "model.so"),
                             str(tmp_path / "short.bin"), "1x3x32x32"], capture_output=True,
                            text=True)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "must hold exactly" in result.stderr
    usage = subprocess.run([str(minimal)], capture_output=True, text=True)
    assert usage.returncode == 2 and usage.stderr.startswith("usage: minimal")
