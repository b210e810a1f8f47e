"""linear-attention-order: (Q·Kᵀ)·V -> Q·(Kᵀ·V) on SLAB's SLA, exact, with FLOPs accounting."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from _bn_graphs import Graph, exported, ops, run_checked, samples

from edgekit.passes.core import run_pass
from edgekit.passes.linear_attention_order import PASS


def test_slab_sla_vit():
    """Both SLA blocks go kv-first: FLOPs of the graph drop, the outputs stay within 1e-5."""
    _, model = exported("slab-sla-vit")
    new, run = run_pass(model, PASS, {}, samples(model))
    assert run.status == "applied" and dict(run.report.changed) == {"kv-first": 2}
    assert not run.report.skipped and run.max_rel <= 1e-5
    per_block = list(run.report.details["rewritten"].values())
    assert [(r["tokens"], r["dim"], r["normalisers"]) for r in per_block] == [(64, 16, 1)] * 2
    # qk-first 4N²d vs kv-first 4Nd² + 2Nd per head and batch, 2 heads
    assert all(r["flops_before"] == 2 * 4 * 64 * 64 * 16 for r in per_block)
    assert all(r["flops_after"] == 2 * (4 * 64 * 16 * 16 + 2 * 64 * 16) for r in per_block)
    saved = sum(r["flops_before"] - r["flops_after"] for r in per_block)
    assert run.flops_before - run.flops_after == saved
    assert ops(new, "MatMul") == ops(model, "MatMul") + 2  # per block: -2 +3 (kv, q·kv, q·Σk)


def test_slab_sla_vit_fp64():
    _, model = exported("slab-sla-vit", dtype="float64")
    _, report, err = run_checked(model, PASS)
    assert dict(report.changed) == {"kv-first": 2} and err <= 1e-10


def _attention(g: Graph, n: int, d: int, normaliser: bool, axes: int = -1,
               also_out: bool = False) -> list[str]:
    """SLA's core on ReLU features of inputs q, k, v of shape (1, 2, n, d)."""
    q, k, v = (g.node("Relu", [g.input(f"{t}_in", 1, 2, n, d)], t) for t in ("q", "k", "v"))
    a = g.node("MatMul", [q, g.node("Transpose", [k], "kt", perm=[0, 1, 3, 2])], "qk")
    out = g.node("MatMul", [a, v], "av")
    if normaliser:
        den = g.node("ReduceSum", [a, g.const("axes", [axes], np.int64)], "den", keepdims=1)
        out = g.node("Div", [out, g.node("Add", [den, g.const("eps", 1e-6)], "den_eps")], "o")
    return [out, a] if also_out else [out]


@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-5), (np.float64, 1e-10)])
@pytest.mark.parametrize("normaliser, axes", [(True, -1), (True, 3), (False, -1)])
def test_forms(dtype, tol, normaliser, axes):
    g = Graph(dtype)
    model = g.model(*_attention(g, 48, 8, normaliser, axes))
    new, report, err = run_checked(model, PASS)
    assert dict(report.changed) == {"kv-first": 1} and err <= tol
    inferred = onnx.shape_inference.infer_shapes(new).graph.value_info
    shapes = {tuple(d.dim_value for d in v.type.tensor_type.shape.dim) for v in inferred}
    assert (1, 2, 48, 48) not in shapes and (1, 2, 8, 8) in shapes  # no N×N, a d×d instead
    assert ops(new, "MatMul") == 2 + normaliser


def test_short_sequences_stay_qk_first():
    """N ≤ d: the N×N product is the cheaper order; left alone with the reason."""
    g = Graph()
    model = g.model(*_attention(g, 8, 16, True))
    _, report, _ = run_checked(model, PASS)
    (node, reason), = report.skipped
    assert node == "qk" and reason.startswith("qk-first already does less work (N=8, d=16")
    assert not report.modified


def test_softmax_attention_is_not_linear_attention():
    """The built-in slab-vit's softmax attention has no MatMul-of-MatMul: nothing to do."""
    _, model = exported("slab-vit")
    _, run = run_pass(model, PASS, {}, samples(model))
    assert run.status == "unchanged" and run.message == "found nothing this pass rewrites"


def test_product_read_elsewhere_is_refused():
    g = Graph()
    model = g.model(*_attention(g, 48, 8, True, also_out=True))
    _, report, _ = run_checked(model, PASS)
    assert report.skipped == [("av", "the product 'qk' is a graph output")]


def test_weight_chain_is_not_attention():
    """x·W1·W2 with constant weights is two Linears, not an attention product."""
    g = Graph()
    h = g.node("MatMul", [g.input("x", 1, 64, 8), g.rand("w1", 8, 4)], "fc1")
    model = g.model(g.node("MatMul", [h, g.rand("w2", 4, 8)], "fc2"))
    _, report, _ = run_checked(model, PASS)
    assert report.skipped == [("fc2", "an operand is a constant weight: not an attention "
                                      "product")]
