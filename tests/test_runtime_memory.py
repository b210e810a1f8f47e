"""``runtime.load`` keeps one copy of the weights: the VM's tensors, not also the library.

Before: the library, weights inside its embedded executable, stayed mapped from its sealed
memfd for as long as it was loaded (and all of it was resident: tvm_ffi reads the executable
out of the mapping). Now the embedded modules are loaded from the hashed bytes and the
library is mapped with that blob left out (a hole). Real compile, real TVM, fresh process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgekit import api, hashed_library, runtime

ROWS = 1024  # a 1024 x 1024 float32 weight: 4 MiB, far above the library's code

PROBE = """
import json, sys
import numpy as np
from edgekit import runtime

model = runtime.load(sys.argv[1])
x = np.load(sys.argv[2])
y = model.run(x)["y"]
np.save(sys.argv[3], y)
rss, path = {}, None  # resident KiB per mapped file, from smaps
for line in open("/proc/self/smaps"):
    fields = line.split()
    if "-" in fields[0] and len(fields) >= 5:
        path = fields[5] if len(fields) > 5 else ""
    elif fields[0] == "Rss:" and path:
        rss[path] = rss.get(path, 0) + int(fields[1])
print(json.dumps({"memfd_kib": sum(v for k, v in rss.items() if "memfd:model.so" in k)}))
"""


@pytest.fixture(scope="module")
def matmul_artifact(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """y = x @ W, x: 1 x ROWS, W: ROWS x ROWS float32 constant; returns (artifact, W)."""
    d = tmp_path_factory.mktemp("weights")
    w = np.random.default_rng(0).standard_normal((ROWS, ROWS)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, ROWS])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, ROWS])],
        [onnx.numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
              d / "m.onnx")
    return api.compile(d / "m.onnx", "host", d / "m.edgekit").path, w


def test_the_library_is_parsed_into_its_embedded_modules(matmul_artifact):
    art, _ = matmul_artifact
    data = (art / runtime.LIBRARY).read_bytes()
    start, end, modules, indptr, children = hashed_library._embedded_modules(data)
    kinds = [k for k, _ in modules]
    assert sorted(kinds) == ["_lib", "relax.VMExecutable"], kinds
    assert end - start > ROWS * ROWS * 4  # the weights are inside the blob
    assert len(indptr) == len(modules) + 1 and indptr[-1] == len(children)


def test_loaded_library_does_not_hold_the_weights(matmul_artifact, tmp_path):
    art, w = matmul_artifact
    x = np.random.default_rng(1).standard_normal((1, ROWS)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    proc = subprocess.run([sys.executable, "-c", PROBE, str(art), str(tmp_path / "x.npy"),
                           str(tmp_path / "y.npy")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), x @ w, rtol=1e-4, atol=1e-4)
    # before: the whole 4 MiB blob was resident in the library's mapping
    assert report["memfd_kib"] < ROWS * ROWS * 4 // 1024 // 4, report
