"""Tests for edgekit.targets: every built-in TOML, spec forms, errors, inheritance, real builds."""

from __future__ import annotations

import json
import platform
import shutil
import struct
from pathlib import Path

import pytest

from edgekit import targets as targets_mod
from edgekit.errors import EdgekitError
from edgekit.targets import Target, list_targets, load_target

TARGETS_DIR = Path(__file__).resolve().parent.parent / "targets"
REQUIRED = {"host", "x86-64-v3", "x86-64-v4", "aarch64-linux", "rpi4", "rpi5", "android-arm64",
            "cuda-sm80", "cuda-sm90", "jetson-orin"}
EM_AARCH64 = 183


@pytest.mark.parametrize("path", sorted(TARGETS_DIR.glob("*.toml")), ids=lambda p: p.stem)
def test_every_target_file_is_valid(path: Path) -> None:
    import tvm

    t = load_target(path.stem)
    assert t.name == path.stem and t.description and t.device in ("cpu", "cuda")
    assert isinstance(t.tvm_target(), tvm.target.Target)
    d = t.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["tvm"]["kind"] == ("cuda" if t.device == "cuda" else "llvm")
    if t.cross_compiler:
        assert t.cross_package, f"{path.name}: cross_compiler without cross_package"
    assert load_target(str(path)).to_dict()["tvm"] == d["tvm"]  # same via the path form


def test_list_targets_has_required_names_sorted() -> None:
    names = [t.name for t in list_targets()]
    assert names == sorted(names) and set(names) >= REQUIRED


def test_host_detects_cpu_and_runs_on_host() -> None:
    from tvm.target.codegen import llvm_get_system_cpu

    t = load_target("host")
    assert t.tvm["mcpu"] == llvm_get_system_cpu() and t.tvm["mcpu"] not in ("detect", "generic")
    assert isinstance(t.tvm["num-cores"], int) and t.tvm["num-cores"] >= 1
    assert t.runs_on_host and t.find_cross_compiler() is None


def test_tvm_mapping_is_read_only() -> None:
    t = load_target("rpi4")
    with pytest.raises(TypeError):
        t.tvm["mcpu"] = "x"  # type: ignore[index]
    assert t.to_dict()["tvm"]["mattr"] == ["+neon"]


