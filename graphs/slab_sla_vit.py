"""A SLAB ViT trained on scikit-learn's digits: simplified linear attention (SLA) + PRepBN.

Both halves of SLAB (techniques.md §1) as the reference code writes them:

- **SLA** per head: Q = ReLU(X·W_q), K = ReLU(X·W_k + P) (P a learned N×C positional term,
  so the token count is fixed), ``O = (Q·Kᵀ)·V ⊘ ((Q·Kᵀ)·1 + 1e-6) + DWC(V)``, DWC a 5×5
  depth-wise conv over the head's channels on the token grid, shared across heads. The
  module computes it **qk-first** (an N×N product), the order a training script picks when
  N ≤ d; ``linear-attention-order`` rewrites the export to kv-first, Q·(Kᵀ·V), exactly.
- **PRepBN**: every norm is a ``LinearNorm`` (LN for ``warm`` steps, then
  ``λ·LN(x) + (1−λ)·RepBN(x)`` with λ falling linearly to 0 over ``step`` steps). The
  reference's eval mode returns RepBN alone whatever λ is, so exporting an unfinished
  checkpoint silently drops the LN the model was still using; here eval mode computes the
  mix while λ > 0 (what the model is), so ``fold-repbn`` can see the schedule has not ended
  and refuse. The shipped checkpoint finished its schedule (λ = 0): RepBN only.

32×32 digits (as ``digits_vit``), 4×4 patches: N = 64 tokens of width 32, 2 heads of 16.
``_model(patch=2)`` gives N = 256 (untrained; for latency). The weights ship beside this
file (``slab_sla_vit.npz``, float16; accuracy in ``ACCURACY``); ``python -m
edgekit.graphs.slab_sla_vit`` retrains them (fixed seed, one thread, about a minute on one
core of this VM; 94.44% held-out top-1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .digits_vit import digits_split

SUMMARY = "SLAB ViT (ReLU linear attention + DWC, PRepBN) trained on digits: 64 tokens, 10 classes"
INPUTS = (("image", (1, 1, 32, 32), "float32"),)
RECIPE = {"dim": 32, "depth": 2, "heads": 2, "mlp": 64, "epochs": 12, "batch": 64,
          "lr": 4e-3, "wd": 0.05, "warm": 0.2, "version": 1}
ACCURACY = 0.9444  # held-out top-1 (540 images) with the float16 weights
WEIGHTS = Path(__file__).with_name("slab_sla_vit.npz")


def _model(dim: int = 32, depth: int = 2, heads: int = 2, mlp: int = 64, patch: int = 4,
           steps: int = 0, **_):
    """The network; ``steps`` (training steps) sets the LinearNorm schedules (0: finished)."""
    import torch
    import torch.nn.functional as F  # noqa: N812
    from torch import nn

    side = 32 // patch
    tokens, head_dim = side * side, dim // heads

    class RepBN(nn.Module):
        """SLAB's RepBN (classification/models/prepbn.py): BN over token channels + α·x."""

        def __init__(self) -> None:
            super().__init__()
            self.alpha = nn.Parameter(torch.ones(1))
            self.bn = nn.BatchNorm1d(dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x.transpose(1, 2)
            return (self.bn(x) + self.alpha * x).transpose(1, 2)

    class LinearNorm(nn.Module):
        """PRepBN's progressive LN -> RepBN switch; the schedule lives in buffers."""

        def __init__(self) -> None:
            super().__init__()
            warm = int(steps * RECIPE["warm"])
            self.register_buffer("warm", torch.tensor(warm))
            self.register_buffer("iter", torch.tensor(steps - warm))
            self.register_buffer("total_step", torch.tensor(max(steps - warm, 1)))
            self.norm1, self.norm2 = nn.LayerNorm(dim), RepBN()

        def train(self, mode: bool = True):
            # eval mode reads λ as a Python number, so an export holds it as a constant
            self.lam = float(self.iter) / float(self.total_step)
            return super().train(mode)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.training:
                if self.lam == 0.0:
                    return self.norm2(x)
                return self.lam * self.norm1(x) + (1 - self.lam) * self.norm2(x)
            if self.warm > 0:
                self.warm.sub_(1)
                return self.norm1(x)
            lam = self.iter / self.total_step
            if self.iter > 0:
                self.iter.sub_(1)
            return lam * self.norm1(x) + (1 - lam) * self.norm2(x)

    class SLA(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(dim, 3 * dim)
            self.proj = nn.Linear(dim, dim)
            self.pos = nn.Parameter(torch.zeros(1, tokens, dim))
            self.dwc = nn.Conv2d(head_dim, head_dim, 5, padding=2, groups=head_dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, n, c = x.shape
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            q, k = F.relu(q), F.relu(k + self.pos)
            q, k, v = (t.reshape(b, n, heads, head_dim).transpose(1, 2) for t in (q, k, v))
            a = q @ k.transpose(-2, -1)  # qk-first: (b, h, n, n)
            out = (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)
            grid = v.reshape(b * heads, side, side, head_dim).permute(0, 3, 1, 2)
            out = out + self.dwc(grid).permute(0, 2, 3, 1).reshape(b, heads, n, head_dim)
            return self.proj(out.transpose(1, 2).reshape(b, n, c))

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm1, self.attn = LinearNorm(), SLA()
            self.norm2 = LinearNorm()
            self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))

    class SlabSlaViT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.patch = nn.Conv2d(1, dim, patch, patch)
            self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
            self.blocks = nn.Sequential(*(Block() for _ in range(depth)))
            self.norm = LinearNorm()
            self.head = nn.Linear(dim, 10)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            x = self.patch(image).flatten(2).transpose(1, 2) + self.pos
            return self.head(self.norm(self.blocks(x)).mean(dim=1))

    return SlabSlaViT()


def train(seed: int = 0, log=None):
    """Trained with ``RECIPE`` on the digits training split (``_digits_training.fit``); the
    progressive LayerNorm -> RepBN schedule spans all the training steps."""
    from ._digits_training import fit

    x_tr, y_tr, _, _ = digits_split()
    return fit(lambda steps: _model(**RECIPE, steps=steps), RECIPE, (x_tr, y_tr), seed,
               log=log)

def load(path: Path = WEIGHTS, **changes):
    """The shipped checkpoint in eval mode; ``changes`` overrides state entries (e.g. a
    LinearNorm's ``iter`` buffer, to get an unfinished schedule)."""
    import torch

    model = _model(**RECIPE)
    with np.load(path) as data:
        state = {k: torch.from_numpy(data[k].astype(np.float32) if data[k].dtype.kind == "f"
                                     else data[k]) for k in data}
    state.update({k: torch.as_tensor(v) for k, v in changes.items()})
    model.load_state_dict(state)
    return model.eval()


def build(seed: int = 0):
    """The trained model (``seed`` is accepted for the registry; the weights are fixed)."""
    return load()


if __name__ == "__main__":
    import time

    import torch

    start = time.perf_counter()
    trained = train(0, log=lambda epoch: print(f"epoch {epoch}", flush=True))
    seconds = time.perf_counter() - start
    state = {k: v.numpy() for k, v in trained.state_dict().items()}
    np.savez(WEIGHTS, **{k: v.astype(np.float16) if v.dtype.kind == "f" else v
                         for k, v in state.items()})
    _, _, x_te, y_te = digits_split()
    with torch.no_grad():
        fp32 = trained(torch.from_numpy(x_te)).numpy().argmax(1)
        fp16 = build()(torch.from_numpy(x_te)).numpy().argmax(1)
    print(f"trained in {seconds:.1f} s; held-out top-1 {np.mean(fp32 == y_te):.2%} (float16 "
          f"weights {np.mean(fp16 == y_te):.2%}); wrote {WEIGHTS}")
