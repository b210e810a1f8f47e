"""edgekit.flops: FLOPs of hand-made graphs against the formulas, op by op."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgekit import flops
from edgekit.errors import EdgekitError


def one_node(op: str, inputs: dict[str, list], weights: dict[str, np.ndarray],
             out_shape: list, **attrs) -> onnx.ModelProto:
    names = [*inputs, *weights]
    graph = helper.make_graph(
        [helper.make_node(op, names, ["y"], name="n", **attrs)], "g",
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in inputs.items()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_matmul_broadcast_batch():
    m = one_node("MatMul", {"a": [2, 3, 5, 7], "b": [3, 7, 11]}, {}, [2, 3, 5, 11])
    assert flops.count(m) == 2 * (2 * 3) * 5 * 7 * 11


def test_gemm_with_transposes():
    m = one_node("Gemm", {"a": [7, 5]}, {"w": np.zeros((11, 7))}, [5, 11], transA=1, transB=1)
    assert flops.count(m) == 2 * 5 * 7 * 11


def test_grouped_conv_and_conv_transpose():
    conv = one_node("Conv", {"x": [1, 8, 10, 10]}, {"w": np.zeros((16, 2, 3, 3))},
                    [1, 16, 8, 8], group=4)
    assert flops.count(conv) == 2 * (16 * 8 * 8) * (2 * 3 * 3)
    convt = one_node("ConvTranspose", {"x": [1, 4, 5, 5]}, {"w": np.zeros((4, 6, 2, 2))},
                     [1, 6, 10, 10], strides=[2, 2])
    assert flops.count(convt) == 2 * (4 * 5 * 5) * (6 * 2 * 2)


def test_einsum_and_uncounted_ops():
    m = one_node("Einsum", {"a": [2, 5, 7], "b": [2, 7, 3]}, {}, [2, 5, 3],
                 equation="bij,bjk->bik")
    assert flops.count(m) == 2 * 2 * 5 * 7 * 3
    ell = one_node("Einsum", {"a": [4, 2, 5, 7], "b": [4, 2, 7, 3]}, {}, [4, 2, 5, 3],
                   equation="...ij,...jk->...ik")
    assert flops.count(ell) == 2 * 8 * 5 * 7 * 3
    relu = one_node("Relu", {"x": [100, 100]}, {}, [100, 100])
    assert flops.count(relu) == 0 and flops.by_op(relu) == {}


def test_dynamic_shapes_raise_or_none():
    m = one_node("MatMul", {"a": ["n", 5]}, {"b": np.zeros((5, 3))}, ["n", 3])
    with pytest.raises(EdgekitError, match="not static"):
        flops.count(m)
    assert flops.try_count(m) is None
