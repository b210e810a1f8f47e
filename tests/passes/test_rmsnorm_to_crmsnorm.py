"""rmsnorm-to-crmsnorm: Pre-RMSNorm -> Pre-CRMSNorm, the residual stream one channel narrower."""

from __future__ import annotations

import numpy as np
import pytest
from _ln_graphs import (
    NORMS,
    builtin,
    builtin_feeds,
    hf_model,
    naive_rmsnorm,
    op_count,
    rel_error,
    residual_model,
    samples,
)
from onnx import numpy_helper

from edgekit.export import torch_outputs
from edgekit.passes import ln_to_rmsnorm
from edgekit.passes.core import run_pass, run_pipeline
from edgekit.passes.rmsnorm_to_crmsnorm import PASS
from edgekit.verify import run_ort

PIPELINE = [(ln_to_rmsnorm.PASS, {}), (PASS, {})]


def _shapes(model) -> dict[str, tuple[int, ...]]:
    return {i.name: tuple(i.dims) for i in model.graph.initializer}


@pytest.mark.parametrize("name, writer_op, narrowed", [
    ("tiny-gpt", "Gather", (256, 63)),  # token embedding table
    ("tiny-vit", "Conv", (63, 3, 4, 4)),  # patch embedding
])
def test_builtin_transformers(name, writer_op, narrowed):
    model, feeds = builtin(name), builtin_feeds(name)
    new, ledger = run_pipeline(model, PIPELINE, feeds)
    assert [r.status for r in ledger] == ["applied", "applied"], ledger[-1].message
    crms = ledger[1]
    assert op_count(new, "LayerNormalization") == op_count(new, "ReduceMean") == 0
    assert op_count(new, "ReduceSum") == 10  # Σx² and Σx per norm
    assert crms.report.details["width"] == ["64 -> 63"] and not crms.report.skipped
    assert crms.report.details["zero_mean_max"] < 1e-6
    writer = next(n for n in new.graph.node if n.op_type == writer_op)
    assert _shapes(new)[writer.input[0] if writer_op == "Gather" else writer.input[1]] == narrowed
    assert all(0 < r.max_rel <= 1e-5 for r in ledger)
    assert rel_error(new, model, feeds) <= 1e-5


def test_gpt2_final_hidden_states_match_torch():
    module, model = hf_model("gpt2")
    feeds = samples(tokens=8, vocab=128)
    new, ledger = run_pipeline(model, PIPELINE, feeds)
    assert [r.status for r in ledger] == ["applied", "applied"], ledger[-1].message
    crms = ledger[1].report
    assert crms.changed["crmsnorm"] == 5 and crms.changed["narrow-reader"] == 4
    # the final norm is the model output: its width is rebuilt, the shape stays (1, 8, 64)
    assert len(crms.details["rebuilt"]) == 1 and "graph output" in crms.skipped[0][1]
    for feed in feeds:
        ref = torch_outputs(module, feed)[0]
        out = run_ort(new, feed)[0]
        assert out.shape == ref.shape == (1, 8, 64)
        assert np.abs(out - ref).max() / np.abs(ref).max() <= 1e-4


@pytest.mark.parametrize("norm", NORMS[1:])
@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-5), (np.float64, 1e-10)])
def test_recognised_rmsnorm_forms(norm, dtype, tol):
    model = residual_model(dtype, norm=norm, centre=True, opset=23 if norm == "fused" else 20)
    new, run = run_pass(model, PASS, {}, samples())
    assert run.status == "applied", run.message
    assert dict(run.report.changed) == {"narrow-writer": 6, "narrow-reader": 3, "crmsnorm": 3}
    assert op_count(new, "ReduceMean") == op_count(new, "RMSNormalization") == 0
    assert _shapes(new)["wte_1"] == (32, 15)
    assert run.max_rel <= tol


@pytest.mark.parametrize("head", ["gemm", "gemm_t"])
def test_gemm_readers_and_reshape_are_narrowed(head):
    model, ledger = run_pipeline(residual_model(head=head), PIPELINE, samples())
    assert ledger[1].status == "applied", ledger[1].message
    flatten = next(n for n in model.graph.node if n.op_type == "Reshape")
    shape = numpy_helper.to_array(next(i for i in model.graph.initializer
                                       if i.name == flatten.input[1]))
    assert shape.tolist() == [-1, 15]
    assert ledger[1].max_rel <= 1e-5


