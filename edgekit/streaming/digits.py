"""A trained streaming fixture: scikit-learn's 8x8 digits read row by row (T = 8 frames of
8 pixels), classified by an LMUFormer after every row. It ships offline with scikit-learn
and trains in seconds on a CPU, reproducibly (fixed seeds, one thread), so accuracy numbers
mean something when comparing the streaming and parallel forms.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgekit.errors import EdgekitError

FRAMES, FEATURES, CLASSES = 8, 8, 10
CONFIG = {"features": FEATURES, "dim": 32, "depth": 1, "memories": 4, "order": 8,
          "theta": 8.0, "classes": CLASSES}


@dataclass
class Split:
    x_train: np.ndarray  # (N, 8, 8) float32 in [0, 1]
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load(seed: int = 0) -> Split:
    """Digits as sequences of rows; a stratified 80/20 split."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise EdgekitError("the digits fixture needs scikit-learn (pip install "
                           "'edgekit[test]')") from None
    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)
    xtr, xte, ytr, yte = train_test_split(x, data.target, test_size=0.2, random_state=seed,
                                          stratify=data.target)
    return Split(xtr, ytr.astype(np.int64), xte, yte.astype(np.int64))


def make_model(seed: int = 0, spiking: bool = False):
    import torch

    from edgekit.graphs._lmuformer_net import LMUFormer

    torch.manual_seed(seed)
    return LMUFormer(**CONFIG, spiking=spiking)


def train(split: Split, seed: int = 0, epochs: int = 5, spiking: bool = False):
    """Adam on the last frame's logits; returns the eval-mode model."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-reproducible
    try:
        model = make_model(seed, spiking)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        gen = torch.Generator().manual_seed(seed)
        x, y = torch.from_numpy(split.x_train), torch.from_numpy(split.y_train)
        model.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(x), generator=gen).split(64):
                loss = torch.nn.functional.cross_entropy(model(x[idx])[:, -1], y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of the last frame's logits ``(N, T, classes)``."""
    return float(np.mean(logits[:, -1].argmax(-1) == labels))
