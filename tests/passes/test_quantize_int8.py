"""quantize-int8: QDQ structure, per-channel axes, modes, methods, mixed precision, refusals,
the accuracy locator, and the core check of a fitted pass on real samples."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from _ln_graphs import op_count, residual_model
from _ln_graphs import samples as id_samples
from onnx import TensorProto, helper, numpy_helper

from edgekit.errors import EdgekitError
from edgekit.passes._quant import Observer, activation_params, activation_range, cosines
from edgekit.passes.core import NEEDS_CALIBRATION, Pass, PassReport, load_samples, run_pass
from edgekit.passes.quantize_int8 import PASS
from edgekit.verify import run_ort


def _quant(model, samples, calibration="samples", **params):
    return run_pass(model, PASS, {**PASS.params, **params}, samples, calibration)


def _ids_calibration(n: int = 8, first: int = 0) -> dict[str, np.ndarray]:
    return {"input_ids": np.stack([s["input_ids"] for s in id_samples(first + n)[first:]])}


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _conv_gemm_model() -> onnx.ModelProto:
    """Conv(3→8, 3x3) → Relu → Flatten → Gemm(transB=1, 8·4·4→24) → MatMul(24→32) + bias."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in [
        ("cw", rng.standard_normal((8, 3, 3, 3)) * np.exp(rng.uniform(-2, 2, (8, 1, 1, 1)))),
        ("cb", rng.standard_normal(8) * 0.1),
        ("gw", rng.standard_normal((24, 128)) * 0.1), ("gb", rng.standard_normal(24)),
        ("mw", rng.standard_normal((24, 32))), ("mb", rng.standard_normal(32))]]
    nodes = [helper.make_node("Conv", ["x", "cw", "cb"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "gw", "gb"], ["g"], name="gemm", transB=1),
             helper.make_node("MatMul", ["g", "mw"], ["m"], name="mm"),
             helper.make_node("Add", ["m", "mb"], ["y"], name="bias")]
    graph = helper.make_graph(
        nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _images(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.uniform(0, 1, (n, 1, 3, 4, 4)).astype(np.float32)}


@pytest.fixture(scope="module")
def cnn():
    model = _conv_gemm_model()
    new, run = _quant(model, load_samples(model, calibration=_images(32, 0)))
    assert run.status == "applied", run.message
    return model, new, run


def test_qdq_structure_and_per_channel_axes(cnn):
    model, new, run = cnn
    assert run.report.changed == {"int8 Conv": 1, "int8 Gemm": 1, "int8 MatMul": 1}
    assert op_count(new, "QuantizeLinear") == 3 and op_count(new, "DequantizeLinear") == 6
    inits, nodes = _inits(new), {n.output[0]: n for n in new.graph.node}
    axes = {}
    for n in new.graph.node:
        if n.op_type in ("Conv", "Gemm", "MatMul"):
            dq = nodes[n.input[1]]
            assert dq.op_type == "DequantizeLinear"
            wq, scale, zp = (inits[i] for i in dq.input)
            assert wq.dtype == np.int8 and zp.dtype == np.int8 and not zp.any()
            axis = next(a.i for a in dq.attribute if a.name == "axis")
            assert scale.shape == (wq.shape[axis],) and scale.dtype == np.float32
            axes[n.op_type] = axis
            # symmetric per channel: each channel's largest |w| maps to ±127
            other = tuple(i for i in range(wq.ndim) if i != axis)
            assert np.all(np.abs(wq).max(axis=other) == 127)
            act = nodes[n.input[0]]
            assert act.op_type == "DequantizeLinear" and inits[act.input[2]].dtype == np.uint8
    assert axes == {"Conv": 0, "Gemm": 0, "MatMul": 1}  # Gemm transB=1: B[N, K]
    assert not {"cw", "gw", "mw"} & set(inits)  # float weights are gone; biases stay float
    assert {"cb", "gb", "mb"} <= set(inits) and inits["cb"].dtype == np.float32


def test_onnxruntime_runs_it_within_budget_on_held_out_data(cnn):
    model, new, run = cnn
    held = load_samples(model, calibration=_images(16, 1), seeds=0)
    outs = [run_ort(new, s) for s in held]
    refs = [run_ort(model, s) for s in held]
    cos = cosines(outs, refs)
    assert cos.mean() > 0.999 and cos.min() > 0.99, cos
    worst = max(float(np.abs(o[0] - r[0]).max() / np.abs(r[0]).max())
                for o, r in zip(outs, refs, strict=True))
    assert worst <= PASS.params["max_error"]
    assert run.max_rel <= run.budget == PASS.params["max_error"]


def test_gemm_without_transb_quantizes_along_axis_1():
    model = residual_model(head="gemm")
    new, run = _quant(model, load_samples(model, calibration=_ids_calibration()))
    gemm = next(n for n in new.graph.node if n.op_type == "Gemm")
    dq = next(n for n in new.graph.node if n.output[0] == gemm.input[1])
    assert next(a.i for a in dq.attribute if a.name == "axis") == 1
    assert _inits(new)[dq.input[1]].shape == (32,)


@pytest.mark.parametrize("mode", ["static", "dynamic", "weights"])
def test_modes(mode):
    model = residual_model()
    new, run = _quant(model, load_samples(model, calibration=_ids_calibration()), mode=mode)
    assert run.status == "applied", run.message
    assert run.report.changed["int8 MatMul"] == 5
    assert run.report.changed["int8 Gather"] == 1  # the token table, weight-only in every mode
    counts = {op: op_count(new, op) for op in ("QuantizeLinear", "DynamicQuantizeLinear",
                                                "DequantizeLinear")}
    assert counts == {"static": {"QuantizeLinear": 5, "DynamicQuantizeLinear": 0,
                                 "DequantizeLinear": 11},
                      "dynamic": {"QuantizeLinear": 0, "DynamicQuantizeLinear": 5,
                                  "DequantizeLinear": 11},
                      "weights": {"QuantizeLinear": 0, "DynamicQuantizeLinear": 0,
                                  "DequantizeLinear": 6}}[mode]
    assert run.report.details["cosine"]["min"] > 0.999


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_tvm_importer_reads_the_quantized_graph(mode):
    from edgekit.compiler import to_relax, unsupported_nodes
    from edgekit.verify import TensorSpec

    model = _conv_gemm_model()
    new, run = _quant(model, load_samples(model, calibration=_images(4, 0)), mode=mode)
    assert unsupported_nodes(new) == []
    mod = to_relax(new, [TensorSpec("x", (1, 3, 4, 4), "float32")])  # raises if it cannot
    assert "main" in [gv.name_hint for gv in mod.get_global_vars()]


def test_embeddings_store_the_token_table_int8_per_row():
    """By default the Gather table becomes int8 with one scale per row, read through
    DequantizeLinear(axis=0), weight-only; TVM gathers the int8 rows (``GatherDequantized``):
    its library holds no float copy of the table and matches onnxruntime on the QDQ graph."""
    import tvm
    from tvm import relax

    from edgekit import compiler
    from edgekit.compiler import pipeline
    from edgekit.targets import load_target
    from edgekit.verify import onnx_input_specs

    model = residual_model()
    samples = load_samples(model, calibration=_ids_calibration())
    plain, _ = _quant(model, samples, embeddings=False)
    assert not [n for n in plain.graph.node if n.op_type == "Gather"
                and n.input[0].endswith("_dq")]  # embeddings=false: the table stays float
    new, run = _quant(model, samples)
    gather = next(n for n in new.graph.node if n.op_type == "Gather")
    dq = next(n for n in new.graph.node if gather.input[0] in n.output)
    assert dq.op_type == "DequantizeLinear" and dq.attribute[0].i == 0
    table, scale = _inits(new)[dq.input[0]], _inits(new)[dq.input[1]]
    assert table.dtype == np.int8 and table.shape == (32, 16) and scale.shape == (32,)
    assert np.abs(table).max(axis=1).min() == 127  # symmetric, every row's own scale
    assert any(r["op"] == "Gather" and r["activation"] is None
               for r in run.report.details["locator"])
    target = load_target("host")
    mod = compiler.to_relax(new, onnx_input_specs(new, []), tvm_target=target.tvm_target())
    lowered, _ = pipeline.prepare(mod, target)
    consts: list[tuple[str, tuple]] = []

    def tensor_constant(e):
        if isinstance(e, tvm.ir.expr.Constant) and hasattr(e.value, "numpy"):
            consts.append((str(e.value.numpy().dtype), e.value.numpy().shape))

    relax.analysis.post_order_visit(lowered["main"], tensor_constant)
    assert ("int8", (32, 16)) in consts and ("float32", (32, 16)) not in consts
    vm = relax.VirtualMachine(compiler.build(mod, target), tvm.cpu())
    for feed in id_samples(3):
        got = vm["main"](tvm.runtime.tensor(feed["input_ids"])).numpy()
        ref = run_ort(new, feed)[0]
        assert np.abs(got - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())


def test_a_shared_embedding_table():
    """Tied to the head (Gemm transB=1 on the same initializer), which is quantized too: the
    float table goes. Read by a node that keeps it float: the Gather is skipped, saying so,
    since an int8 copy would sit beside the float table."""
    tied = residual_model(head="gemm_t", tied=True)
    new, run = _quant(tied, load_samples(tied, calibration=_ids_calibration()))
    assert run.status == "applied", run.message
    assert "wte" not in _inits(new) and run.report.changed["int8 Gather"] == 1
    shared = residual_model()
    shared.graph.node.append(helper.make_node("ReduceMean", ["wte"], ["table_mean"],
                                              name="table_stat", keepdims=0))
    shared.graph.output.append(helper.make_tensor_value_info("table_mean", TensorProto.FLOAT,
                                                             []))
    new, run = _quant(shared, load_samples(shared, calibration=_ids_calibration()))
    assert run.status == "applied", run.message
    gather = next(n for n in new.graph.node if n.op_type == "Gather")
    assert gather.input[0] == "wte" and _inits(new)["wte"].dtype == np.float32
    assert "also read by 'table_stat'" in dict(run.report.skipped)[gather.name]
    assert "int8 Gather" not in run.report.changed


def test_symmetric_int8_activations_and_per_tensor_weights():
    model = residual_model()
    new, run = _quant(model, load_samples(model, calibration=_ids_calibration()),
                      symmetric=True, per_channel=False)
    inits = _inits(new)
    for n in new.graph.node:
        if n.op_type == "QuantizeLinear":
            assert inits[n.input[2]].dtype == np.int8 and inits[n.input[2]] == 0
        if n.op_type == "DequantizeLinear" and inits.get(n.input[0], np.zeros(1)).ndim == 2:
            assert inits[n.input[1]].shape == ()  # one scale for the whole weight
    rows = run.report.details["locator"]
    assert all(r["weight_scale_min"] == r["weight_scale_max"] for r in rows)


def test_reduce_range_keeps_weights_within_7_bits():
    model = residual_model()
    new, run = _quant(model, load_samples(model, calibration=_ids_calibration()),
                      reduce_range=True)
    weights = {k: a for k, a in _inits(new).items() if a.dtype == np.int8 and a.ndim == 2}
    # the token table is gathered and dequantized, never in an int8 kernel: full range
    assert np.abs(weights.pop("wte_int8")).max() == 127
    assert len(weights) == 5 and all(np.abs(w).max() == 63 for w in weights.values())


def _outlier_values() -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(100_000)
    x[:5] = 80.0  # a few huge values stretch the min-max range
    return x


@pytest.mark.parametrize("symmetric", [False, True])
def test_methods_clip_outliers_and_mse_minimises_the_error(symmetric):
    obs = Observer()
    x = _outlier_values()
    obs.update(x)
    ranges = {m: activation_range(obs, m, 99.9, symmetric) for m in ("minmax", "percentile",
                                                                     "mse")}
    assert ranges["minmax"][1] == pytest.approx(80.0)
    assert ranges["percentile"][1] < 10 and ranges["mse"][1] < 80.0
    mse = {m: np.mean((activation_params(*r, symmetric).fake(x) - x) ** 2)
           for m, r in ranges.items()}
    assert mse["mse"] <= mse["minmax"]


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse"])
def test_each_method_runs_and_is_recorded(method):
    model = residual_model()
    new, run = _quant(model, load_samples(model, calibration=_ids_calibration()), method=method)
    assert run.status == "applied", run.message
    rows = run.report.details["locator"]
    assert {r["method"] for r in rows if r["activation"] is not None} == {method}
    assert {r["method"] for r in rows if r["activation"] is None} == {"none"}  # the table


def _outlier_layer_model() -> onnx.ModelProto:
    """x → MatMul(w1) → MatMul(w2): w1 gives one column 300× the others, so mm2's input has
    an outlier channel that per-tensor uint8 cannot resolve."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 16))
    w1[:, 3] *= 300
    w2 = rng.standard_normal((16, 8))
    w2[3] *= 1e-3  # the outlier channel contributes little to the output
    inits = [numpy_helper.from_array(w1.astype(np.float32), "w1"),
             numpy_helper.from_array(w2.astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("MatMul", ["h", "w2"], ["y"], name="mm2")]
    graph = helper.make_graph(nodes, "outlier",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_mixed_precision_keeps_the_outlier_layer_float():
    model = _outlier_layer_model()
    rng = np.random.default_rng(1)
    samples = load_samples(model, calibration={
        "x": rng.standard_normal((8, 4, 16)).astype(np.float32)})
    _, plain = _quant(model, samples, method="minmax")
    assert plain.report.details["cosine"]["min"] < 0.99  # the outlier really hurts
    new, run = _quant(model, samples, method="minmax", min_cosine=0.99)
    assert run.status == "applied", run.message
    rows = {r["node"]: r for r in run.report.details["locator"]}
    assert rows["mm2"]["precision"] == "float" and rows["mm1"]["precision"] == "int8"
    assert rows["mm2"]["error_share"] > 0.9  # the locator points at it
    assert "mm2" in run.report.details["float_nodes"]
    assert run.report.details["cosine"]["min"] >= 0.99
    assert op_count(new, "QuantizeLinear") == 1


def test_unreachable_budget_is_refused_loudly():
    model = _outlier_layer_model()
    samples = load_samples(model, calibration={
        "x": np.random.default_rng(1).standard_normal((4, 4, 16)).astype(np.float32)})
    new, run = _quant(model, samples, min_cosine=1.0)
    assert run.status == "refused" and new is model
    assert "not met even with only one node quantized" in run.message


def test_refused_without_real_calibration():
    model = residual_model()
    for calibration in ("none", "seeded"):
        new, run = _quant(model, load_samples(model), calibration)
        assert run.status == "refused" and new is model
    assert run.message.startswith("int8 ranges are calibrated on real inputs only")
    _, run = _quant(model, load_samples(model), "none")
    assert run.message == NEEDS_CALIBRATION


@pytest.mark.parametrize("bad", [{"mode": "int4"}, {"method": "entropy"},
                                 {"min_cosine": 1.5}, {"smooth": -0.1}])
def test_bad_options_are_one_line_errors(bad):
    model = residual_model()
    with pytest.raises(EdgekitError, match="^quantize-int8: [^\n]*$"):
        _quant(model, load_samples(model, calibration=_ids_calibration()), **bad)


def test_nothing_to_quantize_is_unchanged_with_the_reason():
    nodes = [helper.make_node("MatMul", ["a", "b"], ["y"], name="scores")]
    graph = helper.make_graph(nodes, "attn", [
        helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 4, 8]),
        helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 8, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    rng = np.random.default_rng(0)
    calib = {"a": rng.standard_normal((3, 2, 4, 8)).astype(np.float32),
             "b": rng.standard_normal((3, 2, 8, 4)).astype(np.float32)}
    new, run = _quant(model, load_samples(model, calibration=calib))
    assert run.status == "unchanged" and new is model
    assert run.report.skipped == [("scores", "activation × activation MatMul (attention) "
                                             "stays float (attention=true)")]
    new, run = _quant(model, load_samples(model, calibration=calib), attention=True)
    assert run.status == "applied" and op_count(new, "QuantizeLinear") == 2


def test_reparam_and_smooth_are_reported():
    model = residual_model()
    samples = load_samples(model, calibration=_ids_calibration())
    _, run = _quant(model, samples, reparam=True, smooth=0.5)
    assert run.status == "applied", run.message
    assert run.report.changed["reparam LayerNorm"] == 3
    assert run.report.changed["smooth LayerNorm"] == 3
    assert set(run.report.details["reparam"]) == {"ln0", "ln1", "ln_f"}
    _, run = _quant(residual_model(post_ln=True, tap=True), samples, reparam=True, smooth=0.5)
    assert run.status == "applied", run.message  # post-LN: the other readers compensated
    assert run.report.details["smooth"]["ln0"]["compensated"] == 2  # residual Add, tap
    assert run.report.details["reparam"]["ln0"]["compensated"] == 1  # smooth's compensation
    assert run.report.details["smooth"]["ln1"]["compensated"] == 0  # read by the head only
    _, run = _quant(residual_model(final_output=True), samples, reparam=True, smooth=0.0)
    assert ("ln_f", "reparam: its output 'ln_f' is a graph output") in run.report.skipped
    _, run = _quant(residual_model(), samples)  # SmoothQuant α = 0.5 is the default
    assert run.report.changed["smooth LayerNorm"] == 3 and "reparam" not in run.report.details
    assert run.report.details["smooth"]["ln0"]["alpha"] == 0.5


def test_locator_fields(cnn):
    _, _, run = cnn
    rows = run.report.details["locator"]
    assert [r["error_share"] for r in rows] == sorted((r["error_share"] for r in rows),
                                                      reverse=True)
    assert sum(r["error_share"] for r in rows) == pytest.approx(1.0)
    for r in rows:
        assert r["precision"] == "int8" and r["method"] == "minmax"
        assert r["act_scale"] > 0 and 0 <= r["act_zero_point"] <= 255
        assert r["weight_scale_min"] <= r["weight_scale_max"]
        assert r["act_sqnr_db"] > 20 and r["weight_sqnr_db"] > 20
    cos = run.report.details["cosine"]
    assert cos["samples"] == 32 and 0.99 < cos["min"] <= cos["mean"] <= 1
    assert 0.99 < cos["onnxruntime_fused_min"] <= 1  # ORT's integer kernels on this CPU


# -- the core check of a fitted pass: budget on the real samples, finiteness on all ----------

def _tiny() -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _clip_to(model: ir.Model, ctx, *, hi: float = 0.5, budget: float = 0.01) -> PassReport:
    """Relu → Clip(0, hi): exact on real samples below ``hi``, not on N(0, 1) noise."""
    relu = model.graph.node("relu")
    relu.op_type = "Clip"
    value = ir.Value(name="hi", const_value=ir.tensor(np.array(hi, np.float32)))
    model.graph.register_initializer(value)
    zero = ir.Value(name="lo", const_value=ir.tensor(np.array(0, np.float32)))
    model.graph.register_initializer(zero)
    relu.resize_inputs(3)
    relu.replace_input_with(1, zero)
    relu.replace_input_with(2, value)
    ctx.report.change("clip")
    return ctx.report


def _to_log(model: ir.Model, ctx, *, budget: float = 100.0) -> PassReport:
    """Relu → Log: finite on positive real samples, NaN on N(0, 1) noise's negatives."""
    model.graph.node("relu").op_type = "Log"
    ctx.report.change("log")
    return ctx.report


LOG = Pass("log", "log", exact=False, apply=_to_log, fitted=True, budget_param="budget")
CLIP = Pass("clip", "clip", exact=False, apply=_clip_to, fitted=True, budget_param="budget")


def test_fitted_budget_is_judged_on_real_samples_only():
    model = _tiny()
    real = {"x": np.random.default_rng(0).uniform(0.1, 0.5, (3, 1, 4)).astype(np.float32)}
    samples = load_samples(model, calibration=real)
    _, run = run_pass(model, CLIP, CLIP.params, samples)
    assert run.status == "applied" and run.max_rel == 0.0 and run.budget == 0.01
    _, run = run_pass(model, CLIP, CLIP.params, samples, "seeded")  # seeded: judged on all
    assert run.status == "rolled-back" and "exceeds the budget 0.01" in run.message
    _, run = run_pass(model, LOG, LOG.params, samples)  # NaN on the seeded negatives
    assert run.status == "rolled-back" and "non-finite" in run.message


def test_budget_param_must_name_a_float_parameter():
    with pytest.raises(TypeError, match="budget_param"):
        Pass("bad", "bad", exact=False, apply=_clip_to, budget_param="nope")


def test_rewrite_explain_prints_the_locator(tmp_path):
    from click.testing import CliRunner

    from edgekit.cli import cli

    onnx.save(_conv_gemm_model(), tmp_path / "cnn.onnx")
    np.savez(tmp_path / "cal.npz", **_images(8, 0))
    args = ["rewrite", str(tmp_path / "cnn.onnx"), "-o", str(tmp_path / "q.onnx"),
            "--passes", "quantize-int8:method=mse", "--calibration", str(tmp_path / "cal.npz")]
    result = CliRunner().invoke(cli, [*args, "--explain"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = next(i for i, line in enumerate(lines) if "act scale" in line)
    assert "cosine vs float on 8 calibration samples" in lines[header - 1]
    shares = [float(line.split()[3].rstrip("%")) for line in lines[header + 1:header + 4]]
    assert shares == sorted(shares, reverse=True) and len(shares) == 3
    assert "act scale" not in CliRunner().invoke(cli, args).output  # only under --explain


# -- the QDQ math, not onnxruntime's fused kernels, is what the check judges -----------------

def _saturating_model() -> onnx.ModelProto:
    """x[4, 64] in [0, 1] → MatMul: weight rows 0 and 1 are each channel's largest, so uint8
    x = 255 meets int8 w = 127 twice in one pair (255·127·2 > 32767, int16's limit)."""
    rng = np.random.default_rng(0)
    w = rng.uniform(-0.3, 0.3, (64, 16))
    w[:2] = 1.0
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "sat",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])],
        [numpy_helper.from_array(w.astype(np.float32), "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _x86_without_vnni() -> bool:
    import platform
    from pathlib import Path

    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "avx2" in flags and "vnni" not in flags


def test_check_judges_the_qdq_math_not_onnxruntimes_fused_kernels():
    from edgekit.verify import ort_session

    model = _saturating_model()
    x = np.random.default_rng(1).uniform(0, 1, (8, 4, 64)).astype(np.float32)
    x[:, :, :2] = 1.0  # the full uint8 range on the saturating pair
    samples = load_samples(model, calibration={"x": x})
    new, run = _quant(model, samples)
    assert run.status == "applied", run.message
    inits, nodes = _inits(new), {n.output[0]: n for n in new.graph.node}
    q = nodes[nodes[new.graph.node[-1].input[0]].input[0]]  # MatMul ← DQ ← Q
    s, z = float(inits[q.input[1]]), float(inits[q.input[2]])
    dq_w = nodes[new.graph.node[-1].input[1]]
    w_hat = inits[dq_w.input[0]].astype(np.float64) * inits[dq_w.input[1]]
    worst = 0.0  # the QDQ math in float64, over the calibration samples
    for xi in x:
        x_hat = (np.clip(np.round(xi / s) + z, 0, 255) - z) * s
        y = xi.astype(np.float64) @ onnx.numpy_helper.to_array(model.graph.initializer[0])
        worst = max(worst, float(np.abs(x_hat @ w_hat - y).max() / np.abs(y).max()))
    assert run.max_rel == pytest.approx(worst, rel=1e-3, abs=1e-6)
    fused = ort_session(new)  # onnxruntime's integer kernels, as a user runs the graph
    fused_err = max(float(np.abs(fused.run(None, {"x": xi})[0] - xi @ onnx.numpy_helper.to_array(
        model.graph.initializer[0])).max()) for xi in x)
    if _x86_without_vnni():  # this CPU: the fused kernels saturate, the check does not care
        assert fused_err > 10 * worst * np.abs(x[0] @ onnx.numpy_helper.to_array(
            model.graph.initializer[0])).max()
        assert any("saturate int16" in r for _, r in run.report.skipped)