def test_graph_output_keeps_its_width():
    model = residual_model(norm="div", centre=True, final_output=True)
    new, run = run_pass(model, PASS, {}, samples())
    assert run.status == "applied" and run.max_rel <= 1e-5
    assert run.report.details["rebuilt"] == ["ln_f.sq"]
    assert "'ln_f' is a graph output" in run.report.skipped[0][1]
    assert [o.shape for o in run_ort(new, samples()[0])] == [(1, 6, 32), (1, 6, 16)]


def test_stream_that_was_not_recentred_is_refused():
    _, run = run_pass(residual_model(norm="div"), PASS, {}, samples())
    assert run.status == "refused"
    assert run.message.startswith("writer ") and "is not zero-mean" in run.message
    # LN replaced by RMSNorm without ln-to-rmsnorm's recentring: refused, not made wrong
    gpt = naive_rmsnorm(builtin("tiny-gpt"))
    _, run = run_pass(gpt, PASS, {}, builtin_feeds("tiny-gpt"))
    assert run.status == "refused" and "is not zero-mean over the normalized axis" in run.message


def test_per_channel_scale_on_the_stream_is_refused():
    model = residual_model(norm="div", centre=True, layer_scale=True)
    _, run = run_pass(model, PASS, {}, samples())
    assert run.status == "refused" and run.message.startswith(
        "'scale_1' (Mul) scales the stream by a non-constant or per-channel factor")


def test_norm_that_is_not_recognised_says_why():
    model = residual_model(norm="pow", centre=True)
    power = next(i for i in model.graph.initializer if i.name == "ln1.p")
    power.CopyFrom(numpy_helper.from_array(np.array(-0.25, np.float32), "ln1.p"))
    _, run = run_pass(model, PASS, {}, samples())
    assert run.status == "refused" and "without going through an RMSNorm" in run.message
    assert run.report.skipped[0] == ("ln1.ms", "Pow 'ln1.r' after + eps does not raise to -0.5")


def test_model_without_rmsnorm_is_refused():
    _, run = run_pass(residual_model(), PASS, {}, samples())
    assert run.status == "refused" and run.message.startswith("no RMSNorm found")


def test_statistics_are_an_fp32_island():
    """The nodes computing Σz², (Σz)², their mean and root carry edgekit.keep_fp32; the
    final division and the rest of the graph do not (convert-fp16 keeps only the island)."""
    model = builtin("tiny-gpt")
    new, ledger = run_pipeline(model, PIPELINE, builtin_feeds("tiny-gpt"))
    assert ledger[1].status == "applied"
    marked = [n for n in new.graph.node
              if any(p.key == "edgekit.keep_fp32" and "cancels" in p.value
                     for p in n.metadata_props)]
    assert sorted({n.op_type for n in marked}) == ["Add", "Div", "Mul", "Pow", "ReduceSum",
                                                   "Sqrt"]
    assert sum(n.op_type == "ReduceSum" for n in marked) == op_count(new, "ReduceSum") == 10
    assert sum(n.op_type == "Sqrt" for n in marked) == 5
    divs = [n for n in new.graph.node if n.op_type == "Div"]
    assert len([n for n in divs if n in marked]) == 5 < len(divs)  # x / rms stays unmarked


def test_half_precision_stream_is_refused():
    model = residual_model(np.float16, norm="div", centre=True)
    _, run = run_pass(model, PASS, {}, samples())
    assert run.status == "refused" and "float16" in run.message
    assert "fp32 model" in run.message and run.report.skipped[-1][0] == "ln0.sq"


def test_convert_fp16_keeps_the_island_in_fp32():
    """The contract with convert-fp16: every marked node still computes in float32 while
    the matmuls go to float16."""
    import onnx

    from edgekit.passes import available

    fp16 = available()["convert-fp16"]
    new, ledger = run_pipeline(builtin("tiny-gpt"), [*PIPELINE, (fp16, fp16.params)],
                               builtin_feeds("tiny-gpt"))
    assert [r.status for r in ledger] == ["applied"] * 3, ledger[-1].message
    graph = onnx.shape_inference.infer_shapes(new).graph
    elem = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.output]}
    marked = [n for n in new.graph.node
              if any(p.key == "edgekit.keep_fp32" for p in n.metadata_props)]
    assert len(marked) == 40 and {elem[n.output[0]] for n in marked} == {onnx.TensorProto.FLOAT}
    assert {elem[n.output[0]] for n in new.graph.node if n.op_type == "MatMul"} == {
        onnx.TensorProto.FLOAT16}
