"""A RepVGG-style CNN trained on scikit-learn's digits: the real-accuracy CNN of ``quantize-int8``.

Same input and split as ``digits_vit``: the 8×8 digits upsampled to 32×32 (bilinear), one
channel in [0, 1]; ``digits_split()`` is that module's fixed split (30% held out, stratified,
``random_state=0``). The blocks are RepVGG's training form, as in ``repvgg_cnn``:
relu(BN(conv3×3(x)) + BN(conv1×1(x)) [+ BN(x)]), convs without bias, so ``fold-bn`` and
``merge-repvgg`` apply to the export (merged, each block is one 3×3 conv + ReLU: the
deployment form whose weights quantization must cope with).

The trained weights ship beside this file (``digits_cnn.npz``, float16, 0.13 MB; 99.26% top-1
on the 540 held-out images with those float16 weights, 536 right). ``python -m
edgekit.graphs.digits_cnn`` retrains them reproducibly (fixed seed and recipe, one thread,
about 25 s on one core) and rewrites the file. Bit-identical retraining needs the same
torch build and CPU kernels; another machine gives a model of the same accuracy, not the
same bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .digits_vit import digits_split
from .repvgg_cnn import repvgg_block

SUMMARY = "RepVGG-style CNN (training form) trained on sklearn digits at 32x32, 10 classes"
INPUTS = (("image", (1, 1, 32, 32), "float32"),)

# (in, out, stride, groups) per block; 32×32 -> 16 -> 8 -> 4, global mean, linear head.
BLOCKS = ((1, 16, 2, 1), (16, 16, 1, 1), (16, 32, 2, 1), (32, 32, 1, 1), (32, 64, 2, 1),
          (64, 64, 1, 4))
RECIPE = {"epochs": 12, "batch": 64, "lr": 3e-3, "wd": 1e-4, "shift": 2, "version": 1}
WEIGHTS = Path(__file__).with_name("digits_cnn.npz")

__all__ = ["BLOCKS", "INPUTS", "RECIPE", "SUMMARY", "WEIGHTS", "accuracy", "build",
           "digits_split", "train"]


def _model():
    from torch import nn

    RepVGGBlock = repvgg_block()

    class DigitsCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(*(RepVGGBlock(*b) for b in BLOCKS))
            self.head = nn.Linear(BLOCKS[-1][1], 10)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(image).mean(dim=(2, 3)))

    return DigitsCNN()


def _shifted(x, gen, max_shift: int):
    """Each image moved by a random whole-pixel offset in [-max_shift, max_shift]² (zeros
    shifted in): the digits are small and centred, so this is the augmentation that matters."""
    import torch

    out = torch.zeros_like(x)
    size = x.shape[-1]
    shifts = torch.randint(-max_shift, max_shift + 1, (len(x), 2), generator=gen).tolist()
    for i, (dy, dx) in enumerate(shifts):
        ys, yd = (slice(0, size - dy), slice(dy, size)) if dy >= 0 else \
            (slice(-dy, size), slice(0, size + dy))
        xs, xd = (slice(0, size - dx), slice(dx, size)) if dx >= 0 else \
            (slice(-dx, size), slice(0, size + dx))
        out[i, :, yd, xd] = x[i, :, ys, xs]
    return out


def train(seed: int = 0, epochs: int | None = None, log=None):
    """The CNN trained with ``RECIPE`` on the fixed training split (``_digits_training.fit``:
    AdamW, one-cycle LR, label smoothing 0.1, seeded batch order, one thread), with random
    shifts of up to ``shift`` pixels each epoch; ``log(epoch)`` reports progress. Returns the
    model in eval mode."""
    import torch

    from ._digits_training import fit

    x_tr, y_tr, _, _ = digits_split()
    x = torch.from_numpy(x_tr)
    return fit(lambda _steps: _model(), RECIPE, (x_tr, y_tr), seed, epochs, log,
               data=lambda _epoch, gen: (_shifted(x, gen, RECIPE["shift"]),
                                         torch.from_numpy(y_tr)))


def save(model, path: Path = WEIGHTS) -> None:
    """Float tensors as float16 (half the bytes; the accuracy above is measured after this
    rounding), BatchNorm's integer step counters as they are."""
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    np.savez(path, **{k: v.astype(np.float16) if v.dtype.kind == "f" else v
                      for k, v in state.items()})


def build(seed: int = 0):
    """The trained model in eval mode (``seed`` is accepted for the registry; the weights are
    fixed)."""
    import torch

    model = _model()
    with np.load(WEIGHTS) as data:
        state = {k: torch.from_numpy(data[k].astype(np.float32) if data[k].dtype.kind == "f"
                                     else data[k]) for k in data}
    model.load_state_dict(state)
    return model.eval()


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of ``logits`` (n, 10) against labels ``y`` (n,)."""
    return float(np.mean(np.argmax(logits, axis=1) == y))


if __name__ == "__main__":
    import time

    import torch

    start = time.perf_counter()
    trained = train(0, log=lambda epoch: print(f"epoch {epoch}", flush=True))
    seconds = time.perf_counter() - start
    save(trained)
    _, _, x_te, y_te = digits_split()
    with torch.no_grad():
        fp32 = trained(torch.from_numpy(x_te)).numpy()
        fp16 = build()(torch.from_numpy(x_te)).numpy()
    print(f"trained in {seconds:.1f} s; held-out top-1 {accuracy(fp32, y_te):.2%} "
          f"(float16 weights {accuracy(fp16, y_te):.2%}); wrote {WEIGHTS}")
