"""fold-repbn: SLAB's RepBN ``BN(x) + α·x`` folded into the patch conv and following Linears."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from _bn_graphs import Graph, exported, ops, rel_error, run_checked, samples
from onnx import numpy_helper

from edgekit.passes.core import run_pass, run_pipeline
from edgekit.passes.fold_bn import PASS as FOLD_BN
from edgekit.passes.fold_repbn import PASS

SLAB_FOLDS = {"into-conv": 1, "into-next-matmul": 4, "into-next-gemm": 1}


def test_slab_vit():
    """patch norm -> patch conv; norm1/norm2 -> qkv/fc1; final norm -> head (via the mean)."""
    _, model = exported("slab-vit")
    new, report, err = run_checked(model, PASS)
    assert ops(model, "BatchNormalization") == 6 and ops(new, "BatchNormalization") == 0
    assert ops(new, "Mul") == ops(model, "Mul") - 6  # the α·x terms are gone too
    assert dict(report.changed) == SLAB_FOLDS and report.details["repbn"] == 6
    assert not report.skipped
    assert err <= 1e-5 and rel_error(new, model) <= 1e-5


def test_slab_vit_fp64():
    _, model = exported("slab-vit", dtype="float64")
    new, report, err = run_checked(model, PASS)
    assert dict(report.changed) == SLAB_FOLDS and err <= 1e-10


def test_slab_reference_formula_is_wrong_for_a_conv_with_bias():
    """SLAB's merge_bn sets bias' = s(bias − μ) + β for the patch conv, dropping α·bias."""
    _, model = exported("slab-vit")
    new, _, err = run_checked(model, PASS)
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    gamma, beta, mean, var = (init[f"patch_norm.bn.{p}"].astype(np.float64)
                              for p in ("weight", "bias", "running_mean", "running_var"))
    bias, alpha = init["patch.bias"].astype(np.float64), float(init["patch_norm.alpha"][0])
    assert np.abs(alpha * bias).max() > 0.01  # the term the reference formula loses
    s = gamma / np.sqrt(var + 1e-5)  # torch's BatchNorm1d epsilon
    conv, = (n for n in new.graph.node if n.op_type == "Conv")
    folded = {i.name: i for i in new.graph.initializer}[conv.input[2]]
    ours = numpy_helper.to_array(folded).astype(np.float64)
    np.testing.assert_allclose(ours, (s + alpha) * bias + beta - mean * s, rtol=1e-6, atol=1e-6)
    wrong = onnx.ModelProto()
    wrong.CopyFrom(new)
    for i in wrong.graph.initializer:
        if i.name == conv.input[2]:
            i.CopyFrom(numpy_helper.from_array((s * (bias - mean) + beta).astype(np.float32),
                                               i.name))
    assert err <= 1e-5 and rel_error(new, model) <= 1e-5
    assert rel_error(wrong, model) > 1e-3


def test_after_fold_bn():
    """fold-bn turns each RepBN's BN into Mul+Add; fold-repbn recognises that form too."""
    _, model = exported("slab-vit")
    new, ledger = run_pipeline(model, [(FOLD_BN, FOLD_BN.params), (PASS, {})], samples(model))
    assert [run.status for run in ledger] == ["applied", "applied"]
    assert dict(ledger[0].report.changed) == {"to-mul-add": 6}
    assert dict(ledger[1].report.changed) == SLAB_FOLDS
    assert ops(new, "Mul") == ops(model, "Mul") - 6 and rel_error(new, model) <= 1e-5


def _linear(g: Graph, x: str, name: str, cin: int, cout: int) -> str:
    mm = g.node("MatMul", [x, g.rand(f"{name}.w", cin, cout)], f"{name}_mm")
    return g.node("Add", [mm, g.rand(f"{name}.b", cout)], name)


def _repbn(g: Graph, x: str, form: str, alpha: np.ndarray, p: str = "", **bn_attrs) -> str:
    """RepBN over the channels of (B, N, C) tokens ``x``, written the ways exports write it."""
    tr = {"perm": [0, 2, 1]}
    t = g.node("Transpose", [x], f"{p}t", **tr)
    if form == "xspace":  # BN(xᵀ)ᵀ + α·x
        back = g.node("Transpose", [g.bn(t, 6, f"{p}bn", **bn_attrs)], f"{p}back", **tr)
        ax = g.node("Mul", [x, g.const(f"{p}alpha", alpha)], f"{p}ax")
        return g.node("Add", [back, ax], f"{p}sum")
    bn = g.bn(t, 6, f"{p}bn", **bn_attrs)
    u = g.node("Transpose", [x], f"{p}t2", **tr) if form == "two-transposes" else t
    ax = g.node("Mul", [g.const(f"{p}alpha", alpha), u], f"{p}ax")  # SLAB: BN + α·x on xᵀ
    return g.node("Transpose", [g.node("Add", [ax, bn], f"{p}sum")], f"{p}out_t", **tr)


ALPHAS = {"scalar": np.array([0.7]), "per-channel": np.linspace(-0.5, 1.0, 6)}


@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-5), (np.float64, 1e-10)])
@pytest.mark.parametrize("form, alpha", [("slab", "scalar"), ("xspace", "scalar"),
                                         ("two-transposes", "scalar"), ("slab", "per-channel"),
                                         ("xspace", "per-channel")])
