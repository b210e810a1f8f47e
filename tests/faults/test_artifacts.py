"""Artifacts as an adversary or an unlucky deployer meets them (issue 18, Why 2, 5 and 9):
reload after replace, files the manifest does not list, symlinks, malformed manifests, a
truncated library with its hash recomputed, the manifest's own digest, a ``source`` that must
not be imported, and a model without inputs. Real compiles, real processes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from _tiny_graphs import elementwise
from onnx import TensorProto, helper

from edgekit import api, runtime

EDGEKIT = [sys.executable, "-c", "from edgekit.cli import main; main()"]


@pytest.fixture(scope="module")
def two_models(tmp_path_factory) -> tuple[Path, Path]:
    """Two artifacts of the same shape whose outputs differ: x + 1 and x + 100."""
    d = tmp_path_factory.mktemp("two")
    one = api.compile(elementwise(d / "one.onnx", "Add", 1.0), "host", d / "one.edgekit").path
    hundred = api.compile(elementwise(d / "h.onnx", "Add", 100.0), "host", d / "h.edgekit").path
    return one, hundred


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_manifest(art: Path, edit) -> None:
    m = json.loads((art / "manifest.json").read_text())
    edit(m)
    (art / "manifest.json").write_text(json.dumps(m))


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGEKIT, *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    """A refused artifact: exit 1, one ``error:`` line, no traceback, no internal error."""
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "internal error" not in proc.stderr and "Traceback" not in proc.stderr
    return lines[0]


X = np.zeros((1, 4), np.float32)


def test_reload_after_replace_runs_the_new_code(two_models, tmp_path):
    one, hundred = two_models
    path = _copy(one, tmp_path / "m.edgekit")
    first = runtime.load(path)
    assert first.run(X)["y"][0, 0] == 1.0
    shutil.rmtree(path)
    shutil.copytree(hundred, path)  # "recompile another model to the same path"
    assert runtime.load(path).run(X)["y"][0, 0] == 100.0
    assert first.run(X)["y"][0, 0] == 1.0  # the first stays what it was
    # what runs is the hashed copy, never the file in the artifact (no second read)
    maps = Path("/proc/self/maps").read_text()
    assert str(path / "model.so") not in maps


def test_unlisted_and_missing_files_are_refused(two_models, tmp_path):
    one, _ = two_models
    art = _copy(one, tmp_path / "extra.edgekit")
    (art / "evil.so").write_bytes(b"\x7fELF")
    with pytest.raises(runtime.ArtifactError, match="evil.so is not listed in the manifest"):
        runtime.load(art)
    (art / "evil.so").unlink()
    _edit_manifest(art, lambda m: m["files"].pop("model.onnx"))  # drop an entry
    with pytest.raises(runtime.ArtifactError, match="model.onnx is not listed"):
        runtime.load(art)
    _edit_manifest(art, lambda m: m["files"].pop("model.so"))
    with pytest.raises(runtime.ArtifactError, match="files must .* lists model.so"):
        runtime.load(art)


def test_symlinks_are_refused(two_models, tmp_path):
    one, _ = two_models
    art = _copy(one, tmp_path / "link.edgekit")
    outside = tmp_path / "outside.onnx"
    (art / "model.onnx").rename(outside)
    (art / "model.onnx").symlink_to(outside)  # same bytes, same hash, but out of the dir
    with pytest.raises(runtime.ArtifactError, match="model.onnx is a symlink"):
        runtime.load(art)
    art2 = _copy(one, tmp_path / "link2.edgekit")
    (art2 / "manifest.json").rename(tmp_path / "m.json")
    (art2 / "manifest.json").symlink_to(tmp_path / "m.json")
    with pytest.raises(runtime.ArtifactError, match="symlink is refused"):
        runtime.load(art2)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: m.update(inputs="x"), "inputs must be a list"),
    (lambda m: m["inputs"][0].update(shape="1x4"), r"inputs\[0\].shape must be a list"),
    (lambda m: m["inputs"][0].update(dtype="float33"), r"inputs\[0\].dtype must name"),
    (lambda m: m["inputs"][0].pop("name"), r"inputs\[0\].name must be a string"),
    (lambda m: m.update(target=5), "target must be an object"),
    (lambda m: m["files"].update({"model.so": 5}), r"files\['model.so'\] must be a sha256"),
    (lambda m: m.update(streaming={"chunk": "a"}), "streaming.chunk must be an integer"),
    (lambda m: m.update(source=[]), "source must be an object"),
    (lambda m: m.update(outputs=None), "outputs must be a list"),
])
def test_malformed_manifest_fields_give_one_clear_error(two_models, tmp_path, edit, message):
    one, _ = two_models
    art = _copy(one, tmp_path / "bad.edgekit")
    _edit_manifest(art, edit)
    with pytest.raises(runtime.ArtifactError, match=message):
        runtime.load(art)
    np.save(tmp_path / "x.npy", X)
    line = _one_error_line(_cli("run", str(art), "--input", f"x={tmp_path / 'x.npy'}",
                                "-o", str(tmp_path / "o.npz")))
    assert "manifest.json is malformed" in line


def _rehash(art: Path, name: str) -> None:
    digest = hashlib.sha256((art / name).read_bytes()).hexdigest()
    _edit_manifest(art, lambda m: m["files"].update({name: digest}))


def test_truncated_library_with_recomputed_hash_is_an_error_not_sigbus(two_models, tmp_path):
    one, _ = two_models
    art = _copy(one, tmp_path / "cut.edgekit")
    data = (art / "model.so").read_bytes()
    (art / "model.so").write_bytes(data[: len(data) // 2])
    _rehash(art, "model.so")
    np.save(tmp_path / "x.npy", X)
    proc = _cli("run", str(art), "--input", f"x={tmp_path / 'x.npy'}", "-o",
                str(tmp_path / "o.npz"))
    assert "model.so is truncated" in _one_error_line(proc)


def test_library_for_another_machine_is_refused_by_its_elf_header(two_models, tmp_path):
    one, _ = two_models
    art = _copy(one, tmp_path / "arch.edgekit")
    data = bytearray((art / "model.so").read_bytes())
    data[18:20] = (183 if data[18] != 183 else 62).to_bytes(2, "little")  # e_machine
    (art / "model.so").write_bytes(bytes(data))
    _rehash(art, "model.so")
    with pytest.raises(runtime.ArtifactError, match="is ELF machine"):
        runtime.load(art)
    (art / "model.so").write_bytes(b"#!/bin/sh\necho not a library\n")
    _rehash(art, "model.so")
    with pytest.raises(runtime.ArtifactError, match="not an ELF shared library"):
        runtime.load(art)


def test_verify_prints_the_digest_a_deployer_pins(two_models, tmp_path):
    one, _ = two_models
    art = _copy(one, tmp_path / "pin.edgekit")
    digest = hashlib.sha256((art / "manifest.json").read_bytes()).hexdigest()
    proc = _cli("verify", str(art))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [digest, str(art)]
    assert _cli("verify", str(art), "--sha256", digest).returncode == 0
    assert "is not the pinned" in _one_error_line(_cli("verify", str(art), "--sha256",
                                                       "0" * 64))
    assert runtime.load(art, sha256=digest).run(X)["y"][0, 0] == 1.0
    # any edit, even to a field no check reads, changes the digest and breaks the pin
    _edit_manifest(art, lambda m: m.update(created="2000-01-01T00:00:00+00:00"))
    with pytest.raises(runtime.ArtifactError, match="is not the pinned"):
        runtime.load(art, sha256=digest)
    np.save(tmp_path / "x.npy", X)
    assert "is not the pinned" in _one_error_line(_cli(
        "run", str(art), "--sha256", digest, "--input", f"x={tmp_path / 'x.npy'}",
        "-o", str(tmp_path / "o.npz")))
    # verify checks everything load checks, without running the library
    (art / "stray.txt").write_text("x")
    assert "stray.txt is not listed" in _one_error_line(_cli("verify", str(art)))


NET = '''
import torch
from torch import nn

def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
'''


@pytest.fixture(scope="module")
def python_artifact(tmp_path_factory) -> tuple[Path, Path]:
    """An artifact compiled from file.py:factory whose file declares no INPUTS (the shapes
    were given with --input at export), and that file."""
    d = tmp_path_factory.mktemp("py")
    (d / "net.py").write_text(NET)
    exported = api.export(f"{d / 'net.py'}:make", d / "net.onnx",
                          inputs=[api.parse_input_spec("input:1x8:float32")])
    compiled = api.compile(d / "net.onnx", "host", d / "net.edgekit",
                           source=exported.source.to_dict())
    return compiled.path, d / "net.py"


def test_profile_never_imports_the_manifests_source(python_artifact, tmp_path):
    art, net = python_artifact
    marker = tmp_path / "imported"
    poisoned = tmp_path / "net.py"  # what an attacker (or a later edit) puts at that path
    poisoned.write_text(f"open({str(marker)!r}, 'w').close()\n" + NET)
    evil = _copy(art, tmp_path / "evil.edgekit")
    _edit_manifest(evil, lambda m: m["source"].update(spec=f"{poisoned}:make"))
    proc = _cli("profile", str(evil), "--compare", "torch", "--repeat", "3", "--warmup", "1",
                "--json")
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists()
    notes = json.loads(proc.stdout)["notes"]
    assert any("pass --source FILE.py:factory" in n for n in notes), notes


def test_profile_compare_torch_uses_the_manifests_input_shapes(python_artifact):
    art, net = python_artifact
    proc = _cli("profile", str(art), "--compare", "torch", "--source", f"{net}:make",
                "--repeat", "3", "--warmup", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert "torch" in result["baselines"], result["notes"]


def test_artifact_without_inputs_runs_from_the_cli(tmp_path):
    c = helper.make_tensor("c", TensorProto.FLOAT, [2, 3], [1, -2, 3, -4, 5, -6])
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["k"], value=c), helper.make_node("Relu", ["k"], ["y"])],
        "no_inputs", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
              tmp_path / "zero.onnx")
    api.compile(tmp_path / "zero.onnx", "host", tmp_path / "zero.edgekit")
    proc = _cli("run", str(tmp_path / "zero.edgekit"), "-o", str(tmp_path / "z.npz"))
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "z.npz")["y"], [[1, 0, 3], [0, 5, 0]])


def test_no_temporary_library_copies_are_left(two_models, tmp_path):
    """The hashed bytes load from an anonymous file: nothing appears in TMPDIR."""
    one, _ = two_models
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    code = ("import numpy as np; from edgekit import runtime; "
            f"print(runtime.load({str(one)!r}).run(np.zeros((1, 4), np.float32))['y'][0, 0])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.stdout.strip() == "1.0", proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_published_artifact_is_readable_like_a_file(two_models):
    """mkdtemp stages with mode 0700; the published directory follows the umask instead."""
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(two_models[0].stat().st_mode) == 0o777 & ~mask
