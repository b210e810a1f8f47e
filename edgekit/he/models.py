"""Small HE-friendly reference graphs (used by tests and bench/he.py)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def poly_mlp(width_in: int = 8, hidden: int = 16, width_out: int = 4, seed: int = 0
             ) -> onnx.ModelProto:
    """y = (x·W1 + b1)² · W2 + b2: an MLP with a square activation (depth 3)."""
    rng = np.random.default_rng(seed)
    arrays = {"W1": rng.standard_normal((width_in, hidden)) * 0.3,
              "b1": rng.standard_normal(hidden) * 0.1,
              "W2": rng.standard_normal((hidden, width_out)) * 0.3,
              "b2": rng.standard_normal(width_out) * 0.1}
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in arrays.items()]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="bias1"),
             helper.make_node("Mul", ["hb", "hb"], ["sq"], name="square"),
             helper.make_node("MatMul", ["sq", "W2"], ["z"], name="fc2"),
             helper.make_node("Add", ["z", "b2"], ["y"], name="bias2")]
    graph = helper.make_graph(
        nodes, "poly_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width_out])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
