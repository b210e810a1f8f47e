"""fold-ln-affine: LayerNorm γ/β folded into the linear layers that read it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from _ln_graphs import (
    as_input,
    builtin,
    builtin_feeds,
    op_count,
    rel_error,
    residual_model,
    samples,
)
from onnx import numpy_helper

from edgekit.passes.core import run_pass
from edgekit.passes.fold_ln_affine import PASS


def _lns(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {n.name: n for n in model.graph.node if n.op_type == "LayerNormalization"}


def _init(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == name)


def _folded(model: onnx.ModelProto, ln: onnx.NodeProto) -> bool:
    return len(ln.input) == 2 and bool(np.all(_init(model, ln.input[1]) == 1))


@pytest.mark.parametrize("name", ["tiny-gpt", "tiny-vit"])
def test_builtin_transformers(name):
    model, feeds = builtin(name), builtin_feeds(name)
    new, run = run_pass(model, PASS, {}, feeds)
    assert run.status == "applied", run.message
    assert run.report.changed["fold-ln-affine"] == 5 and not run.report.skipped
    assert len(_lns(new)) == 5 and all(_folded(new, ln) for ln in _lns(new).values())
    assert 0 < run.max_rel <= 1e-5
    assert rel_error(new, model, feeds) <= 1e-5


def test_vit_head_is_reached_through_the_cls_gather():
    new, run = run_pass(builtin("tiny-vit"), PASS, {}, builtin_feeds("tiny-vit"))
    readers = [r for rs in run.report.details["folded_into"].values() for r in rs]
    ops = {n.name: n.op_type for n in new.graph.node}
    assert "Gemm" in {ops[r] for r in readers}  # Gather(cls) -> Gemm head was folded


@pytest.mark.parametrize("head", ["matmul", "matmul_nobias", "gemm", "gemm_t"])
@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-5), (np.float64, 1e-10)])
def test_reader_variants(head, dtype, tol):
    model = residual_model(dtype, head=head)
    new, run = run_pass(model, PASS, {}, samples())
    assert run.status == "applied", run.message
    assert run.report.changed["fold-ln-affine"] == 3
    assert all(_folded(new, ln) for ln in _lns(new).values())
    assert run.max_rel <= tol
    # a MatMul without bias gets one: β·W has to land somewhere
    assert op_count(new, "Add") == op_count(model, "Add") + (head == "matmul_nobias")
    if head == "gemm":  # Gemm's alpha=0.5 / beta=2 are honoured when β·W joins C
        assert op_count(new, "Gemm") == 1 and op_count(new, "Add") == op_count(model, "Add")


def test_layer_norm_without_bias():
    model = residual_model()
    for node in model.graph.node:
        if node.op_type == "LayerNormalization":
            del node.input[2]
    new, run = run_pass(model, PASS, {}, samples())
    assert run.status == "applied" and run.max_rel <= 1e-5
    assert op_count(new, "Add") == op_count(model, "Add")


def test_shared_weight_is_skipped():
    model = residual_model(head="gemm_t", tied=True)  # the head Gemm reads the embedding table
    new, run = run_pass(model, PASS, {}, samples())
    assert run.report.changed["fold-ln-affine"] == 2
    assert run.report.skipped == [("ln_f", "weight 'wte' of 'head' is shared with 'embed'")]
    assert len(_lns(new)["ln_f"].input) == 3
    assert np.array_equal(_init(new, "wte"), _init(model, "wte"))


def test_non_linear_reader_and_graph_output_are_skipped():
    _, run = run_pass(residual_model(post_ln=True), PASS, {}, samples())
    assert ("ln0", "reader 'residual_1' (Add) is not a linear layer with a constant "
            "weight") in run.report.skipped
    _, run = run_pass(residual_model(final_output=True), PASS, {}, samples())
    assert run.report.skipped == [("ln_f", "'ln_f' is a graph output")]
    assert run.report.changed["fold-ln-affine"] == 2


def test_reader_without_a_constant_weight_is_skipped_with_the_reason():
    model = as_input(residual_model(), "head_w")
    feeds = [s | {"head_w": np.ones((16, 32), np.float32)} for s in samples()]
    _, run = run_pass(model, PASS, {}, feeds)
    assert run.status == "applied" and run.report.changed["fold-ln-affine"] == 2
    assert run.report.skipped == [("ln_f", "the weight of 'head' (MatMul) is not a constant "
                                           "matrix")]


def test_second_run_has_nothing_left_to_fold():
    once, _ = run_pass(residual_model(), PASS, {}, samples())
    twice, run = run_pass(once, PASS, {}, samples())
    assert run.status == "unchanged" and twice is once
    assert {r for _, r in run.report.skipped} == {
        "its affine is already the identity (scale 1, no bias)"}
