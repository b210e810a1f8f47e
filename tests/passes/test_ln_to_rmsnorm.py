"""ln-to-rmsnorm: Pre-LN -> Pre-RMSNorm by recentring the residual writers."""

from __future__ import annotations

import numpy as np
import pytest
from _ln_graphs import (
    as_input,
    builtin,
    builtin_feeds,
    hf_model,
    naive_rmsnorm,
    op_count,
    rel_error,
    residual_model,
    samples,
)

from edgekit.export import torch_outputs
from edgekit.passes.core import run_pass
from edgekit.passes.ln_to_rmsnorm import PASS
from edgekit.verify import run_ort


@pytest.mark.parametrize("name, writers", [("tiny-gpt", 10), ("tiny-vit", 12)])
def test_builtin_transformers(name, writers):
    model, feeds = builtin(name), builtin_feeds(name)
    new, run = run_pass(model, PASS, {}, feeds)
    assert run.status == "applied", run.message
    assert op_count(model, "LayerNormalization") == 5 and op_count(new, "LayerNormalization") == 0
    assert op_count(new, "ReduceMean") == op_count(new, "Sqrt") == 5
    assert dict(run.report.changed) == {"recentre-writer": writers, "fold-ln-affine": 5,
                                        "ln-to-rmsnorm": 5}
    assert run.report.details["form"].startswith("decomposed: Pow, ReduceMean, Add, Sqrt, Div")
    assert 0 < run.max_rel <= 1e-5
    assert rel_error(new, model, feeds) <= 1e-5


def test_without_recentring_the_replacement_is_wrong():
    """Negative control: RMSNorm in place of LN on the un-centred stream is far off."""
    model, feeds = builtin("tiny-gpt"), builtin_feeds("tiny-gpt")
    converted, _ = run_pass(model, PASS, {}, feeds)
    assert rel_error(naive_rmsnorm(model), model, feeds) > 0.05
    assert rel_error(converted, model, feeds) <= 1e-5


@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-5), (np.float64, 1e-10)])
@pytest.mark.parametrize("head", ["matmul", "gemm"])
def test_small_graphs(dtype, tol, head):
    new, run = run_pass(residual_model(dtype, head=head), PASS, {}, samples())
    assert run.status == "applied", run.message
    assert op_count(new, "LayerNormalization") == 0 and run.max_rel <= tol


@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-5), (np.float64, 1e-10)])
def test_layer_scale_is_folded_into_its_writer(dtype, tol):
    model = residual_model(dtype, layer_scale=True)
    new, run = run_pass(model, PASS, {}, samples())
    assert run.status == "applied", run.message
    assert run.report.changed["fold-layer-scale"] == 2
    assert op_count(new, "Mul") == 0 and run.max_rel <= tol


@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-5), (np.float64, 1e-10)])
def test_opset23_uses_rmsnormalization(dtype, tol):
    model = residual_model(dtype, opset=23)
    new, run = run_pass(model, PASS, {}, samples())
    assert run.report.details["form"] == "RMSNormalization (opset 23)"
    assert op_count(new, "RMSNormalization") == 3 and op_count(new, "ReduceMean") == 0
    assert run.max_rel <= tol
    stash = {a.i for n in new.graph.node for a in n.attribute if a.name == "stash_type"}
    assert stash == {11 if dtype == np.float64 else 1}  # fp64 is not computed in fp32
    new, run = run_pass(model, PASS, {"fused": False}, samples())
    assert op_count(new, "RMSNormalization") == 0 and op_count(new, "ReduceMean") == 3


def test_layer_scale_that_cannot_be_folded_says_why():
    model = as_input(residual_model(layer_scale=True), "w2_1")
    _, run = run_pass(model, PASS, {}, samples())
    assert run.status == "refused" and "'scale_1' (Mul) scales the stream" in run.message
    assert run.report.skipped[0] == ("scale_1", "per-channel scale not folded into its writer: "
                                     "MatMul 'fc2_1' is not a MatMul/Gemm with a constant weight")


def test_gpt2_final_hidden_states_match_torch():
    module, model = hf_model("gpt2")
    new, run = run_pass(model, PASS, {}, samples(tokens=8, vocab=128))
    assert run.status == "applied", run.message
    assert op_count(new, "LayerNormalization") == 0
    # the final LN output is the model output: its affine stays, as Mul/Add
    assert [n for n, _ in run.report.skipped] == run.report.details["affine_kept"]
    assert "graph output" in run.report.skipped[0][1]
    for feed in samples(tokens=8, vocab=128):
        ref = torch_outputs(module, feed)[0]
        out = run_ort(new, feed)[0]
        assert np.abs(out - ref).max() / np.abs(ref).max() <= 1e-4


def test_bert_is_refused_as_post_ln():
    _, model = hf_model("bert")
    same, run = run_pass(model, PASS, {}, samples(tokens=8, vocab=128))
    assert run.status == "refused" and same is model
    assert run.message.startswith("Post-LN: the output of ")
    assert "is itself the residual stream" in run.message


def test_stream_read_without_layer_norm_is_refused():
    _, run = run_pass(residual_model(tap=True), PASS, {}, samples())
    assert run.status == "refused"
    assert run.message == ("'tap' (Tanh) reads the residual stream value 'residual_0' without "
                           "going through a LayerNormalization")
    assert run.report.skipped == [("tap", run.message)]


def test_tied_embedding_is_untied():
    model = residual_model(head="gemm_t", tied=True)  # Gather and head Gemm share 'wte'
    new, run = run_pass(model, PASS, {}, samples())
    assert run.status == "applied" and run.max_rel <= 1e-5
    assert run.report.details["untied"] == ["wte"]
    inputs = {n.name: n.input for n in new.graph.node}
    assert inputs["embed"][0] != inputs["head"][1]


def test_no_layer_norm_is_refused():
    _, run = run_pass(residual_model(norm="div"), PASS, {}, samples())
    assert run.status == "refused" and run.message == "the model has no LayerNormalization"
