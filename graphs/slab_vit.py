"""A small SLAB-style ViT whose norms are RepBN: the input of the ``fold-repbn`` rewrite."""

from __future__ import annotations

SUMMARY = "SLAB-style ViT: conv patch embedding, RepBN norms (BN(x)+alpha*x), 2 blocks, 10 classes"
INPUTS = (("image", (1, 3, 32, 32), "float32"),)


def build(seed: int = 0):
    import torch
    from torch import nn

    from ._init_utils import randomize_norm_stats

    class RepBN(nn.Module):
        """SLAB's RepBN (classification/models/prepbn.py): BN over token channels plus alpha*x."""

        def __init__(self, channels: int, alpha: float) -> None:
            super().__init__()
            self.alpha = nn.Parameter(torch.tensor([alpha]))
            self.bn = nn.BatchNorm1d(channels)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x.transpose(1, 2)
            x = self.bn(x) + self.alpha * x
            return x.transpose(1, 2)

    class Attention(nn.Module):
        def __init__(self, dim: int, heads: int) -> None:
            super().__init__()
            self.heads = heads
            self.qkv = nn.Linear(dim, 3 * dim)
            self.proj = nn.Linear(dim, dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, n, c = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).unbind(2)
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            attn = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(-1)
            return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))

    class Block(nn.Module):
        def __init__(self, dim: int, heads: int, alpha: float) -> None:
            super().__init__()
            self.norm1 = RepBN(dim, alpha)
            self.attn = Attention(dim, heads)
            self.norm2 = RepBN(dim, alpha)
            self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))

    class SlabViT(nn.Module):
        def __init__(self, dim: int = 48, depth: int = 2, heads: int = 3) -> None:
            super().__init__()
            # SLAB starts alpha at 1; any non-trivial value tests the fold. A block's two norms
            # share one value, so the exporter shares one initializer between them.
            alphas = iter(0.5 + 0.1 * i for i in range(depth + 2))
            self.patch = nn.Conv2d(3, dim, 4, 4)
            self.patch_norm = RepBN(dim, next(alphas))  # Swin-style norm right after the conv
            self.pos = nn.Parameter(torch.randn(1, 64, dim) * 0.02)
            self.blocks = nn.Sequential(*(Block(dim, heads, next(alphas)) for _ in range(depth)))
            self.norm = RepBN(dim, next(alphas))
            self.head = nn.Linear(dim, 10)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            x = self.patch_norm(self.patch(image).flatten(2).transpose(1, 2)) + self.pos
            x = self.norm(self.blocks(x))
            return self.head(x.mean(dim=1))

    torch.manual_seed(seed)
    return randomize_norm_stats(SlabViT(), seed)
