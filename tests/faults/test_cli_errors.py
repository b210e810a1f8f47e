"""The issue's goal, re-verified in one sweep: every bad-input case under "Why" (issue 18) that
ends in an error is exactly one ``error:`` line and exit 1 from the CLI: no traceback, no
"internal error" line, nothing else printed.

Each case builds its bad input from one small real artifact (y = x + 1, compiled once) and
runs the real command in process (``CliRunner`` without exception catching: a Python
exception escaping the CLI's handler fails the test with its traceback). The other test files
of ``tests/faults/`` check what each fix does; this one checks how each failure reads.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from numpy.lib import format as npy
from onnx import TensorProto, helper

from edgekit import api
from edgekit.cli import cli
from edgekit.manifest import available_memory

X = np.zeros((1, 4), np.float32)


def _add(path: Path, shape=(1, 4), opset: int = 17) -> Path:
    b = helper.make_tensor("b", TensorProto.FLOAT, [shape[-1]], [1.0] * shape[-1])
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "b"], ["y"])], "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))], [b])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), path)
    return path


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cli-errors")
    return api.compile(_add(d / "add.onnx"), "host", d / "add.edgekit").path


def _edit(art: Path, edit: Callable[[dict], None]) -> None:
    m = json.loads((art / "manifest.json").read_text())
    edit(m)
    (art / "manifest.json").write_text(json.dumps(m))


def _run(art: Path, d: Path, x: Path | None = None, *extra: str) -> list[str]:
    if x is None:
        x = d / "x.npy"
        np.save(x, X)
    return ["run", str(art), "--input", f"x={x}", "-o", str(d / "y.npz"), *extra]


# each case: (its name in the issue, setup(artifact copy, tmp dir) -> CLI args, expected text)
def _unlisted(art, d):  # Why 5: a file the manifest does not list
    (art / "extra.so").write_bytes(b"\x7fELF")
    return _run(art, d)


def _entry_deleted(art, d):  # Why 5: delete a file's entry from the manifest
    _edit(art, lambda m: m["files"].pop("model.onnx"))
    return _run(art, d)


def _malformed(art, d):  # Why 5: malformed manifest fields
    _edit(art, lambda m: m["inputs"][0].update(shape="1x4", dtype="float33"))
    return _run(art, d)


def _not_json(art, d):
    (art / "manifest.json").write_text("{not json")
    return _run(art, d)


def _truncated(art, d):  # Why 5: a truncated .so whose hash was recomputed (was SIGBUS)
    lib = art / "model.so"
    lib.write_bytes(lib.read_bytes()[:4096])
    digest = hashlib.sha256(lib.read_bytes()).hexdigest()
    _edit(art, lambda m: m["files"].update({"model.so": digest}))
    return _run(art, d)


def _symlink(art, d):  # Why 5: symlinks followed out of the artifact
    (art / "model.onnx").rename(d / "outside.onnx")
    (art / "model.onnx").symlink_to(d / "outside.onnx")
    return _run(art, d)


def _wrong_pin(art, d):  # a deployer's pinned digest that does not match
    return _run(art, d, None, "--sha256", "0" * 64)


def _forged_npy(art, d):  # Why 8: a 192-byte .npy declaring 1x3x64x64000000
    header = io.BytesIO()
    npy.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                        "shape": (1, 3, 64, 64000000)})
    (d / "forged.npy").write_bytes(header.getvalue().ljust(192, b"\0"))
    return _run(art, d, d / "forged.npy")


def _wrong_shape(art, d):
    np.save(d / "x2.npy", np.zeros((2, 4), np.float32))
    return _run(art, d, d / "x2.npy")


def _memory(art, d):  # item 7 at load time: the recorded estimate against MemAvailable
    free = available_memory() or 1 << 40
    _edit(art, lambda m: m["memory"].update(activations=4 * free))
    return _run(art, d)


def _not_an_artifact(art, d):
    return ["verify", str(d)]


def _opset_99(art, d):  # Why 9: refused only after a whole TVM build
    return ["compile", str(_add(d / "o.onnx", opset=99)), "-o", str(d / "o.edgekit")]


def _huge_input(art, d):  # Why 8: 1x3x100000x100000 reached a MemoryError after a build
    if (available_memory() or 0) > 2 * 3 * 100000 * 100000 * 4:
        pytest.skip("this machine has the memory for it")
    return ["compile", str(_add(d / "big.onnx", (1, 3, 100000, 100000))), "-o",
            str(d / "big.edgekit")]


def _strict_refused(art, d):  # Why 9: rewrite exited 0 when a requested pass was refused
    return ["rewrite", str(_add(d / "r.onnx")), "-o", str(d / "r2.onnx"), "--passes",
            "fold-bn", "--strict"]


def _he_lookup_without_cut(art, d):  # Why 4: a lookup by token ids without the cut option
    return ["he-check", str(_add(d / "h.onnx")), "--cut-embeddings"]


CASES = {
    "unlisted file": (_unlisted, "extra.so is not listed"),
    "file entry deleted": (_entry_deleted, "model.onnx is not listed"),
    "malformed manifest fields": (_malformed, "manifest.json is malformed"),
    "manifest not JSON": (_not_json, "not valid JSON"),
    "truncated library, hash recomputed": (_truncated, "truncated"),
    "symlink in the artifact": (_symlink, "symlink"),
    "wrong pinned digest": (_wrong_pin, "is not the pinned"),
    "forged .npy header": (_forged_npy, "64000000"),
    "input of the wrong shape": (_wrong_shape, "expected shape (1, 4)"),
    "recorded memory over MemAvailable": (_memory, "is available"),
    "not an artifact": (_not_an_artifact, "not an edgekit artifact"),
    "opset 99": (_opset_99, "opset 99"),
    "huge ONNX input": (_huge_input, "estimated"),
    "rewrite --strict, pass refused": (_strict_refused, "strict: fold-bn was"),
    "he cut without a lookup": (_he_lookup_without_cut, "no embedding lookup to cut"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_error_line(artifact, tmp_path, case):
    setup, expected = CASES[case]
    art = Path(shutil.copytree(artifact, tmp_path / "a.edgekit"))
    result = CliRunner().invoke(cli, setup(art, tmp_path), catch_exceptions=False)
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "internal error" not in result.output
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], result.output
    assert expected in errors[0], errors[0]
