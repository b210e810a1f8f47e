"""fp16/bf16 graphs compile only where computed natively: refusals with reasons, the aarch64
fp16 artifact run under qemu through the C++ runner against onnxruntime's fp32 model, and
CUDA artifacts whose PTX computes in 16 bits (compile only: no GPU here)."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgekit import api, runtime, verify
from edgekit.compiler import half
from edgekit.devices import runner, toolchain
from edgekit.errors import EdgekitError
from edgekit.passes.convert_fp16 import PASS as FP16
from edgekit.targets import load_target

D = 32


def _mlp() -> onnx.ModelProto:
    """x → MatMul → LayerNorm → MatMul + bias → Relu → MatMul → Softmax → y (and logits)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in [
        ("w1", rng.standard_normal((D, D)) / 5), ("g", rng.uniform(0.5, 1.5, D)),
        ("b", rng.standard_normal(D) * 0.1), ("w2", rng.standard_normal((D, D)) / 5),
        ("b2", rng.standard_normal(D) * 0.1), ("w3", rng.standard_normal((D, 10)) / 5)]]
    n = helper.make_node
    nodes = [n("MatMul", ["x", "w1"], ["h"]),
             n("LayerNormalization", ["h", "g", "b"], ["ln"], axis=-1),
             n("MatMul", ["ln", "w2"], ["m"]), n("Add", ["m", "b2"], ["a"]),
             n("Relu", ["a"], ["r"]), n("MatMul", ["r", "w3"], ["logits"]),
             n("Softmax", ["logits"], ["y"], axis=-1)]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 10]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, [4, 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.fixture(scope="module")
def half_models(tmp_path_factory):
    """(fp32 path, {"fp16": path, "bf16": path}) of the converted MLP."""
    root = tmp_path_factory.mktemp("half")
    src = root / "mlp.onnx"
    onnx.save(_mlp(), src)
    cal = {"x": np.random.default_rng(1).standard_normal((4, 4, D)).astype(np.float32)}
    out = {}
    for fmt in ("fp16", "bf16"):
        out[fmt] = root / f"mlp-{fmt}.onnx"
        result = api.rewrite(src, f"convert-{fmt}", calibration=cal, out=out[fmt], strict=True)
        assert result.ledger_dicts()[0]["status"] == "applied"
    return src, out


def test_formats_found_in_the_graph(half_models):
    src, paths = half_models
    assert half.formats(onnx.load(src)) == set()
    assert half.formats(onnx.load(paths["fp16"])) == {"float16"}
    assert half.formats(onnx.load(paths["bf16"])) == {"bfloat16"}


@pytest.mark.parametrize("target, fmt, native", [
    ("rpi5", "float16", True), ("jetson-orin", "float16", True), ("cuda-sm80", "bfloat16", True),
    ("rpi4", "float16", False), ("aarch64-linux", "float16", False),
    ("x86-64-v4", "float16", False), ("x86-64-v4", "bfloat16", False),
    ('{"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "sapphirerapids"}', "bfloat16",
     True),
    ('{"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "sapphirerapids"}', "float16",
     True),
    ('{"kind": "cuda", "arch": "sm_75", "host": {"kind": "llvm"}}', "bfloat16", False),
])
def test_native_support_comes_from_the_target(target, fmt, native):
    why = half.native_problem(fmt, load_target(target))
    assert (why == "") is native, why


def test_refused_where_it_would_be_emulated(half_models, tmp_path):
    """rpi4 (Cortex-A72, no fullfp16) and this machine's x86 (no AVX512-FP16/BF16 here;
    whatever CPU runs the test, the host target reports its own features)."""
    _, paths = half_models
    with pytest.raises(EdgekitError, match=r"does not run it natively: its LLVM CPU "
                                           r"'cortex-a72' \(aarch64\) lacks fullfp16"):
        api.compile(paths["fp16"], "rpi4", tmp_path / "a")
    host = load_target("host")
    for fmt in ("fp16", "bf16"):
        name = "float16" if fmt == "fp16" else "bfloat16"
        why = half.native_problem(name, host)
        if why:
            with pytest.raises(EdgekitError, match=f"computes in {name}.*natively"):
                api.compile(paths[fmt], "host", tmp_path / fmt)
            assert not (tmp_path / fmt).exists()


def test_bf16_on_a_cpu_says_it_computes_in_fp32(half_models):
    src, paths = half_models
    bf16, fp16 = onnx.load(paths["bf16"]), onnx.load(paths["fp16"])
    assert "runs as fp32 on CPUs" in half.arithmetic_note(bf16, load_target("x86-64-v4"))
    assert "runs as fp32 on CPUs" in half.arithmetic_note(bf16, load_target("rpi5"))
    assert half.arithmetic_note(bf16, load_target("cuda-sm80")) == ""
    assert half.arithmetic_note(fp16, load_target("rpi5")) == ""
    assert half.arithmetic_note(onnx.load(src), load_target("host")) == ""


def test_check_tolerance_follows_the_format(half_models):
    src, paths = half_models
    assert half.check_rtol(onnx.load(src), 1e-4) == 1e-4
    assert half.check_rtol(onnx.load(paths["fp16"]), 1e-4) == half.CHECK_RTOL["float16"]
    assert half.check_rtol(onnx.load(paths["bf16"]), 1e-4) == half.CHECK_RTOL["bfloat16"]
    assert half.check_rtol(onnx.load(paths["bf16"]), 0.1) == 0.1  # a looser ask stays


@pytest.mark.parametrize("fmt", ["fp16", "bf16"])
def test_host_artifact_where_the_cpu_runs_the_format(half_models, tmp_path, fmt):
    """Only on a CPU with AVX512-FP16 (fp16) / AVX512-BF16 (bf16): the host artifact is
    checked against onnxruntime's run of the same 16-bit graph (bfloat16 emulated, which
    onnxruntime's CPU kernels lack) within the format's tolerance, and stays within the
    convert pass's budget of the fp32 model."""
    src, paths = half_models
    name = "float16" if fmt == "fp16" else "bfloat16"
    why = half.native_problem(name, load_target("host"))
    if why:
        pytest.skip(f"this machine's host target {why.split(', so')[0]}")
    art = api.compile(paths[fmt], "host", tmp_path / fmt)
    check = art.manifest["verification"]
    assert check["rtol"] == half.CHECK_RTOL[name] and all(o["ok"] for o in check["outputs"])
    assert ("half_arithmetic" in check) is (fmt == "bf16")  # bf16 runs as fp32 on CPUs
    x = np.random.default_rng(7).standard_normal((4, D)).astype(np.float32)
    got = runtime.load(tmp_path / fmt).run(x=x)["logits"]
    ref = verify.run_ort(onnx.load(src), {"x": x})[1]
    assert got.dtype == np.float32
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) <= half.CHECK_RTOL[name]


