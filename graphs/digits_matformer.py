"""A MatFormer ViT trained on scikit-learn's digits: nested FFNs, one model per width.

MatFormer (Devvrit et al. 2023) trains each FFN so that its first k hidden units are a
working FFN on their own: ``FFN_k(x) = W2[:, :k]·act(W1[:k]·x + b1[:k]) + b2`` (torch
layout). Training sums the loss of every granularity k in ``GRANULARITIES`` on each batch, so
every sub-model is trained, and slicing the shipped weights gives a smaller model with no
retraining (``matformer-slice``). ``build()`` is the full model; ``load(units=k)`` (an int,
or one per block) is the torch sub-model the slice must equal.

Same input and split as ``digits_vit`` (8×8 digits upsampled to 32×32); 8×8 patches give 16
tokens of width 48, 2 blocks, FFN width 384 (8×: the FFN is most of the work, so sub-model
latency follows k). The weights ship beside this file (``digits_matformer.npz``, float16);
``python -m edgekit.graphs.digits_matformer`` retrains them (fixed seed, one thread, about
2 minutes) and prints each granularity's held-out top-1: 95.56 / 96.11 / 96.30 / 96.48% at
widths 48 / 96 / 192 / 384 with the float16 weights (540 images).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .digits_vit import digits_split

SUMMARY = "MatFormer ViT (nested FFNs, widths 48..384) trained on sklearn digits, 10 classes"
INPUTS = (("image", (1, 1, 32, 32), "float32"),)
RECIPE = {"dim": 48, "depth": 2, "heads": 4, "ffn": 384, "patch": 8, "epochs": 15,
          "batch": 64, "lr": 3e-3, "wd": 0.05, "version": 1}
GRANULARITIES = (48, 96, 192, 384)
WEIGHTS = Path(__file__).with_name("digits_matformer.npz")


def _model(dim: int, depth: int, heads: int, ffn: int, patch: int, **_):
    import torch
    from torch import nn

    tokens = (32 // patch) ** 2

    class NestedFFN(nn.Module):
        """fc1 -> GELU -> fc2 over the first ``units`` hidden units (all when None)."""

        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(dim, ffn), nn.Linear(ffn, dim)
            self.units: int | None = None

        def forward(self, x: torch.Tensor, units: int | None = None) -> torch.Tensor:
            k = units or self.units or ffn
            h = nn.functional.gelu(x @ self.fc1.weight[:k].T + self.fc1.bias[:k])
            return h @ self.fc2.weight[:, :k].T + self.fc2.bias

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
            self.ffn = NestedFFN()

        def forward(self, x: torch.Tensor, units: int | None = None) -> torch.Tensor:
            h = self.norm1(x)
            x = x + self.attn(h, h, h, need_weights=False)[0]
            return x + self.ffn(self.norm2(x), units)

    class DigitsMatFormer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.patch = nn.Conv2d(1, dim, patch, patch)
            self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
            self.blocks = nn.ModuleList(Block() for _ in range(depth))
            self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

        def forward(self, image: torch.Tensor, units: int | None = None) -> torch.Tensor:
            x = self.patch(image).flatten(2).transpose(1, 2) + self.pos
            for block in self.blocks:
                x = block(x, units)
            return self.head(self.norm(x).mean(dim=1))

    return DigitsMatFormer()


def train(seed: int = 0, log=None):
    """All granularities trained jointly: each batch's loss is the sum of the sub-models'
    (``_digits_training.fit``: AdamW, one-cycle LR, label smoothing 0.1, seeded batch order,
    one thread)."""
    import torch

    from ._digits_training import fit

    def loss(model, x, y):
        return sum(torch.nn.functional.cross_entropy(model(x, k), y, label_smoothing=0.1)
                   for k in GRANULARITIES)

    x_tr, y_tr, _, _ = digits_split()
    return fit(lambda _steps: _model(**RECIPE), RECIPE, (x_tr, y_tr), seed, log=log,
               loss=loss)


def load(units: int | tuple[int, ...] | None = None):
    """The trained model in eval mode; ``units`` fixes every block's FFN width (an int) or
    each block's (a tuple): the torch sub-model ``matformer-slice`` must reproduce."""
    import torch

    model = _model(**RECIPE)
    with np.load(WEIGHTS) as data:
        model.load_state_dict({k: torch.from_numpy(data[k].astype(np.float32)) for k in data})
    per_block = units if isinstance(units, tuple) else (units,) * RECIPE["depth"]
    for block, k in zip(model.blocks, per_block, strict=True):
        block.ffn.units = k
    return model.eval()


def build(seed: int = 0):
    """The full trained model (``seed`` is accepted for the registry; the weights are fixed)."""
    return load()


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
        for k in GRANULARITIES:
            hits = np.mean(load(k)(torch.from_numpy(x_te)).numpy().argmax(1) == y_te)
            print(f"FFN width {k}: held-out top-1 {hits:.2%}")
    print(f"trained in {seconds:.1f} s; wrote {WEIGHTS}")
