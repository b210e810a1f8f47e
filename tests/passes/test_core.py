"""The rewrite layer itself: parameter parsing, the check, rollback, refusals and the ledger."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from edgekit import api, runtime
from edgekit.cli import cli
from edgekit.errors import EdgekitError
from edgekit.passes import available
from edgekit.passes.core import Pass, PassRefused, PassReport, parse_pass_list, run_pass


def _matmul_model() -> onnx.ModelProto:
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3], np.arange(12, dtype=np.float32))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _scale_weight(model: ir.Model, ctx, *, factor: float = 1.0) -> PassReport:
    report = PassReport()
    w = model.graph.initializers["w"]
    w.const_value = ir.tensor(w.const_value.numpy() * np.float32(factor))
    report.change("scale-weight")
    return report


def _refuse(model: ir.Model, ctx) -> PassReport:
    raise PassRefused("nothing to do here", "mm")


SCALE = Pass("scale", "multiply the weight", exact=True, apply=_scale_weight)
APPROX = Pass("approx-scale", "multiply the weight", exact=False, apply=_scale_weight,
              budget=0.05)


def samples(model):
    from edgekit.passes.core import load_samples

    return load_samples(model)


def test_exact_pass_within_tolerance_is_kept():
    model = _matmul_model()
    new, run = run_pass(model, SCALE, {"factor": 1.0}, samples(model))
    assert run.status == "applied" and run.max_rel == 0.0 and new is not model


def test_exact_pass_that_changes_outputs_is_rolled_back():
    model = _matmul_model()
    new, run = run_pass(model, SCALE, {"factor": 1.001}, samples(model))
    assert new is model and run.status == "rolled-back"
    assert "exceeds the budget 1e-05" in run.message and run.max_rel == pytest.approx(1e-3, 0.01)


def test_approximate_pass_is_held_to_its_budget():
    model = _matmul_model()
    _, run = run_pass(model, APPROX, {"factor": 1.01}, samples(model))
    assert run.status == "applied" and run.budget == 0.05
    _, run = run_pass(model, APPROX, {"factor": 1.2}, samples(model))
    assert run.status == "rolled-back"


def test_refusal_is_reported_with_node():
    model = _matmul_model()
    p = Pass("refuser", "always refuses", exact=True, apply=_refuse)
    new, run = run_pass(model, p, {}, samples(model))
    assert new is model and run.status == "refused"
    assert run.to_dict()["skipped"] == [{"node": "mm", "reason": "nothing to do here"}]


def test_parse_pass_list_and_errors():
    passes = {"scale": SCALE}
    [(p, params)] = parse_pass_list("scale:factor=2.5", passes)
    assert p is SCALE and params == {"factor": 2.5}
    with pytest.raises(EdgekitError, match="unknown pass 'nope'"):
        parse_pass_list("nope", passes)
    with pytest.raises(EdgekitError, match="has no parameter 'degree'"):
        parse_pass_list("scale:degree=3", passes)
    with pytest.raises(EdgekitError, match="is not a float"):
        parse_pass_list("scale:factor=big", passes)
    with pytest.raises(EdgekitError, match="expected key=value"):
        parse_pass_list("scale:factor", passes)


def test_parameters_and_defaults_come_from_the_signature():
    assert SCALE.params == {"factor": 1.0} and SCALE.param_types() == {"factor": float}
    assert available()["token-prune"].parse_params({"eir": "0", "cls": "2"}) | {
        "keep": 0.7} == available()["token-prune"].params | {"eir": False, "cls": 2}
    with pytest.raises(EdgekitError, match=r"parameter cls='1\.5' is not a int"):
        available()["token-prune"].parse_params({"cls": "1.5"})

    def positional(model, ctx, factor: float = 1.0) -> PassReport: ...

    def untyped(model, ctx, *, factor=1.0) -> PassReport: ...

    def mistyped(model, ctx, *, factor: float = 1) -> PassReport: ...

    def no_default(model, ctx, *, factor: float) -> PassReport: ...

    for apply in (positional, untyped, mistyped, no_default):
        with pytest.raises(TypeError, match="'factor' must be keyword-only, typed"):
            Pass("bad", "a malformed signature", exact=True, apply=apply)


def test_every_registered_pass_is_described():
    for name, p in available().items():
        assert name == p.name and p.summary and (p.exact or p.budget > 0)


def test_cli_passes_and_rewrite_explain_json(tmp_path):
    api.export("repvgg-cnn", tmp_path / "r.onnx")
    runner = CliRunner()
    listing = runner.invoke(cli, ["passes"]).output
    assert "fold-bn" in listing and "exact" in listing
    out = tmp_path / "m.onnx"
    r = runner.invoke(cli, ["rewrite", str(tmp_path / "r.onnx"), "-o", str(out), "--passes",
                            "merge-repvgg,ln-to-rmsnorm", "--explain"])
    assert r.exit_code == 0, r.output
    assert "merge-repvgg: applied" in r.output and "ln-to-rmsnorm: refused" in r.output
    r = runner.invoke(cli, ["rewrite", str(tmp_path / "r.onnx"), "-o", str(out), "--passes",
                            "merge-repvgg", "--json"])
    data = json.loads(r.output)
    (entry,) = data["ledger"]
    assert entry["status"] == "applied" and entry["max_rel_error"] <= 1e-5
    assert entry["ops_after"]["Conv"] < entry["ops_before"]["Conv"]


def test_compiled_artifact_carries_the_ledger(tmp_path):
    api.export("repvgg-cnn", tmp_path / "r.onnx")
    result = api.compile(tmp_path / "r.onnx", "host", tmp_path / "r.edgekit",
                         passes="merge-repvgg")
    (entry,) = result.manifest["passes"]
    assert entry["pass"] == "merge-repvgg" and entry["status"] == "applied"
    # the artifact's ONNX is the rewritten one and the library matches it
    compiled = onnx.load(tmp_path / "r.edgekit" / "model.onnx")
    assert sum(n.op_type == "Conv" for n in compiled.graph.node) == entry["ops_after"]["Conv"]
    assert runtime.load(tmp_path / "r.edgekit").run(
        np.zeros((1, 3, 32, 32), np.float32))


def test_ir3_initializers_listed_as_inputs_are_constants():
    """IR < 4 models list every initializer as a graph input; passes must still fold them."""
    rng = np.random.default_rng(0)
    inits = [helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 1, 1], rng.standard_normal(12))]
    for name, values in (("g", rng.random(4) + 0.5), ("b", rng.standard_normal(4)),
                         ("m", rng.standard_normal(4)), ("v", rng.random(4) + 0.5)):
        inits.append(helper.make_tensor(name, TensorProto.FLOAT, [4], values))
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
         helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], name="bn")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])]
        + [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims)) for t in inits],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=3)
    new, run = run_pass(model, available()["fold-bn"], {"decompose": True}, samples(model))
    assert run.status == "applied" and run.max_rel <= 1e-5
    assert [n.op_type for n in new.graph.node] == ["Conv"]
