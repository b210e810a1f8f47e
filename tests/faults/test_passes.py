"""The rewrite passes under faults, for real (onnxruntime checks, torch exports, the CLI).

Why (issue 18, items 4, 8 and 9): the polynomial passes fitted on seeded noise passed every
check yet gave non-finite embeddings on real sentences; a standard transformers export kept
its softmax NaN guards, which he-check lists as offenders; `rewrite` exited 0 when a pass the
user asked for was refused; fold-bn left the onnx zoo's ConstantOfShape-built BatchNorms
without naming the fix; token-prune's default schedule was not the measured one; and
onnxruntime 1.32's MatMulAddFusion refused to load a valid pruned BERT, so token-prune at
layer 1 was always rolled back.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from _exports import tiny_bert_export
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from edgekit import api
from edgekit.cli import cli
from edgekit.he.check import check
from edgekit.passes import available
from edgekit.passes.core import load_samples, run_pass

LIGHT_ZOO = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def ln_gelu(width: int = 8) -> onnx.ModelProto:
    """x -> LayerNormalization -> Gelu -> y."""
    rng = np.random.default_rng(0)
    gamma = numpy_helper.from_array((1 + 0.1 * rng.standard_normal(width)).astype(np.float32),
                                    "gamma")
    beta = numpy_helper.from_array(np.zeros(width, np.float32), "beta")
    graph = helper.make_graph(
        [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], name="ln"),
         helper.make_node("Gelu", ["h"], ["y"], name="gelu")], "ln_gelu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, width])], [gamma, beta])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def test_fitted_passes_refuse_seeded_noise_unless_asked(tmp_path):
    model = ln_gelu()
    result = api.rewrite(model, "poly-layernorm,poly-gelu")
    assert [r.status for r in result.ledger] == ["refused", "refused"]
    assert all("--calibration" in r.message for r in result.ledger)
    assert result.ledger_dicts()[0]["calibration"] == "none"

    calib = {"x": np.random.default_rng(3).standard_normal((6, 1, 4, 8)).astype(np.float32)}
    real = api.rewrite(model, "poly-gelu", calibration=calib).ledger[0]
    seeded = api.rewrite(model, "poly-gelu", calibration="seeded").ledger[0]
    assert (real.status, real.calibration) == ("applied", "samples")
    assert (seeded.status, seeded.calibration) == ("applied", "seeded")

    def widening(run) -> float:  # fitted interval width / calibrated width; ledger has both
        entry = run.report.details["replaced"]["gelu"]
        (lo, hi), (clo, chi) = entry["interval"], entry["calibrated"]
        return (hi - lo) / (chi - clo)

    assert widening(real) == pytest.approx(1.2, abs=1e-3)
    assert widening(seeded) == pytest.approx(1.6, abs=1e-3)

    onnx.save(model, tmp_path / "m.onnx")
    runner = CliRunner()
    base = ["rewrite", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "out.onnx")]
    strict = runner.invoke(cli, [*base, "--passes", "poly-gelu", "--strict"])
    assert strict.exit_code == 1 and "Traceback" not in strict.output
    [line] = strict.output.strip().splitlines()[-1:]
    assert line.startswith("error: strict: poly-gelu was refused") and "--calibration" in line
    assert not (tmp_path / "out.onnx").exists()
    plain = runner.invoke(cli, [*base, "--passes", "poly-gelu"])  # the failure: exit 0
    assert plain.exit_code == 0 and "poly-gelu: refused" in plain.output
    (tmp_path / "out.onnx").unlink()
    opt_in = runner.invoke(cli, [*base, "--passes", "poly-gelu", "--seeded-calibration",
                                 "--strict"])
    assert opt_in.exit_code == 0, opt_in.output
    assert "fitted on seeded inputs (widened ranges)" in opt_in.output
    assert (tmp_path / "out.onnx").exists()
    both = runner.invoke(cli, [*base, "--passes", "poly-gelu", "--seeded-calibration",
                               "--calibration", str(tmp_path / "c.npz")])
    assert both.exit_code == 1 and both.output.startswith("error: ")


def power_softmax(p: int) -> onnx.ModelProto:
    """softmax(p·log|x|): Power-Softmax in its trained (stable, log) form."""
    graph = helper.make_graph(
        [helper.make_node("Abs", ["x"], ["a"]), helper.make_node("Log", ["a"], ["l"]),
         helper.make_node("Mul", ["l", "p"], ["s"]),
         helper.make_node("Softmax", ["s"], ["y"], name="psoftmax", axis=-1)], "power",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
        [numpy_helper.from_array(np.array(float(p), np.float32), "p")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def test_non_finite_output_is_a_failed_check_with_the_reason(tmp_path):
    """x^20 overflows float32 for |x| ≈ 100 where softmax(20·log|x|) is finite."""
    rng = np.random.default_rng(1)
    calib = {"x": (rng.uniform(50, 150, (4, 2, 8)) * rng.choice([-1, 1], (4, 2, 8))
                   ).astype(np.float32)}
    run = api.rewrite(power_softmax(20), "power-softmax", calibration=calib).ledger[0]
    assert run.status == "rolled-back"
    assert "non-finite value(s) where the original is finite" in run.message
    np.savez(tmp_path / "c.npz", **calib)
    onnx.save(power_softmax(20), tmp_path / "m.onnx")
    out = CliRunner().invoke(cli, ["rewrite", str(tmp_path / "m.onnx"), "-o",
                                   str(tmp_path / "o.onnx"), "--passes", "power-softmax",
                                   "--calibration", str(tmp_path / "c.npz"), "--strict"])
    assert out.exit_code == 1 and "power-softmax was rolled-back" in out.output
    assert "non-finite" in out.output and not (tmp_path / "o.onnx").exists()


def test_standard_transformers_export_loses_its_softmax_nan_guards():
    """PyTorch's SDPA (transformers' default attention), exported with the dynamo exporter,
    writes Where(IsNaN(p), 0, p) after each softmax; after poly-softmax they are gone."""
    import torch
    import transformers as tf

    from edgekit.export import _quiet

    cfg = tf.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    bert = tf.BertModel(cfg, add_pooling_layer=False).eval()

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, inputs_embeds):
            return self.bert(inputs_embeds=inputs_embeds).last_hidden_state.mean(1)

    with _quiet(), torch.no_grad():
        model = torch.onnx.export(Pooled().eval(), (torch.zeros(1, 8, 32),), dynamo=True,
                                  input_names=["inputs_embeds"], external_data=False,
                                  verbose=False).model_proto
    guards = {o.op for o in check(model).offenders} & {"IsNaN", "Where"}
    assert guards == {"IsNaN", "Where"}  # the failure: offenders of every standard export
    calib = {"inputs_embeds": np.random.default_rng(2).standard_normal((4, 1, 8, 32))
             .astype(np.float32)}
    result = api.rewrite(model, "poly-softmax", calibration=calib)
    run = result.ledger[0]
    assert run.status == "applied", run.message
    assert run.report.changed == {"poly-softmax": 2, "nan-guard": 2}
    ops = {n.op_type for n in result.model.graph.node}
    assert not ops & {"IsNaN", "Where", "Softmax"}
    assert not {o.op for o in check(result.model).offenders} & {"IsNaN", "Where", "Softmax"}


def test_fold_bn_on_the_zoo_resnet50_names_fold_constants():
    """The light zoo builds every parameter with ConstantOfShape: fold-bn is refused and says
    which command folds them (not 46 bare "not a constant" skips)."""
    run = api.rewrite(LIGHT_ZOO / "light_resnet50.onnx", "fold-bn").ledger[0]
    assert run.status == "refused"
    assert run.message.startswith("53 of 53 BatchNormalization nodes are blocked")
    assert "--passes fold-constants,fold-bn" in run.message
    assert any("(ConstantOfShape)" in reason for _, reason in run.report.skipped)


def test_fold_constants_then_fold_bn_folds_constant_of_shape_parameters():
    """The named fix works: Conv + BatchNorm whose parameters come from ConstantOfShape."""
    def filled(name: str, value: float) -> onnx.NodeProto:
        return helper.make_node(
            "ConstantOfShape", [f"{name}_shape"], [name],
            value=numpy_helper.from_array(np.array([value], np.float32)))

    names = {"w": ([4, 3, 3, 3], 0.1), "gamma": ([4], 1.5), "beta": ([4], 0.2),
             "mean": ([4], 0.1), "var": ([4], 2.0)}
    shapes = [numpy_helper.from_array(np.array(s, np.int64), f"{n}_shape")
              for n, (s, _) in names.items()]
    nodes = [filled(n, v) for n, (_, v) in names.items()] + [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"],
                         name="bn")]
    model = helper.make_model(helper.make_graph(
        nodes, "cbn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], shapes),
        opset_imports=[helper.make_opsetid("", 17)])
    alone = api.rewrite(model, "fold-bn").ledger[0]
    assert alone.status == "refused" and "fold-constants,fold-bn" in alone.message
    result = api.rewrite(model, "fold-constants,fold-bn", strict=True)
    assert [r.status for r in result.ledger] == ["applied", "applied"]
    assert result.ledger[1].report.changed == {"into-conv": 1}
    assert "BatchNormalization" not in result.ops_after


@pytest.fixture(scope="module")
def bert2() -> onnx.ModelProto:
    return tiny_bert_export(layers=2)


def test_token_prune_after_layer_1_loads_despite_ort_matmuladd_fusion(bert2):
    """onnxruntime 1.32 refuses this valid graph ("Attempt to replace the existing tensor",
    MatMulAddFusion); edgekit loads it without that fusion and warns."""
    p = available()["token-prune"]
    samples = load_samples(bert2)
    with pytest.warns(RuntimeWarning, match="loaded it without MatMulAddFusion"):
        new, run = run_pass(bert2, p, p.parse_params({"keep": "0.4", "layers": "1"}), samples)
    assert run.status == "applied", run.message
    assert run.report.details["layers"][0]["kept"] == 6


def test_token_prune_default_is_one_site_a_third_of_the_way_in(bert2):
    p = available()["token-prune"]
    _, run = run_pass(bert2, p, p.parse_params({"keep": "0.7"}), load_samples(bert2))
    assert run.status == "applied", run.message
    assert [x["layer"] for x in run.report.details["layers"]] == [0]  # 2 layers: 2 // 3
