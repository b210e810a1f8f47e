"""The training loop the digits fixtures share (digits-vit, digits-cnn, digits-sigmoid-vit,
slab-sla-vit, digits-matformer): AdamW, a one-cycle learning rate, label smoothing 0.1, a
seeded batch order, one thread (reproducible, and faster than two contended threads at these
sizes). Each fixture's ``RECIPE`` gives ``epochs``, ``batch``, ``lr`` and ``wd``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def cross_entropy(model: Any, x: Any, y: Any) -> Any:
    import torch

    return torch.nn.functional.cross_entropy(model(x), y, label_smoothing=0.1)


def fit(make: Callable[[int], Any], recipe: dict[str, Any], split: tuple[Any, Any],
        seed: int = 0,
        epochs: int | None = None, log: Callable[[int], None] | None = None,
        data: Callable[[int, Any], tuple[Any, Any]] | None = None,
        loss: Callable[[Any, Any, Any], Any] = cross_entropy) -> Any:
    """Train ``make(steps)`` (built after the seed is set: its initialisation is part of the
    recipe) and return it in eval mode. ``split``: the training images and labels (numpy,
    ``digits_split()``'s first two); ``data(epoch, generator) -> (x, y)``: one epoch's
    tensors, every epoch the same length (default: ``split`` every epoch);
    ``loss(model, x, y)``: one batch's loss; ``log(epoch)`` hears each epoch start."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        fixed = torch.from_numpy(split[0]), torch.from_numpy(split[1])
        epochs = epochs or recipe["epochs"]
        batches = -(-len(fixed[0]) // recipe["batch"])
        model = make(epochs * batches)
        opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["wd"])
        gen = torch.Generator().manual_seed(seed)
        sched = None
        model.train()
        for epoch in range(epochs):
            if log:
                log(epoch)
            x, y = data(epoch, gen) if data else fixed
            if sched is None:  # the step count of the data actually given
                steps = epochs * -(-len(x) // recipe["batch"])
                sched = torch.optim.lr_scheduler.OneCycleLR(opt, recipe["lr"],
                                                            total_steps=steps)
            for idx in torch.randperm(len(x), generator=gen).split(recipe["batch"]):
                batch_loss = loss(model, x[idx], y[idx])
                opt.zero_grad()
                batch_loss.backward()
                opt.step()
                sched.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()
