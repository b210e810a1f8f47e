"""Symbolic dims in the input spec (issue 17): parsing, bounds, binding, the ONNX file's own
dim names, the manifest schema, and the CLI's one-line errors. No compile: fast."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from edgekit import intake, shapes, verify
from edgekit.api import load_calibration
from edgekit.cli import cli
from edgekit.errors import EdgekitError
from edgekit.manifest import manifest_problems
from edgekit.passes.core import load_samples


def _symbolic_onnx(path, dim_param: str = "seq"):
    """y = relu(x + 1), x: 1 x ``dim_param`` x 4, written with a named dynamic dim."""
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["s"]), helper.make_node("Relu", ["s"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, dim_param, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, dim_param, 4])], [one])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_a_name_in_the_spec_is_a_symbolic_dim():
    spec = verify.parse_input_spec("input_ids:1xseq:int64")
    assert spec.shape == (1, "seq") and spec.dtype == "int64"
    assert verify.parse_input_spec("x:1x3x224x224").shape == (1, 3, 224, 224)
    specs = verify.parse_inputs(["a:1xseq", "b:1xseq:int64"], ["seq=1..256"])
    assert specs.dims == {"seq": (1, 256)} and [s.name for s in specs] == ["a", "b"]
    for bad, why in (("x:1xs-q", "positive integer or a name"), ("x:1x0", "positive"),
                     ("x:1x2x", "positive integer or a name")):
        with pytest.raises(EdgekitError, match=why):
            verify.parse_input_spec(bad)


@pytest.mark.parametrize("text,why", [("seq=0..4", "1 <= LO <= HI"), ("seq=9..4", "LO <= HI"),
                                       ("seq=1-4", "NAME=LO..HI"), ("9x=1..4", "NAME=LO..HI")])
def test_bad_dim_options_are_one_line_errors(text, why):
    with pytest.raises(EdgekitError, match=why) as info:
        shapes.parse_dim_option(text)
    assert "\n" not in str(info.value)


def test_bounds_must_cover_exactly_the_names_used():
    specs = [verify.TensorSpec("ids", (1, "seq"), "int64")]
    assert verify.resolve_dims(specs, {}, {"seq": (2, 9)}) == {"seq": (2, 9)}
    # the model's record is the default, --dim overrides it, a stale record is dropped
    assert verify.resolve_dims(specs, {"seq": (1, 4), "old": (1, 2)}, {}) == {"seq": (1, 4)}
    assert verify.resolve_dims(specs, {"seq": (1, 4)}, {"seq": (1, 8)}) == {"seq": (1, 8)}
    with pytest.raises(EdgekitError, match="--dim seq=LO..HI"):
        verify.resolve_dims(specs, {}, {})
    with pytest.raises(EdgekitError, match="no input has a dim named 'len'"):
        verify.resolve_dims(specs, {}, {"seq": (1, 4), "len": (1, 4)})


def test_check_points_cover_both_ends_and_an_odd_middle():
    assert shapes.check_points({"seq": (1, 256)}) == [{"seq": 1}, {"seq": 256}, {"seq": 129}]
    assert shapes.check_points({}) == [{}]
    assert shapes.check_points({"seq": (4, 4)}) == [{"seq": 4}]


def test_bind_names_the_input_the_dim_and_its_bounds():
    declared = {"ids": (1, "seq"), "mask": (1, "seq")}
    bounds = {"seq": (1, 32)}
    assert shapes.bind(declared, {"ids": (1, 7), "mask": (1, 7)}, bounds) == {"seq": 7}
    with pytest.raises(EdgekitError, match=r"'ids': dim 'seq' \(axis 1\) is 33, outside its "
                                           r"bounds 1\.\.32"):
        shapes.bind(declared, {"ids": (1, 33), "mask": (1, 33)}, bounds)
    with pytest.raises(EdgekitError, match="rank 1, the model expects rank 2"):
        shapes.bind(declared, {"ids": (7,), "mask": (1, 7)}, bounds)
    with pytest.raises(EdgekitError, match="share its length"):
        shapes.bind(declared, {"ids": (1, 7), "mask": (1, 8)}, bounds)


def test_seeded_inputs_need_concrete_shapes():
    specs = [verify.TensorSpec("x", (1, "seq", 4), "float32")]
    with pytest.raises(EdgekitError, match="pick lengths first"):
        verify.seeded_inputs(specs)
    pairs = verify.seeded_at(specs, {"seq": (2, 10)})
    assert [p for p, _ in pairs] == [{"seq": 2}, {"seq": 10}, {"seq": 7}]
    assert [a["x"].shape for _, a in pairs] == [(1, 2, 4), (1, 10, 4), (1, 7, 4)]


def test_an_onnx_files_own_dim_names_are_kept_and_need_bounds(tmp_path):
    path = _symbolic_onnx(tmp_path / "m.onnx")
    with pytest.raises(EdgekitError, match="has the symbolic dim 'seq': bound it with --dim"):
        intake.load_onnx(path)
    model = intake.load_onnx(path, verify.InputSpecs([], {"seq": (1, 64)}))
    assert verify.onnx_input_specs(model)[0].shape == (1, "seq", 4)
    assert verify.model_dims(model) == {"seq": (1, 64)}  # recorded: later steps need no --dim
    # --input renames the dim or fixes it; a static dim cannot become a name
    renamed = intake.load_onnx(path, verify.parse_inputs(["x:1xlenx4:float32"], ["len=2..8"]))
    assert verify.onnx_input_specs(renamed)[0].shape == (1, "len", 4)
    fixed = intake.load_onnx(path, [verify.parse_input_spec("x:1x5x4")])
    assert verify.onnx_input_specs(fixed)[0].shape == (1, 5, 4)
    assert verify.model_dims(fixed) == {}
    with pytest.raises(EdgekitError, match="does not fit the model's declared shape 1x\\?x4"):
        intake.load_onnx(path, verify.parse_inputs(["x:1xseqxn"], ["seq=1..4", "n=1..4"]))


def test_memory_is_estimated_at_the_upper_bounds(tmp_path):
    path = _symbolic_onnx(tmp_path / "m.onnx")
    small = intake.estimate_memory(intake.load_onnx(path, verify.InputSpecs([], {"seq": (1, 8)})))
    big = intake.estimate_memory(intake.load_onnx(path, verify.InputSpecs([], {"seq": (1, 800)})))
    assert small.inputs == 1 * 8 * 4 * 4 and big.inputs == 1 * 800 * 4 * 4


def test_pass_samples_cover_every_check_point_and_bind_real_ones(tmp_path):
    model = intake.load_onnx(_symbolic_onnx(tmp_path / "m.onnx"),
                             verify.InputSpecs([], {"seq": (1, 16)}))
    seeded = load_samples(model)
    assert sorted({s["x"].shape[1] for s in seeded}) == [1, 9, 16]
    real = [{"x": np.zeros((1, n, 4), np.float32)} for n in (3, 11)]
    assert [s["x"].shape[1] for s in load_samples(model, calibration=real)[-2:]] == [3, 11]
    with pytest.raises(EdgekitError, match=r"calibration sample 1: .*is 17, outside its bounds "
                                           r"1\.\.16"):
        load_samples(model, calibration=[real[0], {"x": np.zeros((1, 17, 4), np.float32)}])
    # an .npz holds samples of different lengths under NAME/I keys
    np.savez(tmp_path / "c.npz", **{f"x/{i}": s["x"] for i, s in enumerate(real)})
    keyed = load_samples(model, calibration=load_calibration(tmp_path / "c.npz"))
    assert [s["x"].shape[1] for s in keyed[-2:]] == [3, 11]


def _manifest(**extra):
    return {"schema_version": 1, "files": {"model.so": "0" * 64}, "target": {"name": "host"},
            "inputs": [{"name": "ids", "shape": [1, "seq"], "dtype": "int64"}],
            "outputs": [{"name": "y", "shape": [1, "seq", -1], "dtype": "float32"}], **extra}


def test_the_manifest_schema_takes_names_with_their_bounds():
    assert manifest_problems(_manifest(dims={"seq": [1, 256]})) == []
    assert manifest_problems(_manifest(dims={"seq": [1, 256]}, shapes={"mode": "symbolic"})) == []
    assert manifest_problems(_manifest()) == ["inputs use the dim 'seq', which dims does not "
                                              "bound"]
    assert manifest_problems(_manifest(dims={"seq": [0, 4]})) == [
        "dims['seq'] must be [lo, hi]: integers, 1 <= lo <= hi"]
    bad = _manifest(dims={"seq": [1, 4]})
    bad["inputs"][0]["shape"] = [1, "s q"]
    assert any("shape must be a list of integers >= 0 or dim names" in p
               for p in manifest_problems(bad))
    static = _manifest()
    static["inputs"][0]["shape"] = [1, 8]
    assert manifest_problems(static) == []  # old, static manifests: unchanged


@pytest.mark.parametrize("args,why", [
    (["--input", "input_ids:1xseq"], "has the symbolic dim 'seq': bound it with --dim seq="),
    (["--input", "input_ids:1xseq", "--dim", "seq=0..9"], "bounds must satisfy 1 <= LO <= HI"),
    (["--input", "input_ids:1xseq", "--dim", "seq=1..9", "--dim", "n=1..2"],
     "no input has a dim named 'n'"),
    (["--input", "input_ids:1xs/q"], "a dimension is a positive integer or a name"),
])
def test_cli_errors_are_one_line_exit_1(tmp_path, args, why):
    result = CliRunner().invoke(cli, ["export", "tiny-gpt", "-o", str(tmp_path / "m.onnx"),
                                      *args])
    assert result.exit_code == 1, result.output
    assert why in result.output and result.output.count("\n") == 1
    assert "Traceback" not in result.output and not (tmp_path / "m.onnx").exists()


def test_cli_rewrite_takes_dim_for_an_onnx_files_own_names(tmp_path):
    path = _symbolic_onnx(tmp_path / "m.onnx")
    out = tmp_path / "r.onnx"
    result = CliRunner().invoke(cli, ["rewrite", str(path), "--passes", "fold-constants",
                                      "-o", str(out)])
    assert result.exit_code == 1 and "--dim seq=LO..HI" in result.output
    result = CliRunner().invoke(cli, ["rewrite", str(path), "--passes", "fold-constants",
                                      "--dim", "seq=1..64", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert verify.model_dims(onnx.load(out)) == {"seq": (1, 64)}
