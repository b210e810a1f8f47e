"""ChannelsLast: convs in NHWC with the ops between them following, numerics against
onnxruntime, and the lower-rank constants it widens (or leaves alone)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from _compiled import run_against_ort
from onnx import TensorProto, helper, numpy_helper


def _block_onnx(scale_shape: tuple[int, ...]) -> onnx.ModelProto:
    """Conv -> BatchNorm -> Mul(scale) -> Add(shift) -> Relu -> MaxPool -> Conv, the shape of
    Inception v2's blocks: the scale and shift constants of rank 3 (C, 1, 1), or any other
    shape NumPy broadcasting accepts."""
    rng = np.random.default_rng(0)
    c = 16

    def const(name, shape, low=-1.0, high=1.0):
        return numpy_helper.from_array(rng.uniform(low, high, shape).astype(np.float32), name)

    inits = [const("w1", (c, 8, 3, 3)), const("w2", (c, c, 3, 3)), const("gamma", (c,)),
             const("beta", (c,)), const("mean", (c,)), const("var", (c,), 0.5, 2.0),
             const("scale", scale_shape), const("shift", scale_shape)]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["a", "gamma", "beta", "mean", "var"],
                              ["b"]),
             helper.make_node("Mul", ["b", "scale"], ["s"]),
             helper.make_node("Add", ["s", "shift"], ["t"]),
             helper.make_node("Relu", ["t"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[3, 3], strides=[2, 2],
                              pads=[0, 0, 1, 1]),
             helper.make_node("Conv", ["p", "w2"], ["y"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(
        nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("shape", [(16, 1, 1), (1, 16, 1, 1), (12,), (1, 12), (1,)],
                         ids=["C11", "1C11", "W", "1W", "scalar"])
def test_block_stays_nhwc_and_matches_onnxruntime(shape):
    err, names = run_against_ort(_block_onnx(shape), seed=5)
    assert err <= 1e-5
    # per-channel constants: only the graph's edges change layout; per-width constants
    # (a rank-1 or rank-2 W vector) follow the layout as well, permuted with the activations
    transposes = [n for n in names if "transpose" in n]
    assert len(transposes) <= 2, names
    assert not any("max_pool2d" in n and "transpose" in n for n in names), names


def _binary(shape_x, shape_k):
    from tvm import relax
    from tvm.script import relax as R

    bb = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor(shape_x, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            k = relax.const(np.arange(np.prod(shape_k), dtype=np.float32).reshape(shape_k))
            out = bb.emit_output(relax.op.multiply(x, k))
        bb.emit_func_output(out)
    return bb.get()


def _constant_shapes(mod) -> list[tuple[int, ...]]:
    from tvm import relax

    shapes = []

    def visit(expr):
        if isinstance(expr, relax.Call):
            shapes.extend(tuple(int(d) for d in a.value.shape) for a in expr.args
                          if hasattr(getattr(a, "value", None), "numpy"))

    relax.analysis.post_order_visit(mod["main"], visit)
    return shapes


def test_lower_rank_constant_gets_the_activation_rank():
    from edgekit.compiler.channels_last import _FullRankConstants
    from edgekit.compiler.constant_weights import rewrite_functions

    mod = _binary((1, 4, 3, 3), (4, 1, 1))
    out = rewrite_functions(_FullRankConstants(mod), mod)
    assert _constant_shapes(out) == [(1, 4, 1, 1)]


@pytest.mark.parametrize("shape_x, shape_k", [((2, 4, 3), (4, 1)), ((1, 4, 3, 3), (1, 4, 3, 3))],
                         ids=["3-D activation", "same rank"])
def test_other_binary_ops_are_left_alone(shape_x, shape_k):
    from edgekit.compiler.channels_last import _FullRankConstants
    from edgekit.compiler.constant_weights import rewrite_functions

    mod = _binary(shape_x, shape_k)
    assert rewrite_functions(_FullRankConstants(mod), mod).same_as(mod)
