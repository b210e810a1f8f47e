"""The polynomial (HE-friendly) passes on a small attention block built from ONNX nodes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgekit import api
from edgekit.he.check import check
from edgekit.passes import available
from edgekit.passes.poly_softmax import design
from edgekit.verify import run_ort

SEQ, WIDTH = 8, 16


def block(scale: float = 1.0) -> onnx.ModelProto:
    """LN -> single-head attention (logits × scale) -> GELU -> Linear -> Tanh -> Sigmoid."""
    rng = np.random.default_rng(0)
    w = {n: (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
         for n in ("Wq", "Wk", "Wv", "Wo")}
    w["gamma"] = (1 + 0.1 * rng.standard_normal(WIDTH)).astype(np.float32)
    w["beta"] = (0.1 * rng.standard_normal(WIDTH)).astype(np.float32)
    w["scale"] = np.array(scale / np.sqrt(WIDTH), np.float32)
    n = helper.make_node
    nodes = [
        n("LayerNormalization", ["x", "gamma", "beta"], ["h"], name="ln", axis=-1),
        n("MatMul", ["h", "Wq"], ["q"], name="q"), n("MatMul", ["h", "Wk"], ["k"], name="k"),
        n("MatMul", ["h", "Wv"], ["v"], name="v"),
        n("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]),
        n("MatMul", ["q", "kt"], ["s0"], name="qk"), n("Mul", ["s0", "scale"], ["s"], name="sc"),
        n("Softmax", ["s"], ["a"], name="softmax", axis=-1),
        n("MatMul", ["a", "v"], ["av"], name="av"), n("Gelu", ["av"], ["g"], name="gelu"),
        n("MatMul", ["g", "Wo"], ["o"], name="o"), n("Tanh", ["o"], ["t"], name="tanh"),
        n("Sigmoid", ["t"], ["y"], name="sigmoid"),
    ]
    graph = helper.make_graph(
        nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, SEQ, WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, SEQ, WIDTH])],
        [numpy_helper.from_array(v, k) for k, v in w.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def calibration(n: int = 6, seed: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, 1, SEQ, WIDTH)).astype(np.float32)}


ALL_POLY = "poly-layernorm,poly-gelu,poly-act,poly-softmax"


@pytest.fixture(scope="module")
def rewritten():
    model = block(scale=4.0)
    return model, api.rewrite(model, ALL_POLY, calibration=calibration())


def test_all_poly_passes_apply_within_budget_and_leave_an_he_friendly_graph(rewritten):
    model, result = rewritten
    assert [r.status for r in result.ledger] == ["applied"] * 4, [
        r.message for r in result.ledger]
    for r in result.ledger:
        assert not r.exact and r.max_rel <= r.budget
    before, after = check(model), check(result.model)
    assert {o.op for o in before.offenders} == {"LayerNormalization", "Softmax", "Gelu",
                                                "Tanh", "Sigmoid"}
    assert after.he_friendly and after.depth > before.depth
    # fresh data from the calibration distribution, not the samples it was fitted on
    x = calibration(1, seed=99)["x"][0]
    ref, out = run_ort(model, {"x": x})[0], run_ort(result.model, {"x": x})[0]
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 0.02


def test_reports_record_range_degree_iterations_and_depth(rewritten):
    _, result = rewritten
    runs = {r.name: r.report.details["replaced"] for r in result.ledger}
    ln = runs["poly-layernorm"]["ln"]
    assert ln["iterations"] >= 1 and ln["depth"] == 1 + 3 * ln["iterations"]
    assert 0 < ln["calibrated"][0] <= ln["calibrated"][1]
    for name, op in (("gelu", "poly-gelu"), ("tanh", "poly-act"), ("sigmoid", "poly-act")):
        entry = runs[op][name]
        assert entry["degree"] >= 3 and entry["depth"] >= 3
        lo, hi = entry["interval"]
        assert lo < entry["calibrated"][0] <= entry["calibrated"][1] < hi
    sm = runs["poly-softmax"]["softmax"]
    assert sm["exp"]["degree"] >= 4 and sm["final_reciprocal"]["iterations"] >= 1
    assert sm["depth"] > 0 and sm["calibration_max_abs_error"] <= 2e-3
    ledger = result.ledger_dicts()
    assert ledger[-1]["details"]["replaced"]["softmax"]["squaring_steps"] == sm["squaring_steps"]


def test_softmax_design_keeps_wide_peaked_logits_accurate():
    """Rows spanning ±40 (MiniLM-like), some flat, some one-hot: denominators over many
    orders of magnitude; the renormalised squaring design still reaches the tolerance."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        r = rng.standard_normal((4, 24)) * (1 + 6 * i)
        r[:, 0] += 5 * i
        rows.append(r)
    found, err = design(rows, 2e-3)
    assert found is not None and err <= 2e-3 and found.k >= 2
    _, err0 = design(rows, 2e-3, steps=0, degree=8, iters=2)  # one fixed-range reciprocal
    assert err0 > 2e-3


