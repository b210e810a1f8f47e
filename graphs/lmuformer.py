"""LMUFormer-style streaming classifier (see ``_lmuformer_net``): causal conv patch
embedding, LMU token mixer, conv channel mixer, per-frame running-mean head."""

from __future__ import annotations

SUMMARY = ("LMUFormer-style: causal conv embedding, LMU (4x order-8, theta=16), conv channel "
           "mixer, per-frame head; streamable (edgekit export --streaming)")
INPUTS = (("x", (1, 32, 8), "float32"),)


def build(seed: int = 0):
    from ._lmuformer_net import make

    return make(seed, features=INPUTS[0][1][2], dim=32, depth=1, memories=4, order=8, theta=16)
