"""Rewrite passes on symbolic shapes (issue 17 item 2): checked at every check point, fitted
passes on real samples of different lengths, and token-prune's refusal (static counts)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from edgekit import api, verify
from edgekit.errors import EdgekitError
from tests._exports import tiny_bert_export

SEQ = {"seq": (1, 32)}  # the tiny BERT has 32 positions


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """The tiny BERT with a symbolic length (TorchScript export, Shape chains kept)."""
    path = tmp_path_factory.mktemp("bert") / "bert.onnx"
    axes = {"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}}
    onnx.save(tiny_bert_export(fold=False, dynamic=axes), path)
    return path


def test_exact_passes_are_checked_at_every_length_and_keep_the_dims(bert, tmp_path):
    out = tmp_path / "r.onnx"
    # fold-constants folds the Shape chains of the static dims only: checked at 1, 32, 17
    result = api.rewrite(bert, "fold-constants", api.InputSpecs([], SEQ), out=out)
    (run,) = result.ledger
    assert run.status == "applied" and run.max_rel < 1e-5
    assert result.ops_after.get("Shape", 0) < result.ops_before["Shape"]
    written = onnx.load(out)
    assert verify.model_dims(written) == SEQ
    assert verify.onnx_input_specs(written)[0].shape == (1, "seq")


def test_token_prune_refuses_a_symbolic_token_count(bert):
    result = api.rewrite(bert, "token-prune:keep=0.5", api.InputSpecs([], SEQ))
    (run,) = result.ledger
    assert run.status == "refused" and run.message.startswith("needs a static token count")
    with pytest.raises(EdgekitError, match="token-prune was refused: needs a static token"):
        api.rewrite(bert, "token-prune", api.InputSpecs([], SEQ), strict=True)
    # a fixed length is what it needs: then it runs (and its own check decides)
    fixed = api.rewrite(bert, "fold-constants,token-prune:keep=0.5",
                        [api.parse_input_spec("input_ids:1x16"),
                         api.parse_input_spec("attention_mask:1x16")])
    assert "needs a static token count" not in fixed.ledger[-1].message


def test_fitted_passes_take_real_samples_of_different_lengths(bert):
    rng = np.random.default_rng(0)
    samples = [{"input_ids": rng.integers(0, 100, (1, n)).astype(np.int64),
                "attention_mask": np.ones((1, n), np.int64)} for n in (3, 11, 29)]
    result = api.rewrite(bert, "poly-gelu", api.InputSpecs([], SEQ), calibration=samples)
    (run,) = result.ledger
    assert run.calibration == "samples" and run.status in ("applied", "rolled-back")
    assert run.status == "applied" or "budget" in run.message
    ranges = next(json.loads(p.value) for p in result.model.metadata_props
                  if p.key == api.CALIBRATED_RANGES_KEY)
    assert ranges["input_ids"]["samples"] == 3


def test_a_sample_outside_the_bounds_is_one_line(bert):
    bad = [{"input_ids": np.zeros((1, 40), np.int64),
            "attention_mask": np.ones((1, 40), np.int64)}]
    with pytest.raises(EdgekitError, match=r"calibration sample 0: input 'input_ids': dim 'seq' "
                                           r"\(axis 1\) is 40, outside its bounds 1\.\.32"):
        api.rewrite(bert, "poly-gelu", api.InputSpecs([], SEQ), calibration=bad)
