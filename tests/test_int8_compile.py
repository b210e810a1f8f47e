"""QDQ graphs compile to integer arithmetic: LowerQDQ's Relax form, its results against
onnxruntime on the same QDQ graph (within the stated quantization steps), NaN/Inf handling of
QuantizeLinear, what stays float, the QLinear*/ConvInteger converters, the per-op int8 flag,
and an aarch64 int8 artifact under qemu."""

from __future__ import annotations

import shutil

import _qdq_graphs as graphs
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tvm
from tvm import relax
from tvm.relax.frontend import onnx as relax_onnx

from edgekit import api, per_op, runtime, verify
from edgekit.compiler.build import build
from edgekit.compiler.qdq import ExactQuantize, LowerQDQ, qdq_counts
from edgekit.compiler.qdq_check import FLIP_STEPS, output_steps, reference_session
from edgekit.targets import load_target

QDQ_MODELS = {"matmul_u8": graphs.matmul, "matmul_s8_per_tensor":
              lambda: graphs.matmul(act="int8", per_channel=False),
              "gemm_transb": graphs.gemm, "conv_u8_padded": graphs.conv,
              "conv_grouped": lambda: graphs.conv(group=2, pads=0), "mlp": graphs.mlp}


def _import(model: onnx.ModelProto, passes) -> tvm.IRModule:
    specs = verify.onnx_input_specs(model, [])
    mod = relax_onnx.from_onnx(model, shape_dict={s.name: list(s.shape) for s in specs})
    return tvm.transform.Sequential(passes)(mod)


def _calls(mod: tvm.IRModule) -> list:
    found = []
    relax.analysis.post_order_visit(mod["main"], lambda e: found.append(e)
                                    if isinstance(e, relax.Call) else None)
    return found


def _run(ex_or_path, inputs: dict[str, np.ndarray]) -> np.ndarray:
    module = ex_or_path if not isinstance(ex_or_path, str) else tvm.runtime.load_module(ex_or_path)
    vm = relax.VirtualMachine(module, tvm.cpu())
    return vm["main"](*(tvm.runtime.tensor(v) for v in inputs.values())).numpy()


def _within_steps(model: onnx.ModelProto, got: np.ndarray, inputs) -> None:
    ref = reference_session(model).run(None, inputs)[0]
    step = output_steps(model, ["y"])["y"]
    assert step is not None and step > 0
    assert np.max(np.abs(got.astype(np.float64) - ref)) <= 1e-4 * (1 + np.max(np.abs(ref))) \
        + FLIP_STEPS * step


@pytest.mark.parametrize("name", ["matmul_u8", "gemm_transb", "conv_u8_padded"])
def test_lowered_relax_holds_int32_matmul_or_conv(name):
    mod = _import(QDQ_MODELS[name](), [LowerQDQ()])
    ints = [c for c in _calls(mod) if getattr(c.op, "name", "") in
            ("relax.matmul", "relax.nn.conv2d") and str(c.attrs.out_dtype) == "int32"]
    assert len(ints) == 1
    x, w = ints[0].args
    assert str(x.ty.dtype) in ("int8", "uint8")
    assert isinstance(w, tvm.ir.expr.GenericConst) and str(w.ty.dtype) == "int8"
    ops = {getattr(c.op, "name", "") for c in _calls(mod)}
    assert "relax.astype" in ops and "relax.multiply" in ops
    assert "relax.dequantize" not in ops  # the weight's and the activation's are gone
    assert qdq_counts(mod) == {"lowered": 1, "float": 0, "reasons": {}}


@pytest.mark.parametrize("name", sorted(QDQ_MODELS))
def test_integer_form_alone_matches_onnxruntime(name):
    """LowerQDQ + ExactQuantize, then LegalizeOps and the default schedules (no Int8Kernels),
    on full-range inputs against onnxruntime on the same QDQ graph."""
    model = QDQ_MODELS[name]()
    info: dict = {}
    ex = build(_import(model, [LowerQDQ(), ExactQuantize()]), load_target("host"), info=info)
    assert info["int8_kernels"]  # the legalized int32 matmul/conv reads int8 into an int32 sum
    specs = verify.onnx_input_specs(model, [])
    inputs = {s.name: 3 * np.random.default_rng(1).standard_normal(s.shape).astype(np.float32)
              for s in specs}
    _within_steps(model, _run(ex, inputs), inputs)


