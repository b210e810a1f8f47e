"""Default schedules: every kernel of a conv / matmul model gets one, numerics unchanged."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgekit import api, runtime, verify


def _conv_mlp_onnx(path):
    """Conv(3x3, pad) + bias + Relu -> Conv(1x1) + Relu -> GlobalAveragePool -> Flatten ->
    Gemm -> Softmax: the kernels the rule has to handle (padding, reductions, epilogues)."""
    rng = np.random.default_rng(0)

    def const(name, shape):
        return helper.make_tensor(name, TensorProto.FLOAT, shape,
                                  rng.standard_normal(shape).astype(np.float32).ravel())

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["g"], name="fc", transB=1),
        helper.make_node("Softmax", ["g"], ["y"], name="softmax"),
    ]
    graph = helper.make_graph(
        nodes, "conv_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        [const("w1", [16, 8, 3, 3]), const("b1", [16]), const("w2", [32, 16, 1, 1]),
         const("wf", [10, 32]), const("bf", [10])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    d = tmp_path_factory.mktemp("sched")
    src = _conv_mlp_onnx(d / "m.onnx")
    return src, api.compile(src, "host", d / "m.edgekit", tuning_db=d / "empty-db")


def test_every_kernel_gets_a_default_schedule(compiled):
    _, result = compiled
    tuning = result.manifest["tuning"]
    assert tuning["tuned"] is False and tuning["records_applied"] == 0
    assert tuning["kernels"] > 0 and tuning["default_schedules"] == tuning["kernels"]


def test_numerics_match_onnxruntime(compiled):
    src, result = compiled
    model = onnx.load(str(src))
    specs = verify.onnx_input_specs(model, [])
    for seed in (1, 2):
        inputs = verify.seeded_inputs(specs, seed)
        ref = verify.run_ort(model, inputs)[0]
        got = runtime.load(result.path).run(inputs)["y"]
        assert np.abs(got - ref).max() / np.abs(ref).max() <= 1e-5


def _host_target():
    from edgekit.targets import load_target

    return load_target('{"kind": "llvm", "num-cores": 2}')


def _scheduled_matmul(m: int, k: int, n: int) -> tuple[str, float]:
    """Default-schedule one (m, k) @ (k, n) matmul kernel; return its TIR script and the
    norm-wise relative error of the compiled kernel against the float64 product."""
    import tvm
    from tvm import relax

    from edgekit.compiler import pipeline, schedules

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((m, k), "float32"))
    w = relax.Var("w", relax.TensorType((k, n), "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(x, w))
        bb.emit_func_output(out)
    target = _host_target()
    mod = pipeline.lower(bb.get(), target.tvm_target())
    scheduled, count = schedules.apply_default(mod, target.tvm_target())
    assert count == 1
    text = next(f for _, f in scheduled.functions.items()
                if isinstance(f, tvm.tirx.PrimFunc)).script()
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((m, k), "float32"), rng.standard_normal((k, n), "float32")
    vm = relax.VirtualMachine(tvm.compile(scheduled, target=target.tvm_target()), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b)).numpy()
    ref = a.astype(np.float64) @ b.astype(np.float64)
    return text, float(np.abs(got - ref).max() / np.abs(ref).max())


def test_schedules_change_loops_not_results():
    """The rule on a matmul kernel: parallel outer loop, vectorized inner loop."""
    text, err = _scheduled_matmul(64, 128, 256)
    assert "T.parallel" in text and "T.vectorized" in text
    assert err <= 1e-5


def test_tiled_matmul_partitions_tail_columns():
    """70 columns = a 64-column register tile (2 vectors, local accumulators) + 6 tail
    columns in their own loop: no masked vector loop; results as the float64 product."""
    text, err = _scheduled_matmul(12, 40, 70)
    assert 'scope="local"' in text and "T.vectorized" in text and text.count("_partition") == 2
    assert err <= 1e-5


def _odd_ops_onnx(path):
    """Grouped convs (2 groups of 48 output channels: kept, tiled per group; 2 groups of 40:
    split into two convs), n-ary Sum, Dropout, Tanh, Erf, Exp, Pow(x, 3): the ops the import
    rewrites (layout, group split, Sum -> Add, Dropout -> Identity, fast math)."""
    rng = np.random.default_rng(3)

    def const(name, value):
        value = np.asarray(value, np.float32)
        return helper.make_tensor(name, TensorProto.FLOAT, value.shape, value.ravel())

    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="gconv", pads=[1, 1, 1, 1], group=2),
        helper.make_node("Conv", ["x", "w2"], ["z"], name="gconv_split", group=2),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Sum", ["r", "x", "c"], ["s"], name="sum3"),
        helper.make_node("Dropout", ["s"], ["d"], name="drop"),
        helper.make_node("Tanh", ["d"], ["t"], name="tanh"),
        helper.make_node("Erf", ["d"], ["e"], name="erf"),
        helper.make_node("Pow", ["d", "three"], ["p"], name="cube"),
        helper.make_node("Mul", ["d", "tenth"], ["m"], name="scale"),
        helper.make_node("Exp", ["m"], ["q"], name="exp"),
        helper.make_node("Sum", ["t", "e", "p", "q"], ["y"], name="sum4"),
    ]
    graph = helper.make_graph(
        nodes, "odd_ops",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 96, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 96, 6, 6]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 80, 6, 6])],
        [const("w", 0.1 * rng.standard_normal((96, 48, 3, 3))),
         const("w2", 0.1 * rng.standard_normal((80, 48, 1, 1))), const("three", 3.0),
         const("tenth", 0.1)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_import_rewrites_layout_sum_dropout_and_math(tmp_path):
    from edgekit.compiler import to_relax

    model = onnx.load(str(_odd_ops_onnx(tmp_path / "odd.onnx")))
    text = to_relax(model, verify.onnx_input_specs(model, []))["main"].script()
    assert 'data_layout="NHWC"' in text and 'kernel_layout="HWIO"' in text
    # 40/group: split; the two plain convs become packed-weight kernels (conv_layout) where
    # 40 channels are whole vectors (8 fp32 lanes: AVX2), else they stay plain convs (16: AVX-512)
    from edgekit.compiler.reductions import vector_lanes
    from edgekit.targets import load_target

    packed = 40 % vector_lanes(load_target("host").tvm_target()) == 0
    assert text.count("groups=2") == 1 and text.count("R.nn.conv2d(") == (1 if packed else 3)
    assert text.count("edgekit_conv_packed") == (2 if packed else 0)
    for op in ("R.stack(", "R.nn.dropout(", "R.tanh(", "R.erf(", "R.exp(", "R.power("):
        assert op not in text, op


def test_onnx_tidy_up_adds_left_to_right_and_keeps_names(tmp_path):
    from edgekit.compiler.frontend import tidy_onnx

    model = onnx.load(str(_odd_ops_onnx(tmp_path / "odd.onnx")))
    before = model.SerializeToString()
    tidy = tidy_onnx(model)
    assert model.SerializeToString() == before  # the caller's model is left alone
    nodes = {n.name: n for n in tidy.graph.node}
    assert [list(nodes[f"sum4__add{k}"].input) for k in (1, 2, 3)] == [
        ["t", "e"], ["sum4__sum1", "p"], ["sum4__sum2", "q"]]
    assert list(nodes["sum4__add3"].output) == ["y"]
    assert nodes["drop"].op_type == "Identity" and list(nodes["drop"].input) == ["s"]
    assert not {"Sum", "Dropout"} & {n.op_type for n in tidy.graph.node}
    assert [o.name for o in tidy.graph.output] == ["y", "z"]


def test_a_conv_the_layout_pass_cannot_follow_stays_nchw_and_says_so():
    """A Dropout whose mask is an output stays a tuple-valued op, which TVM's ConvertLayout
    cannot follow: the module keeps NCHW convs and the progress callback hears why."""
    from edgekit.compiler import to_relax

    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3], np.ones(108, np.float32))
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("Dropout", ["c"], ["y", "mask"])], "conv_dropout_mask",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8]),
         helper.make_tensor_value_info("mask", TensorProto.BOOL, [1, 4, 8, 8])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    lines: list[str] = []
    text = to_relax(model, verify.onnx_input_specs(model, []), lines.append)["main"].script()
    assert 'data_layout="NCHW"' in text and "NHWC" not in text
    assert [line for line in lines if line.startswith("convolutions stay NCHW")]


def test_grouped_conv_tiled_and_odd_ops_match_onnxruntime(tmp_path):
    import tvm

    from edgekit.compiler import pipeline, schedules, to_relax

    src = _odd_ops_onnx(tmp_path / "odd.onnx")
    model = onnx.load(str(src))
    specs = verify.onnx_input_specs(model, [])
    target = _host_target()
    mod = pipeline.lower(to_relax(model, specs), target.tvm_target())
    scheduled, _ = schedules.apply_default(mod, target.tvm_target())
    conv = next(f.script() for gv, f in scheduled.functions.items()
                if isinstance(f, tvm.tirx.PrimFunc) and "conv2d" in gv.name_hint
                and "group_conv2d" in f.script())
    # the tile stays inside one group of 48 channels: 16-lane vectors, 3 per tile
    assert 'scope="local"' in conv and "T.vectorized(T.int64(16))" in conv
    result = api.compile(src, "host", tmp_path / "odd.edgekit", tuning_db=tmp_path / "db")
    inputs = verify.seeded_inputs(specs, 5)
    refs = verify.run_ort(model, inputs)
    outs = runtime.load(result.path).run(inputs)
    for name, ref in zip(("y", "z"), refs, strict=True):
        assert np.abs(outs[name] - ref).max() / np.abs(ref).max() <= 1e-5, name


def test_long_chain_of_polynomial_math_compiles(tmp_path):
    """20 chained Tanh fuse into one kernel; each fast tanh reads its input several times, so
    inlining every block would grow the expression exponentially (a compile that never ends)."""
    import onnx
    from onnx import TensorProto, helper

    from edgekit import api

    nodes = [helper.make_node("Tanh", [f"t{i}"], [f"t{i + 1}"]) for i in range(20)]
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("t0", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("t20", TensorProto.FLOAT, [1, 64])])
    path = tmp_path / "chain.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    result = api.compile(path, "host", tmp_path / "chain.edgekit")
    (check,) = result.manifest["verification"]["outputs"]
    assert check["ok"]


def _row_models():
    """Softmax over (12, 128, 128) (attention scores) and LayerNorm over (128, 384) (MiniLM at
    128 tokens): the row-reduction kernels of a transformer."""
    rng = np.random.default_rng(7)
    softmax = helper.make_graph(
        [helper.make_node("Softmax", ["x"], ["y"], axis=-1)], "softmax",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [12, 128, 128])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [12, 128, 128])])
    affine = [helper.make_tensor(n, TensorProto.FLOAT, [384],
                                 rng.standard_normal(384).astype(np.float32)) for n in "sb"]
    norm = helper.make_graph(
        [helper.make_node("LayerNormalization", ["x", "s", "b"], ["y"], axis=-1,
                          epsilon=1e-12)], "layernorm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [128, 384])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [128, 384])], affine)
    return [helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
            for g in (softmax, norm)]


@pytest.mark.parametrize("model", _row_models(), ids=["softmax", "layernorm"])
def test_row_reductions_vector_partials_parallel_rows(model):
    """Softmax / LayerNorm: rows in parallel, vector-wide partial results (rfactor), vectorized
    normalise pass; results as onnxruntime's up to reassociated sums."""
    import tvm
    from tvm import relax

    from edgekit.compiler import pipeline, schedules, to_relax

    specs = verify.onnx_input_specs(model, [])
    target = _host_target().tvm_target()
    mod = pipeline.lower(to_relax(model, specs), target)
    scheduled, count = schedules.apply_default(mod, target)
    assert count == 1
    text = next(f for _, f in scheduled.functions.items()
                if isinstance(f, tvm.tirx.PrimFunc)).script()
    assert "_rf = T.sblock_alloc_buffer" in text  # per-row vector partials
    assert text.count("T.vectorized") >= 3  # partials' init and update, normalise pass
    work = 3 * int(np.prod([d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]))
    assert ("T.parallel" in text) == (work >= schedules._MIN_PARALLEL_ROWS_WORK)
    vm = relax.VirtualMachine(tvm.compile(scheduled, target=target), tvm.cpu())
    for seed in (1, 2):
        inputs = verify.seeded_inputs(specs, seed)
        ref = verify.run_ort(model, inputs)[0]
        got = vm["main"](*[tvm.runtime.tensor(v) for v in inputs.values()]).numpy()
        assert np.abs(got - ref).max() / np.abs(ref).max() <= 1e-5


