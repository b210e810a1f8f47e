"""Export with symbolic dims (issue 17 item 1): torch.export dynamic shapes, the ONNX model
checked against torch at every check point, and the lengths where torch's tracing does not
hold refused by name."""

from __future__ import annotations

import onnx
import pytest

from edgekit import api, intake, verify
from edgekit.errors import EdgekitError

BRANCH = '''
import torch

INPUTS = [("x", (1, "seq", 4), "float32")]


class Net(torch.nn.Module):
    def forward(self, x):
        if x.shape[1] > 1:  # torch.export traces this side for every length (0/1 specialised)
            return x.sum(1)
        return x[:, 0] * 3


def make():
    return Net()
'''


@pytest.fixture(scope="module")
def gpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt") / "gpt.onnx"
    result = api.export("tiny-gpt", path, api.parse_inputs(["input_ids:1xseq"], ["seq=1..16"]))
    return path, result


def test_a_transformer_exports_with_a_symbolic_length_checked_at_several(gpt):
    path, result = gpt
    assert result.dims == {"seq": (1, 16)}
    checked = [c.name.rsplit(" ", 1)[-1] for c in result.comparisons]
    assert checked == ["[seq=1]", "[seq=16]", "[seq=9]"]
    assert all(c.ok for c in result.comparisons)
    model = onnx.load(path)
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, "seq"]
    # the bounds travel in the file: the next step needs no --dim
    assert verify.model_dims(intake.load_onnx(path)) == {"seq": (1, 16)}
    assert intake.get_source(model)["spec"] == "tiny-gpt"


def test_the_exported_model_runs_any_length_in_onnxruntime(gpt):
    path, _ = gpt
    model = intake.load_onnx(path)
    spec = verify.onnx_input_specs(model)[0]
    sess = verify.ort_session(model)
    for n in (2, 7, 13):
        ids = verify.seeded_inputs([verify.TensorSpec(spec.name, (1, n), spec.dtype, 50)])
        assert verify.run_ort(sess, ids)[0].shape[:2] == (1, n)


def test_a_graph_wrong_at_the_low_end_is_refused_naming_it(tmp_path):
    net = tmp_path / "branch.py"
    net.write_text(BRANCH)
    with pytest.raises(EdgekitError, match=r"differs from torch.*\[seq=1\]"):
        api.export(f"{net}:make", tmp_path / "b.onnx", api.InputSpecs([], {"seq": (1, 8)}))
    assert not (tmp_path / "b.onnx").exists()
    result = api.export(f"{net}:make", tmp_path / "b.onnx", api.InputSpecs([], {"seq": (2, 8)}))
    assert [c.name.rsplit(" ", 1)[-1] for c in result.comparisons] == [
        "[seq=2]", "[seq=8]", "[seq=5]"]