def _need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (apt-get install g++-aarch64-linux-gnu "
                    "qemu-user)")


def test_rpi5_fp16_artifact_under_qemu_matches_onnxruntime(half_models, tmp_path):
    _need("aarch64-linux-gnu-g++", "qemu-aarch64")
    src, paths = half_models
    art = tmp_path / "mlp-fp16-rpi5.edgekit"
    api.compile(paths["fp16"], "rpi5", art)
    try:
        toolchain.build_runner("aarch64")
    except EdgekitError as exc:  # PyPI unreachable and no cached wheels
        pytest.skip(str(exc))
    assert runtime.read_manifest(art)["target"]["machine"] == "aarch64"
    specs = verify.onnx_input_specs(onnx.load(src), [])
    for seed in (3, 4):
        inputs = verify.seeded_inputs(specs, seed=seed)
        outputs, _ = runner.invoke(art, inputs, "qemu", warmup=0, repeat=1)
        ref = verify.run_ort(onnx.load(src), inputs)  # the fp32 model
        for got, want in zip(outputs.values(), ref, strict=True):
            assert got.dtype == np.float32 and got.shape == want.shape
            err = np.max(np.abs(got - want)) / np.max(np.abs(want))
            assert 0 < err <= FP16.budget, err  # 16-bit arithmetic really ran, within budget


@pytest.mark.parametrize("fmt, ops", [("fp16", ("fma.rn.f16", "mul.f16")),
                                      ("bf16", ("fma.rn.bf16",))])
def test_cuda_artifact_carries_half_precision_ptx(half_models, tmp_path, fmt, ops):
    _, paths = half_models
    result = api.compile(paths[fmt], "cuda-sm80", tmp_path / f"mlp-{fmt}-cuda.edgekit")
    ptx = [n for n in result.manifest["files"] if n.endswith(".ptx")]
    text = (result.path / ptx[0]).read_text()
    assert any(op in text for op in ops)  # 16-bit arithmetic, not only conversions


def test_float16_kernels_get_twice_the_vector_lanes(half_models):
    """Row-reduction lanes are fp32 lanes per register; a float16 kernel fits twice as many."""
    import tvm

    from edgekit.compiler import to_relax

    _, paths = half_models
    model = onnx.load(paths["fp16"])
    tgt = load_target("rpi5").tvm_target()
    mod = to_relax(model, verify.onnx_input_specs(model, []), lambda _: None, tgt)
    mod = tvm.relax.transform.LegalizeOps()(mod)
    lanes = {gv.name_hint: half.vector_lanes(f, 4) for gv, f in mod.functions.items()
             if isinstance(f, tvm.tirx.PrimFunc)}
    assert lanes["matmul"] == 8  # float16 in and out
    assert lanes["layer_norm"] == 4  # an fp32 island
    assert all(v == 4 for k, v in lanes.items() if k.startswith("cast"))  # mixed widths
