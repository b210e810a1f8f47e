"""The trained digits CNN fixture: registered, its shipped weights load, the export matches
torch, the held-out accuracy is the documented one, and the RepVGG/BN merges apply exactly."""

from __future__ import annotations

import numpy as np
import pytest
from edgekit.graphs import digits_cnn

from edgekit import api, graphs
from edgekit.export import check_against_torch, export_module
from edgekit.verify import TensorSpec, ort_session

# Documented in graphs/digits_cnn.py: 99.26% (536 of 540); a few points of slack for another
# torch build or CPU, none for a broken load or export (chance is 10%).
MIN_TOP1 = 0.97
SPECS = [TensorSpec("image", (1, 1, 32, 32), "float32")]


@pytest.fixture(scope="module")
def exported():
    net = digits_cnn.build()
    model = export_module(net, SPECS)
    bad = [c for c in check_against_torch(net, model, SPECS, 1e-4, 1e-4) if not c.ok]
    assert not bad, bad
    return model


def held_out_top1(model) -> float:
    """onnxruntime top-1 over the 540 held-out images, batch 1 as exported."""
    _, _, x_te, y_te = digits_cnn.digits_split()
    sess = ort_session(model)
    logits = np.concatenate([sess.run(None, {"image": x_te[i:i + 1]})[0]
                             for i in range(len(x_te))])
    return digits_cnn.accuracy(logits, y_te)


def test_registered_with_its_input():
    info = graphs.available()["digits-cnn"]
    assert info.inputs == (("image", (1, 1, 32, 32), "float32"),)
    assert info.module is digits_cnn


def test_weights_are_trained_and_load_strictly():
    net = digits_cnn.build()  # load_state_dict is strict: every key present, none extra
    state = net.state_dict()
    with np.load(digits_cnn.WEIGHTS) as data:
        assert set(data) == set(state)
        assert all(data[k].dtype == np.float16 for k in data if data[k].dtype.kind == "f")
    bn = state["features.0.dense.1.running_var"].numpy()
    assert not np.allclose(bn, 1.0)  # trained statistics, not BatchNorm's initial ones


def test_held_out_accuracy_of_the_export(exported):
    top1 = held_out_top1(exported)
    print(f"digits-cnn held-out top-1 (onnxruntime): {top1:.4f}")
    assert top1 >= MIN_TOP1


@pytest.mark.parametrize("passes", ["merge-repvgg", "fold-bn"])
def test_repvgg_merge_and_bn_fold_apply(exported, passes):
    """The point of the architecture: the exact passes apply (merged, each block is one conv +
    ReLU, the deployment form whose weights quantization sees) and keep the accuracy."""
    x_tr = digits_cnn.digits_split()[0][:4]
    result = api.rewrite(exported, passes, calibration={"image": x_tr[:, None]})
    assert [r.status for r in result.ledger] == ["applied"], result.ledger_dicts()
    assert "BatchNormalization" not in result.ops_after
    if passes == "merge-repvgg":
        assert result.ops_after["Conv"] == len(digits_cnn.BLOCKS)
        assert "Add" not in result.ops_after
    # exact in real arithmetic: float rounding may move at most one borderline image
    assert abs(held_out_top1(result.model) - held_out_top1(exported)) <= 1 / 540
