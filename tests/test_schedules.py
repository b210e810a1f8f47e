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


def test_schedules_change_loops_not_results():
    """The rule on a matmul kernel: parallel outer loop, vectorized inner loop."""
    import tvm
    from tvm import relax

    from edgekit import schedules, tune
    from edgekit.targets import load_target

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((64, 128), "float32"))
    w = relax.Var("w", relax.TensorType((128, 256), "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(x, w))
        bb.emit_func_output(out)
    target = load_target('{"kind": "llvm", "num-cores": 2}')
    mod = tune.lower(bb.get(), target.tvm_target())
    scheduled, count = schedules.apply_default(mod, target.tvm_target())
    assert count == 1
    text = next(f for _, f in scheduled.functions.items()
                if isinstance(f, tvm.tirx.PrimFunc)).script()
    assert "T.parallel" in text and "T.vectorized" in text
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((64, 128), "float32"), rng.standard_normal((128, 256), "float32")
    vm = relax.VirtualMachine(tvm.compile(scheduled, target=target.tvm_target()), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b)).numpy()
    ref = a.astype(np.float64) @ b.astype(np.float64)
    assert np.abs(got - ref).max() / np.abs(ref).max() <= 1e-5
