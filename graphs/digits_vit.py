"""A small ViT trained on scikit-learn's digits: the real-accuracy input of ``token-prune``.

The 8×8 digits are upsampled to 32×32 (bilinear) and cut into 4×4 patches, so the model sees
64 patch tokens plus a CLS token: enough tokens for pruning to matter. The trained weights ship
beside this file (``digits_vit.npz``, float16, 0.4 MB; 94.6% top-1 on the held-out 30%).
``python -m edgekit.graphs.digits_vit`` retrains them reproducibly (fixed seed and recipe,
one thread; about 5 minutes on one core) and rewrites the file. ``digits_split()`` gives the
fixed train / held-out split (30% held out, stratified, ``random_state=0``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SUMMARY = "ViT trained on sklearn digits upsampled to 32x32: 65 tokens, 6 blocks, 10 classes"
INPUTS = (("image", (1, 1, 32, 32), "float32"),)

RECIPE = {"dim": 64, "depth": 6, "heads": 4, "mlp": 128, "epochs": 15, "batch": 64,
          "lr": 2e-3, "wd": 0.05, "version": 1}


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test); x as float32 (n, 1, 32, 32) in [0, 1]."""
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.from_numpy(data.images.astype(np.float32) / 16.0)[:, None]
    x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    x_tr, x_te, y_tr, y_te = train_test_split(x.numpy(), data.target, test_size=0.3,
                                              stratify=data.target, random_state=0)
    return x_tr, y_tr.astype(np.int64), x_te, y_te.astype(np.int64)


def _model(dim: int, depth: int, heads: int, mlp: int, **_):
    import torch
    from torch import nn

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(dim, 3 * dim)
            self.proj = nn.Linear(dim, dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, n, c = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
            attn = (q @ k.transpose(-2, -1) * (c // heads) ** -0.5).softmax(-1)
            return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm1 = nn.LayerNorm(dim)
            self.attn = Attention()
            self.norm2 = nn.LayerNorm(dim)
            self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))

    class DigitsViT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.patch = nn.Conv2d(1, dim, 4, 4)
            self.cls = nn.Parameter(torch.zeros(1, 1, dim))
            self.pos = nn.Parameter(torch.randn(1, 65, dim) * 0.02)
            self.blocks = nn.Sequential(*(Block() for _ in range(depth)))
            self.norm = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, 10)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            x = self.patch(image).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
            return self.head(self.norm(self.blocks(x))[:, 0])

    return DigitsViT()


def train(seed: int = 0, epochs: int | None = None, data=None, log=None):
    """The ViT trained with ``RECIPE`` (``_digits_training.fit``: AdamW, one-cycle LR, label
    smoothing 0.1, seeded batch order, one thread). ``data(epoch) -> (x, y)`` gives each
    epoch's training tensors, all of the same length (default: the fixed digits training
    split every epoch); ``log(epoch)`` reports progress."""
    from ._digits_training import fit

    x_tr, y_tr, _, _ = digits_split()
    return fit(lambda _steps: _model(**RECIPE), RECIPE, (x_tr, y_tr), seed, epochs, log,
               data=(lambda epoch, _gen: data(epoch)) if data else None)

WEIGHTS = Path(__file__).with_name("digits_vit.npz")


def build(seed: int = 0):
    """The trained model (``seed`` is accepted for the registry; the weights are fixed)."""
    import torch

    model = _model(**RECIPE)
    with np.load(WEIGHTS) as data:
        model.load_state_dict({k: torch.from_numpy(data[k].astype(np.float32)) for k in data})
    return model.eval()


def accuracy(predict, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of ``predict(batch_of_one) -> logits`` over (x, y), one image at a time."""
    hits = sum(int(np.argmax(predict(x[i:i + 1])) == y[i]) for i in range(len(x)))
    return hits / len(x)


if __name__ == "__main__":
    trained = train(0, log=lambda epoch: print(f"epoch {epoch}", flush=True))
    np.savez(WEIGHTS, **{k: v.numpy().astype(np.float16) for k, v in trained.state_dict().items()})
    _, _, x_te, y_te = digits_split()
    import torch

    with torch.no_grad():
        logits = trained(torch.from_numpy(x_te)).numpy()
    print(f"held-out top-1 {np.mean(logits.argmax(1) == y_te):.2%}; wrote {WEIGHTS}")