@pytest.mark.parametrize("name", ["matmul_u8", "gemm_transb", "conv_u8_padded", "mlp"])
def test_compile_checks_qdq_models_against_onnxruntime(name, tmp_path):
    path = graphs.save(QDQ_MODELS[name](), tmp_path / f"{name}.onnx")
    result = api.compile(path, "host", tmp_path / f"{name}.edgekit")  # NaN/Inf probes inside
    quant = result.manifest["verification"]["quantization"]
    assert quant["lowered"] >= 1 and quant["float"] == 0
    assert quant["int8_kernels"], "no kernel computes in int8"
    assert quant["outputs"]["y"]["step"] > 0 and result.manifest["verification"]["outputs"][0]["ok"]
    assert quant["outputs"]["y"]["allowance"] >= FLIP_STEPS * quant["outputs"]["y"]["step"]


def test_check_fails_on_a_wrong_rescale(tmp_path):
    """The step tolerance is no blanket: weight scales 2% off fail the check."""
    from edgekit.compiler import check_library

    model = graphs.matmul()
    path = graphs.save(model, tmp_path / "m.onnx")
    api.compile(path, "host", tmp_path / "m.edgekit")
    wrong = onnx.ModelProto()
    wrong.CopyFrom(model)
    for t in wrong.graph.initializer:
        if t.name.startswith("ws"):
            t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t) * 1.02,
                                                    t.name))
    specs = verify.onnx_input_specs(model, [])
    outputs = [verify.TensorSpec("y", (1, 8, 32), "float32")]
    good = check_library(tmp_path / "m.edgekit" / "model.so", model, specs, outputs,
                         load_target("host"), 1e-4, 1e-4)
    bad = check_library(tmp_path / "m.edgekit" / "model.so", wrong, specs, outputs,
                        load_target("host"), 1e-4, 1e-4)
    assert good[0].ok and not bad[0].ok


def test_non_lowerable_weight_stays_float_and_matches(tmp_path):
    model = graphs.matmul(weight_zero=3)
    mod = _import(model, [LowerQDQ()])
    assert qdq_counts(mod) == {"lowered": 0, "float": 1,
                               "reasons": {"weight zero point is not 0": 1}}
    assert not [c for c in _calls(mod) if str(getattr(c.attrs, "out_dtype", "")) == "int32"]
    result = api.compile(graphs.save(model, tmp_path / "zw.onnx"), "host", tmp_path / "zw")
    assert result.manifest["verification"]["quantization"]["float"] == 1
    assert result.manifest["verification"]["quantization"]["int8_kernels"] == []


def _quantize_model(dtype: str, zero: int) -> onnx.ModelProto:
    b = graphs._Builder()
    b.qdq("x", 0.5, dtype, zero)
    b.node("Identity", [b.nodes[-1].output[0]])
    return b.model({"x": [16]}, "y", [16])


SPECIAL = np.array([np.nan, np.inf, -np.inf, 1e30, -1e30, 0.25, 0.75, 1.25, -0.25, -0.75,
                    -1.25, 63.75, 64.25, -63.75, -64.25, 0.0], np.float32)


@pytest.mark.parametrize("dtype,zero", [("int8", 0), ("uint8", 128), ("int8", -5)])
def test_quantize_agrees_with_onnxruntime_on_ties_nan_and_inf(dtype, zero):
    """Halfway values round to even, NaN goes to qmin, +-Inf saturate: bit-equal to
    onnxruntime; TVM's own lowering (without ExactQuantize) sends NaN to qmax."""
    model = _quantize_model(dtype, zero)
    ref = verify.run_ort(model, {"x": SPECIAL})[0]
    target = load_target("host")
    got = _run(build(_import(model, [ExactQuantize()]), target), {"x": SPECIAL})
    np.testing.assert_array_equal(got, ref)
    plain = _run(build(_import(model, []), target), {"x": SPECIAL})
    assert plain[0] == ref[1] and plain[0] != ref[0]  # NaN as +Inf, not as onnxruntime does


