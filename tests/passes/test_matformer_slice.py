"""matformer-slice: a nested FFN's first k units are exactly the trained MatFormer sub-model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _bn_graphs import Graph, apply_directly, exported, samples
from edgekit.graphs.digits_matformer import load
from onnx.reference import ReferenceEvaluator

from edgekit.export import export_module
from edgekit.passes.core import run_pass
from edgekit.passes.matformer_slice import PASS
from edgekit.verify import TensorSpec, run_ort


def _images(n: int = 4) -> np.ndarray:
    return np.random.default_rng(3).random((n, 1, 1, 32, 32), dtype=np.float32)


@pytest.mark.parametrize("spec, units", [("0.125", 48), ("0.25", 96), ("0.5", 192),
                                         ("96", 96), ("0.25/1", (96, 384))])
def test_slices_equal_the_torch_sub_models(spec, units):
    _, model = exported("digits-matformer")
    new, run = run_pass(model, PASS, {**PASS.params, "ffn": spec}, samples(model))
    assert run.status == "applied", run.message
    kept = [f["kept"] for f in run.report.details["ffns"].values()]
    assert kept == list(units if isinstance(units, tuple) else (units, units))
    assert run.report.changed["slice-ffn"] == sum(k < 384 for k in kept)
    assert run.flops_after < run.flops_before
    sub = load(units)
    for x in _images():
        ref = sub(torch.from_numpy(x)).detach().numpy()
        got = run_ort(new, {"image": x})[0]
        assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def test_fp64_slice_is_exact():
    """Against the torch sub-model exported the same way (the export's own fp64 rounding,
    ~1e-9 against eager torch, is then common to both)."""
    specs = [TensorSpec("image", (1, 1, 32, 32), "float64")]
    new, report = apply_directly(export_module(load().double(), specs), PASS, ffn="0.25")
    sub = export_module(load(96).double(), specs)
    assert report.changed["slice-ffn"] == 2
    for x in _images(2).astype(np.float64):
        ref = ReferenceEvaluator(sub).run(None, {"image": x})[0]
        got = ReferenceEvaluator(new).run(None, {"image": x})[0]
        assert np.abs(got - ref).max() <= 1e-10 * np.abs(ref).max()


@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-6), (np.float64, 1e-12)])
def test_decomposed_gelu_with_bias(dtype, tol):
    """x·W1 + b1 -> x·0.5·(1 + tanh(x/√2)) -> ·W2 + b2 (a GELU-like activation written out
    in element-wise nodes), sliced to 3 of 8 units."""
    g = Graph(dtype)
    h = g.node("Add", [g.node("MatMul", [g.input("x", 2, 5, 4), g.rand("w1", 4, 8)], "fc1"),
                       g.rand("b1", 8)], "fc1_bias")
    erf = g.node("Tanh", [g.node("Div", [h, g.const("sqrt2", np.sqrt(2))], "scaled")], "tanh")
    gelu = g.node("Mul", [g.node("Mul", [h, g.const("half", 0.5)], "half_x"),
                          g.node("Add", [erf, g.const("one", 1.0)], "one_plus")], "gelu")
    model = g.model(g.node("Add", [g.node("MatMul", [gelu, g.rand("w2", 8, 4)], "fc2"),
                                   g.rand("b2", 4)], "y"))
    new, report = apply_directly(model, PASS, ffn="3")
    assert report.details["ffns"] == {"fc1": {"fc2": "fc2", "hidden": 8, "kept": 3}}
    init = {i.name: i for i in model.graph.initializer}
    from onnx import numpy_helper
    w1, b1, w2, b2 = (numpy_helper.to_array(init[k]) for k in ("w1", "b1", "w2", "b2"))
    x = np.random.default_rng(1).standard_normal((2, 5, 4)).astype(dtype)
    hk = x @ w1[:, :3] + b1[:3]
    ref = (hk * 0.5 * (1 + np.tanh(hk / np.sqrt(2)))) @ w2[:3] + b2
    got = ReferenceEvaluator(new).run(None, {"x": x})[0]
    assert np.abs(got - ref).max() <= tol * np.abs(ref).max()


def test_refusals():
    _, model = exported("digits-matformer")
    for spec, why in (("0.5/0.5/0.5", "gives 3 widths for 2 FFNs"),
                      ("500", "not a fraction in (0, 1] or a unit count in 2..384"),
                      ("half", "is not a number")):
        _, run = run_pass(model, PASS, {**PASS.params, "ffn": spec}, samples(model))
        assert run.status == "refused" and why in run.message
    g = Graph()
    h = g.node("MatMul", [g.input("x", 2, 4), g.rand("w1", 4, 8)], "fc1")
    model = g.model(g.node("MatMul", [h, g.rand("w2", 8, 4)], "fc2"))  # no activation
    _, run = run_pass(model, PASS, PASS.params, samples(model))
    assert run.status == "refused" and "no FFN" in run.message


def test_hidden_value_read_elsewhere_is_skipped():
    g = Graph()
    h = g.node("Relu", [g.node("MatMul", [g.input("x", 2, 4), g.rand("w1", 4, 8)], "fc1")],
               "act")
    model = g.model(g.node("MatMul", [h, g.rand("w2", 8, 4)], "fc2"), h)
    _, run = run_pass(model, PASS, PASS.params, samples(model))
    assert run.status == "refused"
    assert run.report.skipped[0] == ("fc1", "hidden value 'act' is a graph output")