def _kernel_scripts(mod, target) -> dict[str, str]:
    import tvm

    from edgekit.compiler import schedules

    scheduled, _ = schedules.apply_default(mod, target)
    return {gv.name_hint: f.script() for gv, f in scheduled.functions.items()
            if isinstance(f, tvm.tirx.PrimFunc)}


def test_row_rule_leaves_matmul_and_conv_kernels_alone(tmp_path, monkeypatch):
    """Matmul, conv, pooling and epilogue kernels get byte-identical schedules with and
    without the row-reduction rule; only the row kernels change."""
    from edgekit.compiler import pipeline, schedules, to_relax

    target = _host_target().tvm_target()
    scripts = {}
    for src in (_conv_mlp_onnx(tmp_path / "m.onnx"), _odd_ops_onnx(tmp_path / "odd.onnx")):
        model = onnx.load(str(src))
        mod = pipeline.lower(to_relax(model, verify.onnx_input_specs(model, [])), target)
        with_rule = _kernel_scripts(mod, target)
        monkeypatch.setattr(schedules, "_row_kernel", lambda *args: False)
        without = _kernel_scripts(mod, target)
        monkeypatch.undo()
        scripts.update(with_rule)
        assert with_rule == without
    assert any("conv2d" in name for name in scripts) and any("matmul" in name or "dense"
                                                              in name for name in scripts)


