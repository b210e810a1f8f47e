"""power-softmax on the small causal LM (graphs/power_causal_lm.py): log, additive-mask,
Where-mask and direct forms; masked probabilities exactly zero."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest
from edgekit.graphs.power_causal_lm import CAUSAL, SEQ, make, token_ids
from onnx import TensorProto, helper, numpy_helper

from edgekit import api
from edgekit.export import export_module
from edgekit.he.check import check
from edgekit.verify import TensorSpec, run_ort


@functools.cache
def causal_lm(form: str, p: int = 4) -> onnx.ModelProto:
    return export_module(make(form, p), [TensorSpec("ids", (1, SEQ), "int64")])


def ids(n: int, seed: int) -> dict[str, np.ndarray]:
    return {"ids": token_ids(n, seed)}


FORMS = {"log": "log", "additive": "log+additive", "where": "log+where",
         "direct-mul": "direct+multiply", "direct-where": "direct+where"}


@pytest.mark.parametrize("form", FORMS)
def test_causal_lm_forms(form):
    model = causal_lm(form)
    run = api.rewrite(model, "power-softmax", calibration=ids(16, 1)).ledger[0]
    assert run.status == "applied" and run.max_rel <= run.budget, run.message
    entry, = run.report.details["replaced"].values()
    assert entry["form"] == FORMS[form] and entry["power"] == 4
    assert entry["reciprocal"]["iterations"] >= 1 and entry["prescale"] == 1.0


@pytest.mark.parametrize("form", ["additive", "where", "direct-mul", "direct-where"])
def test_masked_probabilities_stay_exactly_zero(form):
    model = causal_lm(form)
    new = api.rewrite(model, "power-softmax", calibration=ids(16, 1)).model
    assert not any(n.op_type in ("Softmax", "Where", "Log") for n in new.graph.node)
    feed = {"ids": ids(1, 7)["ids"][0]}
    ref, got = run_ort(model, feed)[1], run_ort(new, feed)[1]
    assert np.all(ref[..., ~CAUSAL] == 0) and np.all(got[..., ~CAUSAL] == 0)
    kept = got[..., CAUSAL]
    assert np.all(kept != 0) and np.abs(kept - ref[..., CAUSAL]).max() <= 1e-3


def test_prescaling_bounds_the_newton_range():
    """c = max|x|: every x^p term ≤ 1, so the range of mean(u) ends near 1 (not max|x|^p);
    the iteration count is unchanged (it depends on hi/lo only)."""
    model = causal_lm("additive")
    plain, scaled = (api.rewrite(model, f"power-softmax:prescale={on}",
                                 calibration=ids(16, 1)).ledger[0] for on in (False, True))
    assert plain.status == scaled.status == "applied", (plain.message, scaled.message)
    (a,), (b,) = (r.report.details["replaced"].values() for r in (plain, scaled))
    assert b["prescale"] > 1 and b["reciprocal"]["calibrated"][1] <= 1.0
    assert a["reciprocal"]["calibrated"][1] == pytest.approx(
        b["reciprocal"]["calibrated"][1] * b["prescale"] ** 4, rel=1e-3)
    assert a["reciprocal"]["iterations"] == b["reciprocal"]["iterations"]
    assert scaled.max_rel <= scaled.budget


def test_runtime_mask_is_weighted_on_the_client_side():
    """An additive mask given as an input becomes Exp(mask): plaintext work, exact zeros."""
    n = helper.make_node
    graph = helper.make_graph(
        [n("Abs", ["x"], ["ax"]), n("Log", ["ax"], ["lx"]), n("Mul", ["lx", "p"], ["plx"]),
         n("Add", ["plx", "mask"], ["z"]), n("Softmax", ["z"], ["y"], name="ps", axis=-1)],
        "masked", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8]),
                   helper.make_tensor_value_info("mask", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
        [numpy_helper.from_array(np.array(2.0, np.float32), "p")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    rng = np.random.default_rng(0)
    mask = np.where(rng.random((6, 2, 8)) < 0.3, -np.inf, 0).astype(np.float32)
    mask[..., 0] = 0  # no row fully masked
    calib = {"x": rng.uniform(0.5, 2, (6, 2, 8)).astype(np.float32), "mask": mask}
    result = api.rewrite(model, "power-softmax", calibration=calib)
    assert result.ledger[0].status == "applied", result.ledger[0].message
    got = run_ort(result.model, {"x": calib["x"][0], "mask": mask[0]})[0]
    assert np.all(got[mask[0] == -np.inf] == 0)
    assert "Exp" in {n.op_type for n in result.model.graph.node}


def test_refusals_name_the_reason():
    """A Where whose fill is not a mask, an odd power, and an all-masked calibration row."""
    n = helper.make_node
    graph = helper.make_graph(
        [n("Abs", ["x"], ["ax"]), n("Log", ["ax"], ["lx"]), n("Mul", ["lx", "p"], ["plx"]),
         n("Where", ["keep", "plx", "fill"], ["z"]), n("Softmax", ["z"], ["y"], name="ps"),
         n("Pow", ["x", "three"], ["u"]), n("ReduceSum", ["u", "axes"], ["s"], keepdims=1),
         n("Div", ["u", "s"], ["y3"], name="odd")],
        "refused", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info(v, TensorProto.FLOAT, [2, 8]) for v in ("y", "y3")],
        [numpy_helper.from_array(np.array(2.0, np.float32), "p"),
         numpy_helper.from_array(CAUSAL[:2], "keep"),
         numpy_helper.from_array(np.array(-5.0, np.float32), "fill"),
         numpy_helper.from_array(np.array(3.0, np.float32), "three"),
         numpy_helper.from_array(np.array([-1], np.int64), "axes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    calib = {"x": np.random.default_rng(0).uniform(0.5, 2, (4, 2, 8)).astype(np.float32)}
    run = api.rewrite(model, "power-softmax", calibration=calib).ledger[0]
    assert run.status == "unchanged"
    assert dict(run.report.skipped) == {
        "ps": "its Where fill is not a mask (a constant <= -10000)",
        "odd": "its power p = 3 is not an even positive integer"}


def test_all_masked_calibration_row_is_skipped():
    n = helper.make_node
    graph = helper.make_graph(
        [n("Pow", ["x", "two"], ["u0"]), n("Mul", ["u0", "w"], ["u"]),
         n("ReduceSum", ["u", "axes"], ["s"], keepdims=1), n("Div", ["u", "s"], ["y"],
                                                            name="ps")],
        "empty", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8]),
                  helper.make_tensor_value_info("w", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
        [numpy_helper.from_array(np.array(2.0, np.float32), "two"),
         numpy_helper.from_array(np.array([-1], np.int64), "axes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    w = np.ones((3, 2, 8), np.float32)
    w[1, 0] = 0
    calib = {"x": np.ones((3, 2, 8), np.float32), "w": w}
    run = api.rewrite(model, "power-softmax", calibration=calib).ledger[0]
    assert run.status == "unchanged" and "all masked" in run.report.skipped[0][1]


def test_he_friendly_after_the_rewrite():
    model = causal_lm("additive")
    new = api.rewrite(model, "power-softmax", calibration=ids(16, 1)).model
    before = {o.op for o in check(model).offenders}
    after = {o.op for o in check(new).offenders}
    assert {"Softmax", "Log"} <= before and not after & {"Softmax", "Log", "Abs", "Where"}
