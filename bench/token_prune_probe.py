"""Probe: on the digits ViT, can any token ranking beat random pruning?

``bench/token_prune.py`` finds seeded random pruning better than WPR on digits-vit. This script
asks whether that is WPR's fault or the fixture's: it prunes in torch (the same cut as the
``token-prune`` pass: after the attention residual of each chosen block, CLS kept, kept tokens
in their original order) with rankings the pass does not offer, among them an oracle that
knows where the digit is:

* ``wpr``     Weighted PageRank, 10 power iterations, heads combined by root mean square
* ``cls``     attention of the CLS query, head mean (EViT's ranking)
* ``bright``  keep the patches with the most ink (mean pixel of the 4×4 input patch)
* ``dark``    keep the patches with the least ink
* ``random``  seeded random scores (3 seeds, mean)

and prints KL(unpruned ‖ pruned) and top-1 on the 540 held-out images.

``--canvas`` repeats it on a variant where the digit does not fill the frame: each digit is
upsampled to 16×16 and pasted at a random place on a 32×32 black canvas (new places every
epoch while training; fixed, seeded ones for the held-out images). The same ViT recipe is
trained on it for 50 epochs first (seeded; about 8 minutes on one core).

    python bench/token_prune_probe.py
    python bench/token_prune_probe.py --canvas
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from edgekit.graphs import digits_vit

LAYER_SETS = ([1, 2, 3, 4], [1], [2])
KEEPS = (0.8, 0.7, 0.6, 0.5)


def canvas_data(epochs: int):
    """(trained model, held-out images, labels) for digits pasted on a 32×32 canvas."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.from_numpy(data.images.astype(np.float32) / 16.0)[:, None]
    x16 = torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear",
                                          align_corners=False).numpy()
    x_tr, x_te, y_tr, y_te = train_test_split(x16, data.target, test_size=0.3,
                                              stratify=data.target, random_state=0)
    rng = np.random.default_rng(1)

    def paste(small: np.ndarray) -> torch.Tensor:
        out = np.zeros((len(small), 1, 32, 32), np.float32)
        for i, (r, c) in enumerate(rng.integers(0, 17, (len(small), 2))):
            out[i, :, r:r + 16, c:c + 16] = small[i]
        return torch.from_numpy(out)

    held_out = paste(x_te)
    y = torch.from_numpy(y_tr.astype(np.int64))
    model = digits_vit.train(0, epochs, data=lambda _epoch: (paste(x_tr), y),
                             log=lambda epoch: print(f"canvas: training epoch {epoch + 1}/"
                                                     f"{epochs}", file=sys.stderr, flush=True))
    return model, held_out, torch.from_numpy(y_te.astype(np.int64))


def forward_pruned(net, x: torch.Tensor, layers: list[int], keep: float, rank) -> torch.Tensor:
    """Logits with tokens pruned after the attention residual of each block in ``layers``;
    ``rank(attn, patch_ids) -> scores`` for the non-CLS tokens."""
    heads = digits_vit.RECIPE["heads"]
    h = net.patch(x).flatten(2).transpose(1, 2)
    h = torch.cat([net.cls.expand(len(x), -1, -1), h], 1) + net.pos
    ids = torch.arange(h.shape[1] - 1).expand(len(x), -1)  # input patch of each token
    for i, blk in enumerate(net.blocks):
        a = blk.attn
        b, n, c = h.shape
        q, k, v = a.qkv(blk.norm1(h)).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * (c // heads) ** -0.5).softmax(-1)
        h = h + a.proj((attn @ v).transpose(1, 2).reshape(b, n, c))
        if i in layers:
            top = rank(attn, ids).topk(round(keep * n) - 1, dim=1).indices.sort(1).values
            rest = h[:, 1:].gather(1, top[..., None].expand(-1, -1, c))
            h, ids = torch.cat([h[:, :1], rest], 1), ids.gather(1, top)
        h = h + blk.mlp(blk.norm2(h))
    return net.head(net.norm(h)[:, 0])


def rankings(x: torch.Tensor) -> dict:
    ink = x.reshape(len(x), 8, 4, 8, 4).mean((2, 4)).reshape(len(x), 64)

    def wpr(attn, _ids):
        s = torch.full_like(attn[:, :, :1], 1.0 / attn.shape[-1])
        for _ in range(10):
            s = s @ attn
        return s[:, :, 0].pow(2).mean(1).sqrt()[:, 1:]

    def random(seed):
        gen = torch.Generator().manual_seed(seed)
        return lambda _attn, ids: torch.rand(ids.shape, generator=gen)

    return {"wpr": [wpr], "cls": [lambda attn, _ids: attn[:, :, 0, 1:].mean(1)],
            "bright": [lambda _attn, ids: ink.gather(1, ids)],
            "dark": [lambda _attn, ids: -ink.gather(1, ids)],
            "random": [random(s) for s in range(3)]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--canvas", action="store_true", help="digits on a 32x32 canvas")
    parser.add_argument("--epochs", type=int, default=50, help="canvas training epochs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.canvas:
        net, x, y = canvas_data(args.epochs)
    else:
        net = digits_vit.build()
        _, _, x_te, y_te = digits_vit.digits_split()
        x, y = torch.from_numpy(x_te), torch.from_numpy(y_te)
    with torch.no_grad():
        ref = net(x).log_softmax(1)
        print(f"{'canvas' if args.canvas else 'digits-vit'}: unpruned top-1 "
              f"{100 * float((ref.argmax(1) == y).float().mean()):.2f}%, {len(y)} images\n")
        ranks = rankings(x)
        print("| layers | keep | " + " | ".join(f"{r} KL / top-1" for r in ranks) + " |")
        print("|---|---|" + "---|" * len(ranks))
        for layers in LAYER_SETS:
            for keep in KEEPS:
                cells = []
                for fns in ranks.values():
                    kl, top1 = [], []
                    for fn in fns:
                        lp = forward_pruned(net, x, layers, keep, fn).log_softmax(1)
                        kl.append(float((ref.exp() * (ref - lp)).sum(1).mean()))
                        top1.append(100 * float((lp.argmax(1) == y).float().mean()))
                    cells.append(f"{np.mean(kl):.4f} / {np.mean(top1):.1f}")
                print(f"| {'/'.join(map(str, layers))} | {keep} | " + " | ".join(cells) + " |",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
