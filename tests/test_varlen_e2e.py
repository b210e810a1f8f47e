"""One symbolic artifact end to end (issue 17): a tiny BERT with a symbolic length compiled
once for seq 1..32, run at several lengths against onnxruntime, the out-of-bounds error, and
`edgekit run` / `edgekit profile --lengths` through the CLI. Needs both halves: the front
(spec, runtime, CLI) and the compiler's symbolic shapes (compiler.to_relax with bounds)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from edgekit import api, runtime, verify
from edgekit.cli import cli
from edgekit.errors import EdgekitError
from tests._exports import tiny_bert_export

SEQ = (1, 32)  # the tiny BERT has 32 positions


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    d = tmp_path_factory.mktemp("varlen-e2e")
    axes = {"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}}
    onnx.save(tiny_bert_export(fold=False, dynamic=axes), d / "bert.onnx")
    # fold-constants (checked at every check point) folds the Shape chains of the static dims
    result = api.compile(d / "bert.onnx", "host", d / "bert.edgekit", passes="fold-constants",
                         inputs=api.InputSpecs([], {"seq": SEQ}))
    return d, result


def _inputs(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((1, n), np.int64)
    mask[0, n - n // 4:] = 0 if n > 3 else 1  # padding at the end, as a tokenizer writes
    return {"input_ids": rng.integers(0, 100, (1, n)).astype(np.int64), "attention_mask": mask}


def test_the_manifest_records_names_and_bounds(bert):
    _, result = bert
    m = result.manifest
    assert m["dims"] == {"seq": list(SEQ)}
    assert [i["shape"] for i in m["inputs"]] == [[1, "seq"], [1, "seq"]]
    assert m["passes"][0]["status"] == "applied"
    checked = [c["name"].rsplit(" ", 1)[-1] for c in m["verification"]["outputs"]]
    assert checked == ["[seq=1]", "[seq=32]", "[seq=17]"]  # the compile check's lengths


@pytest.mark.parametrize("n", [1, 2, 7, 17, 32])
def test_one_artifact_serves_every_length_like_onnxruntime(bert, n):
    d, _ = bert
    inputs = _inputs(n)
    ours = runtime.load(d / "bert.edgekit").run(inputs)
    ref = verify.run_ort(onnx.load(d / "bert.onnx"), inputs)
    (c,) = verify.compare(list(ours), list(ours.values()), ref, atol=1e-4, rtol=1e-4)
    assert c.ok, c


def test_a_length_outside_the_bounds_is_one_error(bert):
    d, _ = bert
    with pytest.raises(EdgekitError, match=r"dim 'seq' \(axis 1\) is 33, outside its bounds "
                                           r"1\.\.32"):
        api.run(d / "bert.edgekit", _inputs(33))


def test_cli_run_and_profile_at_several_lengths(bert, tmp_path):
    d, _ = bert
    args = []
    for name, a in _inputs(5).items():
        np.save(tmp_path / f"{name}.npy", a)
        args += ["--input", f"{name}={tmp_path / name}.npy"]
    result = CliRunner().invoke(cli, ["run", str(d / "bert.edgekit"), *args,
                                      "-o", str(tmp_path / "out.npz")])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, ["profile", str(d / "bert.edgekit"), "--lengths", "4,16",
                                      "--compare", "ort", "--repeat", "5", "--warmup", "1",
                                      "--no-memory", "--json"])
    assert result.exit_code == 0, result.output
    run = json.loads(result.output)
    assert [r["lengths"] for r in run["lengths"]] == [{"seq": 4}, {"seq": 16}]
    assert all(set(r["baselines"]) == {"ort"} for r in run["lengths"])
    result = CliRunner().invoke(cli, ["profile", str(d / "bert.edgekit"), "--lengths", "4,40",
                                      "--no-memory"])
    assert result.exit_code == 1 and "outside the bounds of 'seq', 1..32" in result.output
