"""Does stepping reproduce the parallel model? Outputs, top-1 and spike flips.

The step form's output at step ``t`` is the parallel output at frame ``t - delay``, so the
comparison drops the first ``delay`` step outputs and the last ``delay`` parallel frames
(they need input from the future). Spiking layers (``emits_spikes = True``) are recorded in
both forms and compared spike by spike: the flip rate is the share of spike decisions that
differ (fp32 rounding can move a membrane across the threshold; in fp64 none should).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from edgekit.verify import Comparison, compare


def align(stepped: np.ndarray, parallel: np.ndarray, delay: int) -> tuple[np.ndarray, ...]:
    t = parallel.shape[1]
    return stepped[:, delay:t], parallel[:, :t - delay]


def compare_outputs(stepped: np.ndarray, parallel: np.ndarray, delay: int, atol: float,
                    rtol: float, name: str = "y") -> dict[str, Any]:
    """Max abs / relative error and top-1 agreement (last axis = classes) after alignment."""
    got, ref = align(stepped, parallel, delay)
    c: Comparison = compare([name], [got], [ref], atol, rtol)[0]
    top1 = float(np.mean(got.argmax(-1) == ref.argmax(-1))) if got.size else 1.0
    return {**c.to_dict(), "top1_agreement": top1, "frames": int(got.shape[1])}


def _spiking_modules(model) -> dict[str, Any]:
    return {n: m for n, m in model.named_modules() if getattr(m, "emits_spikes", False)}


@contextlib.contextmanager
def _record_parallel(model) -> Iterator[dict[str, Any]]:
    log: dict[str, Any] = {}
    hooks = [m.register_forward_hook(lambda _m, _i, out, n=n: log.__setitem__(n, out.numpy()))
             for n, m in _spiking_modules(model).items()]
    try:
        yield log
    finally:
        for h in hooks:
            h.remove()


@contextlib.contextmanager
def _record_steps(model) -> Iterator[dict[str, list]]:
    """Wrap each spiking module's ``stream_step`` (instance attribute, removed afterwards)."""
    log: dict[str, list] = {}
    modules = _spiking_modules(model)
    for name, m in modules.items():
        cls_step = type(m).stream_step

        def wrapped(x, state, new, prefix, ctx, m=m, name=name, cls_step=cls_step):
            s = cls_step(m, x, state, new, prefix, ctx)
            log.setdefault(name, []).append((ctx.delay, s.numpy()))
            return s

        m.stream_step = wrapped
    try:
        yield log
    finally:
        for m in modules.values():
            del m.stream_step


def spike_flips(model, x: np.ndarray, run_steps: Callable[[np.ndarray], Any]) -> dict[str, Any]:
    """Run the parallel model and ``run_steps`` (a torch stepping of the same model) on ``x``;
    count spike decisions that differ, per spiking layer and in total."""
    import torch

    with torch.no_grad(), _record_parallel(model) as par:
        model(torch.from_numpy(x))
    with _record_steps(model) as steps:
        run_steps(x)
    per_layer, flips, total = {}, 0, 0
    for name, ref in par.items():
        delay = steps[name][0][0]
        got = np.concatenate([s for _, s in steps[name]], axis=-1)[..., delay:ref.shape[-1]]
        ref = ref[..., :ref.shape[-1] - delay]
        n_flip = int(np.count_nonzero(got != ref))
        per_layer[name] = {"flips": n_flip, "spikes": int(ref.size), "rate": float(ref.mean())}
        flips, total = flips + n_flip, total + ref.size
    return {"flips": flips, "decisions": int(total),
            "flip_rate": flips / total if total else 0.0, "layers": per_layer}
