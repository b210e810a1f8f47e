"""A ViT with sigmoid attention trained on scikit-learn's digits.

Sigmoid attention (Ramapuram et al., "Theory, Analysis, and Best Practices for Sigmoid
Self-Attention", 2024) replaces each row's softmax by an element-wise sigmoid with a bias
b = −log n (n tokens), which keeps the row sums near 1 at initialisation:

    O = σ(Q·Kᵀ/√d − log n)·V

No row reduction (no max, no Σexp, no division): every attention weight is one sigmoid of one
logit, so for encrypted inference ``poly-act`` alone makes the attention polynomial, and on a
CPU it is one fused element-wise kernel between the two matmuls.

Same input and split as ``digits_vit`` (8×8 digits upsampled to 32×32); 4×4 patches give 64
tokens of width 32, 2 blocks of 2 heads, mean-pooled. The weights ship beside this file
(``digits_sigmoid_vit.npz``, float16; accuracy in ``ACCURACY``); ``python -m
edgekit.graphs.digits_sigmoid_vit`` retrains them (fixed seed, one thread).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .digits_vit import digits_split

SUMMARY = "ViT with sigmoid attention (sigma(QK^T/sqrt(d) - log n)V) trained on digits, 64 tokens"
INPUTS = (("image", (1, 1, 32, 32), "float32"),)
RECIPE = {"dim": 32, "depth": 2, "heads": 2, "mlp": 64, "patch": 4, "epochs": 12, "batch": 64,
          "lr": 3e-3, "wd": 0.05, "version": 1}
ACCURACY = 0.9278  # held-out top-1 (540 images) with the float16 weights
WEIGHTS = Path(__file__).with_name("digits_sigmoid_vit.npz")


def _model(dim: int, depth: int, heads: int, mlp: int, patch: int, **_):
    import torch
    from torch import nn

    tokens, head_dim = (32 // patch) ** 2, dim // heads

    class SigmoidAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            self.bias = -math.log(tokens)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, n, c = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
            a = torch.sigmoid(q @ k.transpose(-2, -1) * head_dim ** -0.5 + self.bias)
            return self.proj((a @ v).transpose(1, 2).reshape(b, n, c))

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm1, self.attn = nn.LayerNorm(dim), SigmoidAttention()
            self.norm2 = nn.LayerNorm(dim)
            self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))

    class DigitsSigmoidViT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.patch = nn.Conv2d(1, dim, patch, patch)
            self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
            self.blocks = nn.Sequential(*(Block() for _ in range(depth)))
            self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            x = self.patch(image).flatten(2).transpose(1, 2) + self.pos
            return self.head(self.norm(self.blocks(x)).mean(dim=1))

    return DigitsSigmoidViT()


def train(seed: int = 0, log=None):
    """Trained with ``RECIPE`` on the digits training split (``_digits_training.fit``)."""
    from ._digits_training import fit

    x_tr, y_tr, _, _ = digits_split()
    return fit(lambda _steps: _model(**RECIPE), RECIPE, (x_tr, y_tr), seed, log=log)


def build(seed: int = 0):
    """The trained model (``seed`` is accepted for the registry; the weights are fixed)."""
    import torch

    model = _model(**RECIPE)
    with np.load(WEIGHTS) as data:
        model.load_state_dict({k: torch.from_numpy(data[k].astype(np.float32)) for k in data})
    return model.eval()


if __name__ == "__main__":
    import time

    import torch

    start = time.perf_counter()
    trained = train(0, log=lambda epoch: print(f"epoch {epoch}", flush=True))
    seconds = time.perf_counter() - start
    np.savez(WEIGHTS, **{k: v.numpy().astype(np.float16)
                         for k, v in trained.state_dict().items()})
    _, _, x_te, y_te = digits_split()
    with torch.no_grad():
        top1 = np.mean(build()(torch.from_numpy(x_te)).numpy().argmax(1) == y_te)
    print(f"trained in {seconds:.1f} s; held-out top-1 {top1:.2%} (float16 weights); "
          f"wrote {WEIGHTS}")
