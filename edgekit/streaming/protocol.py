"""The streaming protocol: how a model says what its step form is.

A *streamable* model maps ``x: (B, T, ...)`` to ``y: (B, T, ...)`` (time on axis 1, one
output frame per input frame) and can also advance one frame at a time with explicit state.
Layers take part in three ways:

- stateless and pointwise in time (BatchNorm, activations, 1x1 convs, ``Linear`` on the last
  axis): their step is their ordinary forward on a one-frame slice;
- stateful layers define ``stream_state(batch, dtype) -> {name: initial tensor}`` and
  ``stream_step(x, state, new, prefix, ctx) -> y``; they read ``state[prefix + name]`` and
  write ``new[prefix + name]``;
- containers define ``stream_step`` and call :func:`step` on their children with the
  child's ``named_modules`` prefix, so state names are the module paths (``blocks.0.lmu.m``).

``ctx`` carries the frame counter ``t`` (int64, shape (1,)) and the lookahead accumulated so
far: a convolution that looks ``la`` frames ahead makes every later output ``la`` frames late.
The input frame at step ``t`` is then frame ``t - ctx.delay`` of the sequence; frames with a
negative index do not exist, so layers use :meth:`StepContext.valid` to zero them (the
parallel model's zero padding) and to freeze recurrent state until real frames arrive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgekit.errors import EdgekitError


@dataclass
class StepContext:
    t: Any  # torch int64 tensor of shape (1,): frames consumed before this one
    delay: int = 0  # lookahead accumulated upstream of the current layer, in frames

    def valid(self):
        """Bool tensor: does the current layer's input frame exist? None when always."""
        return None if self.delay == 0 else self.t >= self.delay


def _is_pointwise(module) -> bool:
    from torch import nn

    if isinstance(module, nn.Conv1d):
        return (module.kernel_size == (1,) and module.padding in ((0,), "valid")
                and module.stride == (1,) and module.dilation == (1,))
    pointwise = (nn.BatchNorm1d, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
                 nn.Identity, nn.Dropout, nn.Linear, nn.LayerNorm)
    return isinstance(module, pointwise)


def step(module, x, state: dict, new: dict, prefix: str, ctx: StepContext):
    """Advance ``module`` by one frame (``x`` is a one-frame slice in its parallel layout)."""
    if hasattr(module, "stream_step"):
        return module.stream_step(x, state, new, prefix, ctx)
    if _is_pointwise(module):
        return module(x)
    where = prefix.rstrip(".") or "the model"
    raise EdgekitError(f"{where}: {type(module).__name__} has no streaming form (it is neither "
                       "pointwise in time nor defines stream_step)")


def initial_state(model, batch: int, dtype) -> dict[str, Any]:
    """All state tensors of ``model`` at the start of a stream, keyed by module path."""
    import torch

    out: dict[str, Any] = {"t": torch.zeros(1, dtype=torch.int64)}
    for name, module in model.named_modules():
        if hasattr(module, "stream_state"):
            prefix = f"{name}." if name else ""
            for key, value in module.stream_state(batch, dtype).items():
                out[prefix + key] = value
    return out


def check_streamable(model) -> None:
    if not hasattr(model, "stream_step"):
        raise EdgekitError(f"{type(model).__name__} is not streamable: it defines no "
                           "stream_step (see edgekit.streaming.protocol)")


def total_delay(model) -> int:
    """Output delay in frames of the step form relative to the parallel form."""
    return int(getattr(model, "stream_delay", 0))
