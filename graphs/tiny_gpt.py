"""A small GPT-style Pre-LN decoder: the reference graph for the normalization passes."""

from __future__ import annotations

SUMMARY = "GPT-style Pre-LN decoder: token+position embedding, 2 causal blocks, final LN, LM head"
INPUTS = (("input_ids", (1, 16), "int64"),)

VOCAB, WIDTH, HEADS, LAYERS, CONTEXT = 256, 64, 4, 2, 16


def build(seed: int = 0):
    import torch
    from torch import nn

    from ._init_utils import randomize_norm_stats

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1 = nn.LayerNorm(WIDTH)
            self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
            self.proj = nn.Linear(WIDTH, WIDTH)
            self.ln2 = nn.LayerNorm(WIDTH)
            self.fc1 = nn.Linear(WIDTH, 4 * WIDTH)
            self.fc2 = nn.Linear(4 * WIDTH, WIDTH)
            self.register_buffer("causal", torch.ones(CONTEXT, CONTEXT).tril().bool())

        def attention(self, x: torch.Tensor) -> torch.Tensor:
            b, t, _ = x.shape
            q, k, v = self.qkv(x).view(b, t, 3, HEADS, WIDTH // HEADS).permute(2, 0, 3, 1, 4)
            scores = q @ k.transpose(-2, -1) / (WIDTH // HEADS) ** 0.5
            scores = scores.masked_fill(~self.causal[:t, :t], float("-inf"))
            out = scores.softmax(-1) @ v
            return self.proj(out.transpose(1, 2).reshape(b, t, WIDTH))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x + self.attention(self.ln1(x))
            return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))

    class TinyGPT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte = nn.Embedding(VOCAB, WIDTH)
            self.wpe = nn.Embedding(CONTEXT, WIDTH)
            self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
            self.ln_f = nn.LayerNorm(WIDTH)
            self.head = nn.Linear(WIDTH, VOCAB, bias=False)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            pos = torch.arange(input_ids.shape[1], device=input_ids.device)
            x = self.wte(input_ids) + self.wpe(pos)
            for block in self.blocks:
                x = block(x)
            return self.head(self.ln_f(x))

    torch.manual_seed(seed)
    model = TinyGPT()
    with torch.no_grad():
        # Trained residual streams carry a large common-mode component; random init does not.
        # Shift the embeddings so that LayerNorm's centring matters (and recentring is tested).
        model.wte.weight.add_(0.5)
        model.wpe.weight.add_(torch.randn(WIDTH) * 0.2)
        for block in model.blocks:
            block.proj.bias.add_(0.2)
            block.fc2.weight.add_(torch.randn(1, 4 * WIDTH) * 0.05)
    return randomize_norm_stats(model, seed)