def test_quantize_rounds_once_so_fused_requantize_chains_stay_small():
    """The clamp reads the rounded value once: fused epilogues inline every QuantizeLinear
    into its readers, and a clamp reading it three times grew a chain of k requantizations
    3^k-fold (MiniLM's FFN kernels: 170 kB of TIR, minutes of lowering, 8x slower)."""
    mod = _import(_quantize_model("uint8", 128), [ExactQuantize()])
    (kernel,) = [f for _, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert kernel.script().count("nearbyint(") == 1


def test_compile_nan_probe_of_a_quantized_input(tmp_path):
    """The compile check writes NaN/Inf into x; QuantizeLinear makes them finite on both sides."""
    path = graphs.save(_quantize_model("uint8", 128), tmp_path / "q.onnx")
    api.compile(path, "host", tmp_path / "q.edgekit")
    session = runtime.load(tmp_path / "q.edgekit")
    np.testing.assert_array_equal(session.run({"x": SPECIAL})["y"],
                                  verify.run_ort(onnx.load(path), {"x": SPECIAL})[0])


@pytest.mark.parametrize("maker,exact", [
    (graphs.qlinear_matmul, False), (lambda: graphs.qlinear_matmul(per_column=False), False),
    (graphs.qlinear_conv, False), (graphs.conv_integer, True)])
def test_integer_onnx_ops_convert_and_match_onnxruntime(maker, exact, tmp_path):
    model = maker()
    op = model.graph.node[0].op_type
    result = api.compile(graphs.save(model, tmp_path / "m.onnx"), "host", tmp_path / "m")
    assert result.manifest["verification"]["quantization"]["lowered"] == 1
    spec = verify.onnx_input_specs(model, [])[0]
    # x < 128: onnxruntime's u8 x s8 kernel on x86 without VNNI (vpmaddubsw) saturates pairs
    # of products to int16 above that (docs/int8.md); 2 * 127 * 127 < 32767 cannot
    x = np.random.default_rng(2).integers(0, 128, spec.shape).astype(np.uint8)
    got = runtime.load(tmp_path / "m").run({"x": x})["y"]
    so = ort.SessionOptions()  # onnxruntime running the original op
    ref = ort.InferenceSession(model.SerializeToString(), so,
                               providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert got.dtype == ref.dtype, op
    diff = np.abs(got.astype(np.int64) - ref.astype(np.int64))
    if exact:
        assert diff.max() == 0, op
    else:  # one requantization step apart where the float sum sits on a rounding boundary
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, op


def test_per_op_marks_int8_kernels(tmp_path):
    path = graphs.save(graphs.mlp(), tmp_path / "mlp.onnx")
    api.compile(path, "host", tmp_path / "mlp.edgekit")
    rows = per_op.profile_artifact_per_op(tmp_path / "mlp.edgekit", threads=1, warmup=1,
                                          repeat=2)["per_op"]
    kernels = [r for r in rows if not r["kernel"].startswith("vm.builtin")]
    int8 = [r["kernel"] for r in kernels if r["int8"]]
    assert len(int8) == 2  # the two matmuls, mapped back to them
    assert sorted(n for r in kernels if r["int8"] for n in r["onnx_nodes"]
                  if n.startswith("MatMul")) == ["MatMul#3", "MatMul#9"]
    assert len(kernels) > 2  # and the input's quantize (float in, int8 out): not int8


def test_steps_follow_the_graph():
    model = graphs.mlp()
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    w2 = dq[-1]  # the second layer's weight
    wmax = np.max(np.abs(consts[w2.input[0]].astype(np.float64) * consts[w2.input[1]]))
    assert output_steps(model, ["y"])["y"] == pytest.approx(0.016 * wmax, rel=1e-6)
    norm = onnx.helper.make_node("LayerNormalization", ["y", "g"], ["z"], axis=-1)
    model.graph.node.append(norm)
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones(32, np.float32), "g"))
    assert output_steps(model, ["z"])["z"] is None  # no data-free bound through a norm


def test_aarch64_int8_artifact_under_qemu_matches_onnxruntime(tmp_path):
    from edgekit.devices import runner, toolchain
    from edgekit.errors import EdgekitError

    missing = [t for t in ("aarch64-linux-gnu-g++", "qemu-aarch64") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (apt-get install g++-aarch64-linux-gnu "
                    "qemu-user)")
    model = graphs.mlp()
    path = graphs.save(model, tmp_path / "mlp.onnx")
    api.compile(path, "rpi4", tmp_path / "mlp-rpi4.edgekit")
    try:
        toolchain.build_runner("aarch64")
    except EdgekitError as exc:  # PyPI unreachable and no cached wheels
        pytest.skip(str(exc))
    inputs = {"x": 3 * np.random.default_rng(4).standard_normal((1, 16, 64)).astype(np.float32)}
    outputs, _ = runner.invoke(tmp_path / "mlp-rpi4.edgekit", inputs, "qemu", warmup=0,
                               repeat=1)
    _within_steps(model, outputs["y"], inputs)
