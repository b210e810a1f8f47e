"""Tiny ONNX graphs the fault tests (and ``bench/faults_tune.py``) compile: a chain of MatMul+Relu
layers (one kernel per layer shape) and one elementwise op with a constant."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper


def chain(path: Path, dims: list[int], seed: int = 0) -> Path:
    """y = relu(...relu(x @ w0)... @ wk): one MatMul+Relu kernel per (dims[i], dims[i+1])."""
    rng, nodes, inits, x = np.random.default_rng(seed), [], [], "x"
    for i, (a, b) in enumerate(zip(dims, dims[1:], strict=False)):
        w = rng.standard_normal((a, b)).astype(np.float32)
        inits.append(helper.make_tensor(f"w{i}", TensorProto.FLOAT, [a, b], w.ravel()))
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]),
                  helper.make_node("Relu", [f"m{i}"], [f"r{i}"])]
        x = f"r{i}"
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, dims[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, dims[-1]])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def elementwise(path: Path, op: str, value: float) -> Path:
    """y = x <op> value, x: 1x4 float (Add and Mul give differently named kernels)."""
    c = helper.make_tensor("c", TensorProto.FLOAT, [4], [value] * 4)
    graph = helper.make_graph(
        [helper.make_node(op, ["x", "c"], ["y"])], op.lower(),
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [c])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path
