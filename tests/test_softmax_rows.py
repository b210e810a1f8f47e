"""Softmax over a symbolic last axis (``compiler/softmax_rows``): vector partial sums with a
tail, every length against float64 NumPy and onnxruntime, masked keys, NaN; static rows keep
TOPI's kernel."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgekit import compiler, verify
from edgekit.compiler.softmax_rows import PREFIX
from edgekit.targets import load_target


def _softmax_model(keys):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, "q", keys])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, "q", keys])
    graph = helper.make_graph([helper.make_node("Softmax", ["x"], ["y"], axis=-1)], "g",
                              [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _build(model: onnx.ModelProto, bounds):
    import tvm
    from tvm import relax

    target = load_target("host")
    mod = compiler.to_relax(model, verify.onnx_input_specs(model, []),
                            tvm_target=target.tvm_target(), dim_bounds=bounds)
    vm = relax.VirtualMachine(compiler.build(mod, target), tvm.cpu())
    text = "\n".join(f.script() for _, f in mod.functions.items()
                     if isinstance(f, tvm.tirx.PrimFunc))
    return text, lambda x: vm["main"](tvm.runtime.tensor(x)).numpy()


def _reference(x: np.ndarray) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_every_length_against_float64_and_onnxruntime():
    model = _softmax_model("seq")
    text, run = _build(model, {"seq": (1, 64), "q": (1, 8)})
    assert f"{PREFIX}_pmax" in text  # the vector-partials kernel, not TOPI's scalar one
    rng = np.random.default_rng(0)
    # under one vector of partials, exactly 1 and 2 vectors (empty tail), tails of all sizes
    for keys in (1, 5, 15, 16, 17, 32, 33, 64):
        x = (rng.standard_normal((2, 3, 4, keys)) * 6).astype(np.float32)
        got = run(x)
        assert np.abs(got - _reference(x)).max() <= 1e-6, keys
        np.testing.assert_allclose(got, verify.run_ort(model, {"x": x})[0], atol=1e-6)


def test_masked_keys_are_exactly_zero_and_nan_propagates():
    _, run = _build(_softmax_model("seq"), {"seq": (1, 64), "q": (1, 8)})
    x = np.random.default_rng(1).standard_normal((2, 3, 2, 37)).astype(np.float32)
    x[..., 20:] = -np.inf  # an additive -inf mask over the tail keys and part of the main
    got = run(x)
    assert np.all(got[..., 20:] == 0)
    assert np.abs(got - _reference(x)).max() <= 1e-6
    x[0, 1, 1, 3] = np.nan
    got = run(x)
    assert np.isnan(got[0, 1, 1]).all() and not np.isnan(np.delete(got[0, 1], 1, 0)).any()


def test_static_rows_keep_topi_kernel():
    """A static row of whole vectors has its own schedule (``reductions.schedule_rows``)."""
    # 32 keys: whole vectors at 4, 8 and 16 fp32 lanes (NEON, AVX2, AVX-512)
    text, run = _build(_softmax_model(32), {"q": (1, 8)})
    assert PREFIX not in text
    x = np.random.default_rng(2).standard_normal((2, 3, 5, 32)).astype(np.float32)
    assert np.abs(run(x) - _reference(x)).max() <= 1e-6


def test_static_odd_rows_with_fused_epilogue():
    """A static row that is not whole vectors (ViT's 197 tokens) takes this kernel too, also
    with an elementwise epilogue fused after it (transformers' ``where(isnan(p), 0, p)``)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 29, 37])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 29, 37])
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])
    nodes = [helper.make_node("Softmax", ["x"], ["p"], axis=-1),
             helper.make_node("IsNaN", ["p"], ["nan"]),
             helper.make_node("Where", ["nan", "zero", "p"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [zero]),
                              opset_imports=[helper.make_opsetid("", 17)])
    text, run = _build(model, None)
    assert f"{PREFIX}_psum" in text
    data = (np.random.default_rng(3).standard_normal((1, 3, 29, 37)) * 5).astype(np.float32)
    data[0, 1, 2] = -np.inf  # a fully masked row: NaN from the softmax, 0 after the where
    got = run(data)
    np.testing.assert_allclose(got, verify.run_ort(model, {"x": data})[0], atol=1e-6)
    assert np.all(got[0, 1, 2] == 0)
    rest = np.delete(data[0, 1], 2, 0)
    assert np.abs(np.delete(got[0, 1], 2, 0) - _reference(rest)).max() <= 1e-6
