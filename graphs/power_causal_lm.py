"""A one-layer causal LM with Power-Softmax attention: the input of ``power-softmax``'s tests.

Power-Softmax (techniques.md §3) replaces softmax(s) by |s|^p / Σ|s|^p, p even. The model
writes it, causally masked, in one of the forms exported models use (``FORMS``): the stable
log form ``softmax(p·log|s|)`` unmasked ("log"), with an additive −∞ mask ("additive") or a
``masked_fill`` to the dtype's minimum ("where"), or directly as ``u / Σu`` with u = s^p
masked by a multiply ("direct-mul") or ``torch.where`` ("direct-where"). Token + position
embeddings (vocabulary 32, 8 tokens), 2 heads of 8, a residual, a vocabulary head; it
returns the logits and the attention probabilities (so tests can see the masked ones).
Weights are seeded random: the pass is judged against this same model, not on a task.
"""

from __future__ import annotations

import numpy as np

SUMMARY = "1-layer causal LM with Power-Softmax attention (p=4, additive -inf mask), 8 tokens"
INPUTS = (("ids", (1, 8), "int64"),)
SEQ, VOCAB, WIDTH = 8, 32, 16
FORMS = ("log", "additive", "where", "direct-mul", "direct-where")
CAUSAL = np.tril(np.ones((SEQ, SEQ), bool))  # query i sees keys j <= i


def make(form: str = "additive", p: int = 4, seed: int = 0):
    """The eval-mode model writing its attention as ``form`` (one of ``FORMS``)."""
    import torch
    from torch import nn

    if form not in FORMS:
        raise ValueError(f"form {form!r}: expected one of {FORMS}")

    class PowerLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(VOCAB, WIDTH)
            self.pos = nn.Parameter(torch.randn(SEQ, WIDTH))
            self.qkv, self.proj = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)
            self.head = nn.Linear(WIDTH, VOCAB)
            keep = torch.from_numpy(CAUSAL)
            self.register_buffer("keep", keep)
            self.register_buffer("additive", torch.zeros(SEQ, SEQ).masked_fill(~keep, -torch.inf))

        def forward(self, ids: torch.Tensor):
            x = self.emb(ids) + self.pos
            q, k, v = (t.reshape(1, SEQ, 2, WIDTH // 2).transpose(1, 2)
                       for t in self.qkv(x).chunk(3, -1))
            s = q @ k.transpose(-2, -1) / (WIDTH // 2) ** 0.5
            logp = p * torch.log(torch.abs(s))
            if form == "log":
                a = torch.softmax(logp, -1)
            elif form == "additive":
                a = torch.softmax(logp + self.additive, -1)
            elif form == "where":
                a = torch.softmax(logp.masked_fill(~self.keep, torch.finfo(s.dtype).min), -1)
            else:
                u = s ** p
                u = u * self.keep if form == "direct-mul" else torch.where(self.keep, u, 0.0)
                a = u / u.sum(-1, keepdim=True)
            o = (a @ v).transpose(1, 2).reshape(1, SEQ, WIDTH)
            return self.head(x + self.proj(o)), a

    torch.manual_seed(seed)
    return PowerLM().eval()


def build(seed: int = 0):
    return make("additive", seed=seed)


def token_ids(n: int, seed: int) -> np.ndarray:
    """``n`` seeded id sequences, shape (n, 1, SEQ): calibration / test inputs."""
    return np.random.default_rng(seed).integers(0, VOCAB, (n, 1, SEQ))