def test_pass_parameters_fix_steps_and_degree():
    result = api.rewrite(block(), "poly-softmax:steps=1:degree=10", calibration=calibration())
    entry = result.ledger[0].report.details["replaced"]["softmax"]
    assert entry["squaring_steps"] == 1 and entry["exp"]["degree"] == 10
    assert result.ledger[0].params == {"degree": 10, "steps": 1, "iters": -1, "tol": 2e-3}


def test_additively_masked_softmax_is_skipped_with_the_reason():
    model = block()
    mask = np.zeros((1, SEQ, SEQ), np.float32)
    mask[..., SEQ // 2:] = -1e9
    model.graph.initializer.append(numpy_helper.from_array(mask, "mask"))
    for node in model.graph.node:
        if node.name == "softmax":
            node.input[0] = "masked"
    model.graph.node.insert(7, helper.make_node("Add", ["s", "mask"], ["masked"], name="mask"))
    run = api.rewrite(model, "poly-softmax", calibration=calibration()).ledger[0]
    assert run.status == "unchanged"
    assert run.report.skipped[0][0] == "softmax" and "mask" in run.report.skipped[0][1]


def power_softmax_model(p: int) -> onnx.ModelProto:
    n = helper.make_node
    graph = helper.make_graph(
        [n("Abs", ["x"], ["ax"], name="abs"), n("Log", ["ax"], ["lx"], name="log"),
         n("Mul", ["lx", "p"], ["plx"], name="mul"),
         n("Softmax", ["plx"], ["y"], name="psoftmax", axis=-1)],
        "power", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
        [numpy_helper.from_array(np.array(p, np.float32), "p")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_power_softmax_becomes_powers_and_a_newton_reciprocal():
    calib = {"x": (np.random.default_rng(1).uniform(0.5, 2, (8, 2, 8))
                   * np.random.default_rng(2).choice([-1, 1], (8, 2, 8))).astype(np.float32)}
    result = api.rewrite(power_softmax_model(4), "power-softmax", calibration=calib)
    run = result.ledger[0]
    assert run.status == "applied" and run.max_rel <= 1e-3, run.message
    entry = run.report.details["replaced"]["psoftmax"]
    assert entry["power"] == 4 and entry["reciprocal"]["iterations"] >= 1
    assert check(result.model).he_friendly
    odd = api.rewrite(power_softmax_model(3), "power-softmax", calibration=calib).ledger[0]
    assert odd.status == "unchanged" and "even" in odd.report.skipped[0][1]


def test_poly_passes_are_listed_as_approximate():
    passes = available()
    for name in ("poly-softmax", "power-softmax", "poly-gelu", "poly-act", "poly-layernorm"):
        assert not passes[name].exact and 0 < passes[name].budget < 1


def test_poly_softmax_on_an_old_opset_uses_axes_attributes():
    """Opset < 18 takes ReduceMean axes as an attribute; the rewrite must stay valid there."""
    import onnx
    from onnx import TensorProto, helper

    from edgekit.passes import available
    from edgekit.passes.core import load_samples, run_pass

    graph = helper.make_graph(
        [helper.make_node("Softmax", ["x"], ["y"], name="softmax", axis=-1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 8, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    p = available()["poly-softmax"]
    new, run = run_pass(model, p, dict(p.params), load_samples(model))
    assert run.status == "applied", run.message
    reduces = [n for n in new.graph.node if n.op_type == "ReduceMean"]
    assert reduces and all(len(n.input) == 1 for n in reduces)
    onnx.checker.check_model(new, full_check=True)
