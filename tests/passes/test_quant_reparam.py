"""The outlier reparameterizations of quantize-int8 (RepQ-ViT LayerNorm scales, SmoothQuant):
exact before any quantization (fp64 ≤ 1e-10, fp32 ≤ 1e-5), and they do even out the ranges."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from _ln_graphs import rel_error, residual_model, samples
from onnx import helper, numpy_helper

from edgekit.passes._ir import Builder, const_array
from edgekit.passes._quant import observe
from edgekit.passes._quant_reparam import foldable, reparam_layernorm, smooth_layernorm

TOL = {np.float64: 1e-10, np.float32: 1e-5}


def _outliers(model: onnx.ModelProto, dtype) -> onnx.ModelProto:
    """``model`` with LN γ/β spread over two orders of magnitude (outlier channels)."""
    rng = np.random.default_rng(1)
    for init in model.graph.initializer:
        if init.name.startswith("ln") and init.name.endswith((".weight", ".bias")):
            arr = onnx.numpy_helper.to_array(init)
            arr = arr * np.exp(rng.uniform(-1.5, 3.0, arr.shape))
            init.CopyFrom(onnx.numpy_helper.from_array(arr.astype(dtype), init.name))
    return model


def _rewrite(model: onnx.ModelProto, how: str, alpha: float = 0.5):
    """Apply the reparameterizations in ``how`` ("smooth+reparam": both, in that order) to
    every foldable LN; (new model, LN names, work model)."""
    work = ir.from_proto(model)
    lns = [n for n in work.graph if n.op_type == "LayerNormalization"]
    b = Builder(work.graph)
    for step in how.split("+"):
        usable = [(ln, foldable(ln)[0]) for ln in lns if not foldable(ln)[1]]
        obs = observe(work, [ln.outputs[0] for ln, _ in usable], samples(4))
        for (ln, readers), o in zip(usable, obs, strict=True):
            if step == "reparam":
                reparam_layernorm(b, ln, readers, o.ch_lo, o.ch_hi)
            else:
                smooth_layernorm(b, ln, readers, o.ch_absmax, alpha)
    return ir.to_proto(work), [ln.name for ln, _ in usable], work


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("how", ["reparam", "smooth"])
@pytest.mark.parametrize("head", ["matmul", "gemm", "gemm_t"])
def test_reparameterization_is_exact(dtype, how, head):
    model = _outliers(residual_model(dtype, head=head), dtype)
    new, names, _ = _rewrite(model, how)
    assert len(names) == 3  # ln0, ln1 and the final ln_f (read by the head through a Reshape)
    err = rel_error(new, model, samples(6))
    assert err <= TOL[dtype], err
    changed = [i.name for i in new.graph.initializer if i.name not in
               {j.name for j in model.graph.initializer}]
    assert changed  # it did rewrite constants (the check is not vacuous)


def test_reparam_gives_every_channel_the_same_range():
    model = _outliers(residual_model(np.float64), np.float64)
    before = observe(ir.from_proto(model), [ir.from_proto(model).graph.node("ln0").outputs[0]],
                     samples(4))[0]
    _, _, work = _rewrite(model, "reparam")
    after = observe(work, [work.graph.node("ln0").outputs[0]], samples(4))[0]
    spread = lambda o: np.ptp(o.ch_hi - o.ch_lo) / np.mean(o.ch_hi - o.ch_lo)  # noqa: E731
    assert spread(before) > 1.0
    assert spread(after) < 1e-5  # the calibration data itself: exactly one width per channel
    assert np.ptp(after.ch_lo) < 1e-5 * np.mean(after.ch_hi - after.ch_lo)


def test_smooth_moves_activation_outliers_into_the_weights():
    model = _outliers(residual_model(np.float64), np.float64)
    w_before = const_array(ir.from_proto(model).graph.initializers["w1_0"])
    before = observe(ir.from_proto(model), [ir.from_proto(model).graph.node("ln0").outputs[0]],
                     samples(4))[0]
    _, _, work = _rewrite(model, "smooth", alpha=0.5)
    after = observe(work, [work.graph.node("ln0").outputs[0]], samples(4))[0]
    ratio = lambda a: a.max() / np.median(a)  # noqa: E731
    assert ratio(after.ch_absmax) < 0.5 * ratio(before.ch_absmax)
    fc1 = work.graph.node("fc1_0")
    w_after = const_array(fc1.inputs[1])
    s = w_after[:, 0] / w_before[:, 0]  # W' = diag(s)·W, rows scaled
    assert np.allclose(w_after, s[:, None] * w_before, rtol=1e-12)
    w_rows = np.abs(w_before).max(axis=1)
    expect = before.ch_absmax.astype(np.float64) ** 0.5 / w_rows ** 0.5
    assert np.allclose(s, expect, rtol=1e-5)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("how", ["reparam", "smooth", "smooth+reparam"])
def test_post_ln_other_readers_are_compensated_exactly(dtype, how):
    """Post-LN (BERT): ln0's output feeds fc1 of block 1 and the residual Add (and a Tanh
    tap); those two read ``y'·r − t`` while fc1's weight absorbs the rescaling."""
    model = _outliers(residual_model(dtype, post_ln=True, tap=True), dtype)
    new, names, work = _rewrite(model, how)
    assert names == ["ln0", "ln1"]  # ln1 is read by the head alone
    err = rel_error(new, model, samples(6))
    assert err <= TOL[dtype], err
    residual, tap = work.graph.node("residual_1"), work.graph.node("tap")
    undo = residual.inputs[0].producer()  # the compensation, not the LN, feeds the Add
    assert undo is not work.graph.node("ln0") and undo.op_type in ("Mul", "Add")
    assert tap.inputs[0] is residual.inputs[0]  # one compensation per LN, shared
    assert work.graph.node("fc1_1").inputs[0].producer() is work.graph.node("ln0")
    y = observe(work, [work.graph.node("ln0").outputs[0]], samples(4))[0]
    width = y.ch_hi - y.ch_lo
    if how.endswith("reparam"):  # what the MatMul reads has one range in every channel
        assert np.ptp(width) < 1e-4 * np.mean(width)


def test_layernorm_without_a_linear_reader_or_as_a_graph_output_is_not_foldable():
    work = ir.from_proto(residual_model(np.float32, final_output=True))
    assert foldable(work.graph.node("ln_f"))[1] == "its output 'ln_f' is a graph output"
    work = ir.from_proto(residual_model(np.float32, post_ln=True, tap=True, head="gemm_t",
                                        tied=True))
    ln1 = work.graph.node("ln1")  # the tied head's weight is the embedding table: shared
    assert "is shared with" in foldable(ln1)[1]
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["n"], name="ln", axis=-1),
             helper.make_node("Tanh", ["n"], ["y"], name="act")]
    graph = helper.make_graph(
        nodes, "ln_act", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 8])],
        [numpy_helper.from_array(np.ones(8, np.float32), n) for n in ("g", "b")])
    work = ir.from_proto(onnx.shape_inference.infer_shapes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])))
    assert foldable(work.graph.node("ln"))[1] == "no linear layer with a constant weight reads it"
