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


def attention_block(seq: int = 8, width: int = 32, heads: int = 2, seed: int = 0,
                    logit_std: float = 1.0) -> onnx.ModelProto:
    """One multi-head self-attention block with a residual: y = x + MHA(x) (opset 18).

    Seeded Gaussian weights (std 1/√width, biases 0.1); Wq carries the 1/√d_head scale and
    ``logit_std`` (the score spread on N(0, 1) tokens, about 2 with the default: a typical
    trained head's within-row spread, see bench/he.py for the measured range). No LayerNorm:
    its Newton inverse square root would not fit the 19–25 levels CKKS holds without
    bootstrapping next to the softmax. Softmax is the original op: apply poly-softmax.
    """
    if width % heads:
        raise ValueError("width must be a multiple of heads")
    rng = np.random.default_rng(seed)
    head = width // heads

    def weight(scale: float = 1.0) -> np.ndarray:
        return rng.standard_normal((width, width)) * scale / np.sqrt(width)

    arrays = {"Wq": weight(logit_std) / np.sqrt(head),
              "Wk": weight(), "Wv": weight(), "Wo": weight(),
              "bq": rng.standard_normal(width) * 0.1, "bk": rng.standard_normal(width) * 0.1,
              "bv": rng.standard_normal(width) * 0.1, "bo": rng.standard_normal(width) * 0.1}
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in arrays.items()]
    inits.append(numpy_helper.from_array(np.array([1, seq, heads, head], np.int64), "split"))
    inits.append(numpy_helper.from_array(np.array([1, seq, width], np.int64), "merge"))
    n = helper.make_node
    nodes = []
    for name in ("q", "k", "v"):
        nodes += [n("MatMul", ["x", f"W{name}"], [f"{name}_mm"], name=f"{name}_proj"),
                  n("Add", [f"{name}_mm", f"b{name}"], [f"{name}_lin"], name=f"{name}_bias"),
                  n("Reshape", [f"{name}_lin", "split"], [f"{name}_heads"], name=f"{name}_split")]
    nodes += [
        n("Transpose", ["q_heads"], ["q_t"], name="q_transpose", perm=[0, 2, 1, 3]),
        n("Transpose", ["k_heads"], ["k_t"], name="k_transpose", perm=[0, 2, 3, 1]),
        n("Transpose", ["v_heads"], ["v_t"], name="v_transpose", perm=[0, 2, 1, 3]),
        n("MatMul", ["q_t", "k_t"], ["scores"], name="scores"),
        n("Softmax", ["scores"], ["probs"], name="softmax", axis=-1),
        n("MatMul", ["probs", "v_t"], ["context"], name="context"),
        n("Transpose", ["context"], ["context_t"], name="context_transpose", perm=[0, 2, 1, 3]),
        n("Reshape", ["context_t", "merge"], ["context_m"], name="merge_heads"),
        n("MatMul", ["context_m", "Wo"], ["o_mm"], name="o_proj"),
        n("Add", ["o_mm", "bo"], ["o_lin"], name="o_bias"),
        n("Add", ["x", "o_lin"], ["y"], name="residual")]
    graph = helper.make_graph(
        nodes, "attention_block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, seq, width])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def poly_attention_block(seq: int = 8, width: int = 32, heads: int = 2, seed: int = 0,
                         calibration: int = 16, softmax: str = "poly-softmax:steps=0:tol=0.02"
                         ) -> tuple[onnx.ModelProto, onnx.ModelProto, dict]:
    """(original block, block after ``softmax`` calibrated on seeded inputs, pass details)."""
    from edgekit.errors import EdgekitError
    from edgekit.passes import available
    from edgekit.passes.core import parse_pass_list, run_pass

    original = attention_block(seq, width, heads, seed)
    [(p, params)] = parse_pass_list(softmax, available())
    poly, run = run_pass(original, p, params, block_inputs(calibration, seq, width, seed + 1))
    if run.status != "applied":
        why = run.message or "; ".join(f"{k}: {v}" for k, v in run.report.skipped)
        raise EdgekitError(f"{softmax} did not apply to the attention block: {why}")
    return original, poly, run.report.details


def block_inputs(count: int, seq: int = 8, width: int = 32, seed: int = 1
                 ) -> list[dict[str, np.ndarray]]:
    """Seeded N(0, 1) token sequences ``{"x": (1, seq, width)}``."""
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, seq, width)).astype(np.float32)}
            for _ in range(count)]
