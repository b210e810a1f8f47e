"""A small Pre-LN vision transformer: conv patch embedding, cls token, learned positions."""

from __future__ import annotations

SUMMARY = "Pre-LN ViT: 4x4 conv patches, cls token, 2 blocks, final LN, 10-class head on cls"
INPUTS = (("image", (1, 3, 32, 32), "float32"),)

WIDTH, HEADS, LAYERS, PATCH, CLASSES = 64, 4, 2, 4, 10
TOKENS = (32 // PATCH) ** 2 + 1


def build(seed: int = 0):
    import torch
    from torch import nn

    from ._init_utils import randomize_norm_stats

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm1 = nn.LayerNorm(WIDTH, eps=1e-6)
            self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
            self.proj = nn.Linear(WIDTH, WIDTH)
            self.norm2 = nn.LayerNorm(WIDTH, eps=1e-6)
            self.fc1 = nn.Linear(WIDTH, 4 * WIDTH)
            self.fc2 = nn.Linear(4 * WIDTH, WIDTH)

        def attention(self, x: torch.Tensor) -> torch.Tensor:
            b, t, _ = x.shape
            q, k, v = self.qkv(x).view(b, t, 3, HEADS, WIDTH // HEADS).permute(2, 0, 3, 1, 4)
            attn = (q @ k.transpose(-2, -1) / (WIDTH // HEADS) ** 0.5).softmax(-1)
            return self.proj((attn @ v).transpose(1, 2).reshape(b, t, WIDTH))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x + self.attention(self.norm1(x))
            return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))

    class TinyViT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.patch = nn.Conv2d(3, WIDTH, PATCH, PATCH)
            self.cls = nn.Parameter(torch.randn(1, 1, WIDTH) * 0.5 + 0.3)
            self.pos = nn.Parameter(torch.randn(1, TOKENS, WIDTH) * 0.1 + 0.2)
            self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
            self.norm = nn.LayerNorm(WIDTH, eps=1e-6)
            self.head = nn.Linear(WIDTH, CLASSES)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            x = self.patch(image).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
            for block in self.blocks:
                x = block(x)
            return self.head(self.norm(x)[:, 0])

    torch.manual_seed(seed)
    model = TinyViT()
    with torch.no_grad():
        # Give the residual writers a common-mode component, as trained ViTs have.
        model.patch.bias.add_(0.5)
        for block in model.blocks:
            block.fc2.weight.add_(torch.randn(1, 4 * WIDTH) * 0.05)
    return randomize_norm_stats(model, seed)