def test_runs_on_host_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("rpi4", "aarch64-linux", "cuda-sm80", "jetson-orin"):
        assert not load_target(name).runs_on_host, name
    if platform.machine() not in ("x86_64", "AMD64"):
        return
    flags = targets_mod._cpu_flags() or frozenset()
    assert load_target("x86-64-v4").runs_on_host == ("avx512f" in flags)
    assert load_target("x86-64-v3").runs_on_host == (flags >= {"avx2", "fma", "bmi2"})
    v3_only = frozenset({"sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "bmi1", "bmi2"})
    monkeypatch.setattr(targets_mod, "_cpu_flags", lambda: v3_only)
    assert load_target("x86-64-v3").runs_on_host
    assert not load_target("x86-64-v4").runs_on_host
    # a CPU model whose AVX-512 is masked (VM): "host" turns the missing extensions off
    import tvm
    from tvm.target import codegen

    host = load_target("host")
    cpu_feats = codegen.llvm_get_cpu_features(tvm.target.Target({"kind": "llvm",
                                                                 "mcpu": host.tvm["mcpu"]}))
    if "avx512f" in cpu_feats:
        assert "-avx512f" in host.tvm["mattr"]
    assert host.runs_on_host


def test_cross_compiler_missing_message(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(EdgekitError, match=r"android-arm64.*aarch64-linux-android.*Android NDK"):
        load_target("android-arm64").find_cross_compiler()
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(EdgekitError) as e:
        load_target("rpi4").find_cross_compiler()
    assert str(e.value) == ("target 'rpi4' needs the cross compiler aarch64-linux-gnu-g++: install "
                            "g++-aarch64-linux-gnu (apt-get install g++-aarch64-linux-gnu)")


def test_inline_json_specs() -> None:
    t = load_target('{"kind": "llvm", "mcpu": "cortex-a72", "mtriple": "aarch64-linux-gnu"}')
    assert (t.name, t.device, t.source) == ("inline", "cpu", "inline")
    assert t.to_dict()["tvm"] == {"kind": "llvm", "mcpu": "cortex-a72",
                                  "mtriple": "aarch64-linux-gnu"}
    assert not t.runs_on_host and t.cross_compiler is None
    t = load_target('{"name": "pi-2core", "base": "rpi4", "tvm": {"num-cores": 2}}')
    assert t.name == "pi-2core" and t.tvm["num-cores"] == 2 and t.tvm["mcpu"] == "cortex-a72"
    assert t.cross_compiler == "aarch64-linux-gnu-g++"
    assert load_target('{"kind": "cuda", "arch": "sm_80"}').device == "cuda"


def test_toml_path_spec_and_base_inheritance(tmp_path: Path) -> None:
    (tmp_path / "board.toml").write_text(
        'description = "my board"\nbase = "rpi5"\ncross_package = "my-toolchain"\n'
        '[tvm]\nnum-cores = 2\nmattr = ["+neon", "+dotprod"]\n')
    (tmp_path / "board-lite.toml").write_text('base = "board.toml"\n[tvm]\nnum-cores = 1\n')
    t = load_target(str(tmp_path / "board-lite.toml"))
    assert t.name == "board-lite" and t.source == str(tmp_path / "board-lite.toml")
    assert t.description == "my board" and t.cross_package == "my-toolchain"
    assert t.cross_compiler == "aarch64-linux-gnu-g++"  # from rpi5 <- aarch64-linux
    assert t.to_dict()["tvm"] == {"kind": "llvm", "mtriple": "aarch64-linux-gnu",
                                  "mcpu": "cortex-a76", "num-cores": 1,
                                  "mattr": ["+neon", "+dotprod"]}


def test_base_cycle_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text('base = "b.toml"\n[tvm]\nkind = "llvm"\n')
    (tmp_path / "b.toml").write_text('base = "a.toml"\n')
    with pytest.raises(EdgekitError, match=r"cycle: a -> b -> a"):
        load_target(str(tmp_path / "a.toml"))
    (tmp_path / "self.toml").write_text('base = "self.toml"\n')
    with pytest.raises(EdgekitError, match=r"cycle: self -> self"):
        load_target(str(tmp_path / "self.toml"))


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(EdgekitError, match=r"unknown target 'rpi9'; available: .*rpi4, rpi5"):
        load_target("rpi9")
    with pytest.raises(EdgekitError, match=r"^inline target: invalid JSON: "):
        load_target('{"kind": llvm}')
    bad = tmp_path / "bad.toml"
    bad.write_text('[tvm\nkind = "llvm"\n')
    with pytest.raises(EdgekitError, match=rf"^{bad}: invalid TOML: ") as e:
        load_target(str(bad))
    assert "\n" not in str(e.value)
    with pytest.raises(EdgekitError, match=r"missing\.toml not found"):
        load_target(str(tmp_path / "missing.toml"))
    with pytest.raises(EdgekitError, match=r"target 'inline': TVM rejects .*'bogus'"):
        load_target('{"kind": "llvm", "bogus": 1}')
    key = tmp_path / "key.toml"
    key.write_text('[tvm]\nkind = "llvm"\nmcpu = 5\n')
    with pytest.raises(EdgekitError, match=r"target 'key': TVM rejects .*mcpu"):
        load_target(str(key))
    with pytest.raises(EdgekitError, match=r"LLVM does not know mcpu 'cortex-z9'"):
        load_target('{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-z9"}')
    typo = tmp_path / "typo.toml"
    typo.write_text('descripton = "x"\n[tvm]\nkind = "llvm"\n')
    with pytest.raises(EdgekitError, match=r"unknown key\(s\) descripton"):
        load_target(str(typo))
    with pytest.raises(EdgekitError, match=r"device 'cuda' does not fit TVM kind 'llvm'"):
        load_target('{"device": "cuda", "tvm": {"kind": "llvm"}}')


@pytest.fixture(scope="module")
def tiny_mod():
    import onnx
    from onnx import TensorProto, helper
    from tvm.relax.frontend import onnx as relax_onnx

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Add", ["r", "x"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "tiny", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return relax_onnx.from_onnx(model, shape_dict={"x": [1, 16]})


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None,
                    reason="aarch64-linux-gnu-g++ not installed "
                           "(apt-get install g++-aarch64-linux-gnu)")
def test_real_cross_compile_aarch64(tiny_mod, tmp_path: Path) -> None:
    import tvm
    from tvm.support import cc

    t = load_target("aarch64-linux")
    compiler = t.find_cross_compiler()
    assert compiler and Path(compiler).is_absolute()
    ex = tvm.compile(tiny_mod, target=t.tvm_target())
    out = tmp_path / "tiny_aarch64.so"
    ex.export_library(str(out), fcompile=cc.cross_compiler(compiler))
    head = out.read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and head[4] == 2  # 64-bit ELF
    assert struct.unpack_from("<H", head, 18)[0] == EM_AARCH64


def _cuda_sources(mod) -> list[str]:
    found = [mod.inspect_source()] if mod.kind == "cuda" else []
    for child in mod.imports:
        found += _cuda_sources(child)
    return found


@pytest.mark.parametrize("name", ["cuda-sm80", "cuda-sm90", "jetson-orin"])
def test_cuda_targets_compile_without_gpu(tiny_mod, name: str) -> None:
    import tvm

    t: Target = load_target(name)
    ex = tvm.compile(tiny_mod, target=t.tvm_target())
    sources = _cuda_sources(ex.mod)
    assert sources and "__global__" in sources[0]