@pytest.mark.parametrize("where", ["producer", "consumer"])
def test_forms(form, alpha, where, dtype, tol):
    g = Graph(dtype)
    x = g.input("x", 2, 5, 6)
    if where == "producer":  # Linear -> RepBN: folds into the Linear before it
        x = _linear(g, x, "fc0", 6, 6)
    a = ALPHAS[alpha].reshape((-1, 1) if form != "xspace" and alpha != "scalar" else (-1,))
    y = _repbn(g, x, form, a)
    new, report, err = run_checked(g.model(_linear(g, y, "fc", 6, 3)), PASS)
    rule = "into-matmul" if where == "producer" else "into-next-matmul"
    assert dict(report.changed) == {rule: 1} and not report.skipped
    linears = 2 if where == "producer" else 1  # the Transposes cancel out too
    assert sorted(n.op_type for n in new.graph.node) == ["Add"] * linears + ["MatMul"] * linears
    assert err <= tol


@pytest.mark.parametrize("form", ["slab", "xspace"])
def test_two_repbns_in_a_row(form):
    """The second RepBN is matched after the first is folded (its input was rewired)."""
    g = Graph()
    x = _linear(g, g.input("x", 2, 5, 6), "fc0", 6, 6)
    y = _repbn(g, _repbn(g, x, form, np.array([0.5])), form, np.array([-0.3]), p="second_")
    new, report, err = run_checked(g.model(_linear(g, y, "fc", 6, 3)), PASS)
    assert dict(report.changed) == {"into-matmul": 2} and ops(new, "BatchNormalization") == 0
    assert sorted(n.op_type for n in new.graph.node) == ["Add", "Add", "MatMul", "MatMul"]
    assert err <= 1e-5


def test_non_linear_reader_is_refused_then_decomposed():
    g = Graph()
    y = _repbn(g, g.input("x", 2, 5, 6), "slab", np.array([0.5]))
    model = g.model(g.node("Relu", [y], "relu"))
    kept, report, _ = run_checked(model, PASS, decompose=False)
    (node, reason), = report.skipped
    assert node == "bn" and "'x' is a graph input" in reason
    assert "consumer 'relu' (Relu, input 0) is not a linear layer" in reason
    assert not report.modified and ops(kept, "BatchNormalization") == 1
    new, report, err = run_checked(model, PASS)
    assert dict(report.changed) == {"to-mul-add": 1} and ops(new, "BatchNormalization") == 0
    assert ops(new, "Mul") == 1 and err <= 1e-5


def test_shared_reader_weight_is_refused():
    g = Graph()
    y = _repbn(g, g.input("x", 2, 5, 6), "slab", np.array([0.5]))
    w = g.rand("w", 6, 3)
    model = g.model(g.node("MatMul", [y, w], "fc"), g.node("MatMul", [g.input("z", 4, 6), w],
                                                            "other"))
    _, report, err = run_checked(model, PASS)
    assert "weight 'w' is shared with node 'other'" in dict(report.skipped)["bn"]
    assert dict(report.changed) == {"to-mul-add": 1} and err <= 1e-5


def test_training_mode_repbn_is_left_alone():
    g = Graph()
    y = _repbn(g, g.input("x", 2, 5, 6), "slab", np.array([0.5]), training_mode=1)
    g.nodes[[n.name for n in g.nodes].index("bn")].output.extend(["mean_out", "var_out"])
    _, report, _ = run_checked(g.model(_linear(g, y, "fc", 6, 3)), PASS)
    assert report.skipped == [("sum", "RepBN 'bn': training_mode=1 (batch statistics, "
                                      "not a fixed affine)")]
    assert not report.modified


def test_plain_bn_is_not_a_repbn():
    """BN(x) + y over different tensors is a residual, not RepBN: nothing to do here."""
    g = Graph()
    x = g.input("x", 1, 4, 3, 3)
    model = g.model(g.node("Add", [g.bn(x, 4, "bn"), g.input("y", 1, 4, 3, 3)], "add"))
    _, run = run_pass(model, PASS, PASS.params, samples(model))
    assert run.status == "refused" and "no RepBN" in run.message


def test_slab_sla_vit_folds_after_its_schedule_ended():
    """The trained SLA fixture's PRepBN schedule ended (λ = 0): its 5 RepBNs fold exactly."""
    _, model = exported("slab-sla-vit")
    new, report, err = run_checked(model, PASS)
    assert dict(report.changed) == {"into-next-matmul": 4, "into-next-gemm": 1}
    assert ops(new, "BatchNormalization") == 0 and err <= 1e-5


def test_unfinished_prepbn_schedule_is_refused():
    """λ > 0 left in one LinearNorm: the graph mixes LN into that RepBN; refused, named."""
    import torch
    from edgekit.graphs.slab_sla_vit import load

    from edgekit.export import export_module
    from edgekit.verify import TensorSpec

    module = load(**{"blocks.1.norm2.iter": torch.tensor(30)})  # 30 of 192 steps left
    model = export_module(module, [TensorSpec("image", (1, 1, 32, 32), "float32")])
    _, run = run_pass(model, PASS, PASS.params, samples(model))
    assert run.status == "refused" and "schedule has not ended" in run.message
    assert "LN weight λ = 0.1562" in run.message and "LayerNormalization" in run.message
    node, _ = run.report.skipped[-1]
    assert node.startswith("node__native_batch_norm") and f"RepBN {node!r}" in run.message