def test_quantized_softmax_epilogue_rides_in_the_row_kernel(tmp_path):
    """Q/DQ around a softmax (an int8 attention's probabilities): the quantize / dequantize
    epilogue fuses into the softmax kernel, which still gets the row rule, and the compile
    check against onnxruntime (tolerance in quantization steps) passes."""
    from edgekit.compiler import pipeline, to_relax

    def const(name, value, dtype=TensorProto.FLOAT):
        value = np.asarray(value)
        return helper.make_tensor(name, dtype, value.shape, value.ravel())

    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("Softmax", ["xd"], ["p"], axis=-1),
             helper.make_node("QuantizeLinear", ["p", "s2", "z"], ["pq"]),
             helper.make_node("DequantizeLinear", ["pq", "s2", "z"], ["y"])]
    graph = helper.make_graph(
        nodes, "q_softmax", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [12, 64, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [12, 64, 64])],
        [const("s", np.float32(0.05)), const("s2", np.float32(1 / 255)),
         const("z", np.uint8(0), TensorProto.UINT8)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    target = _host_target().tvm_target()
    mod = pipeline.lower(to_relax(model, verify.onnx_input_specs(model, [])), target)
    scripts = _kernel_scripts(mod, target)
    (softmax,) = [text for name, text in scripts.items() if "softmax_quantize" in name]
    assert "_rf = T.sblock_alloc_buffer" in softmax and "T.vectorized" in softmax
    onnx.save(model, tmp_path / "q.onnx")
    result = api.compile(tmp_path / "q.onnx", "host", tmp_path / "q.edgekit",
                         tuning_db=tmp_path / "db")
    assert all(check["ok"] for check in result.manifest["verification"]["outputs"])
