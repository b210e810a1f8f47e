"""Layers with a parallel form (whole sequence) and a step form (one frame plus state).

Layout is ``(B, C, T)`` (channels first, time last) inside the models. Every stateful layer
implements the protocol of ``edgekit.streaming.protocol``: ``stream_state`` gives the initial
state, ``stream_step`` advances one frame. The parallel and step forms run the same
arithmetic in the same order wherever possible, so they agree to rounding (and exactly, for
the spiking threshold decisions in fp64).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from edgekit.errors import EdgekitError
from edgekit.streaming.protocol import StepContext, step

from ._lmu_math import impulse_response, lmu_matrices


def _keep_until_valid(new, old, ctx: StepContext):
    """State updates only count once the layer's input frame exists (see StepContext)."""
    valid = ctx.valid()
    return new if valid is None else torch.where(valid, new, old)


class CausalConv1d(nn.Conv1d):
    """Conv1d over time padded ``(k-1-lookahead, lookahead)``: ``lookahead`` > 0 makes it
    non-causal (LMUFormer uses k=3, padding 1), which delays the step form by that many
    frames. Step state: the last ``k-1`` input frames."""

    def __init__(self, cin: int, cout: int, kernel: int, lookahead: int = 0, groups: int = 1,
                 bias: bool = True):
        if not 0 <= lookahead < kernel:
            raise EdgekitError(f"lookahead must be in [0, {kernel - 1}], got {lookahead}")
        super().__init__(cin, cout, kernel, groups=groups, bias=bias)
        self.lookahead = lookahead

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kernel_size[0]
        return super().forward(F.pad(x, (k - 1 - self.lookahead, self.lookahead)))

    def stream_state(self, batch: int, dtype) -> dict[str, torch.Tensor]:
        k = self.kernel_size[0]
        return {"cache": torch.zeros(batch, self.in_channels, k - 1, dtype=dtype)} if k > 1 else {}

    def stream_step(self, x, state, new, prefix, ctx: StepContext):
        if self.kernel_size[0] == 1:
            y = super().forward(x)
        else:
            valid = ctx.valid()
            if valid is not None:  # frames before the sequence are the parallel form's padding
                x = torch.where(valid, x, torch.zeros_like(x))
            window = torch.cat([state[prefix + "cache"], x], dim=-1)
            new[prefix + "cache"] = window[..., 1:]
            y = F.conv1d(window, self.weight, self.bias, groups=self.groups)
        ctx.delay += self.lookahead
        return y


class LIF(nn.Module):
    """Leaky integrate-and-fire along time, hard reset to 0 (spikingjelly ``LIFNode`` with
    ``decay_input=True``): ``H = V + (X - V) / tau``, ``S = [H >= threshold]``,
    ``V = H (1 - S)``. Training uses a sigmoid surrogate gradient; eval emits exact 0/1."""

    emits_spikes = True  # edgekit.streaming.equivalence compares these outputs spike by spike

    def __init__(self, channels: int, tau: float = 2.0, threshold: float = 1.0,
                 surrogate_alpha: float = 4.0):
        super().__init__()
        self.channels, self.tau, self.threshold = channels, tau, threshold
        self.alpha = surrogate_alpha

    def _fire(self, h: torch.Tensor) -> torch.Tensor:
        s = (h >= self.threshold).to(h.dtype)
        if self.training:
            sg = torch.sigmoid(self.alpha * (h - self.threshold))
            s = s + sg - sg.detach()
        return s

    def _update(self, x, v):
        h = v + (x - v) / self.tau
        s = self._fire(h)
        return s, h * (1.0 - s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = torch.zeros_like(x[..., 0])
        spikes = []
        for t in range(x.shape[-1]):
            s, v = self._update(x[..., t], v)
            spikes.append(s)
        return torch.stack(spikes, dim=-1)

    def stream_state(self, batch: int, dtype) -> dict[str, torch.Tensor]:
        return {"v": torch.zeros(batch, self.channels, 1, dtype=dtype)}

    def stream_step(self, x, state, new, prefix, ctx: StepContext):
        v = state[prefix + "v"]
        s, v_new = self._update(x, v)
        new[prefix + "v"] = _keep_until_valid(v_new, v, ctx)
        return s


class StreamSequential(nn.Sequential):
    """``nn.Sequential`` whose step form steps each child in turn."""

    def stream_step(self, x, state, new, prefix, ctx: StepContext):
        for name, child in self.named_children():
            x = step(child, x, state, new, f"{prefix}{name}.", ctx)
        return x


class Residual(nn.Module):
    """``x + body(x)``. The body must not look ahead (its output would be late against x)."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)

    def stream_step(self, x, state, new, prefix, ctx: StepContext):
        before = ctx.delay
        y = step(self.body, x, state, new, f"{prefix}body.", ctx)
        if ctx.delay != before:
            raise EdgekitError(f"{prefix}body looks ahead {ctx.delay - before} frame(s) inside a "
                               "residual branch; move the lookahead before the residual")
        return x + y


class CumulativeMeanHead(nn.Module):
    """Per-frame classifier on the running mean of the features: ``y_t = W mean(h_0..h_t) + b``
    (LMUFormer's all-sequence head). Input ``(B, C, T)``, output ``(B, T, classes)``.
    Step state: the running sum; the count comes from the frame counter."""

    def __init__(self, dim: int, classes: int):
        super().__init__()
        self.dim = dim
        self.fc = nn.Linear(dim, classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        count = torch.arange(1, h.shape[-1] + 1, dtype=h.dtype)
        return self.fc((torch.cumsum(h, dim=-1) / count).transpose(1, 2))

    def stream_state(self, batch: int, dtype) -> dict[str, torch.Tensor]:
        return {"sum": torch.zeros(batch, self.dim, 1, dtype=dtype)}

    def stream_step(self, h, state, new, prefix, ctx: StepContext):
        old = state[prefix + "sum"]
        total = _keep_until_valid(old + h, old, ctx)
        new[prefix + "sum"] = total
        count = torch.clamp(ctx.t - ctx.delay + 1, min=1).to(h.dtype)
        return self.fc((total / count).transpose(1, 2))


class LMU(nn.Module):
    """One LMU layer on ``(B, dim, T)`` (math in ``graphs/_lmu_math.py``): ``memories`` scalar
    inputs ``u``, each with an order-``order`` Legendre memory.
    Step state ``m``: ``(B, memories, order)``."""

    def __init__(self, dim: int, memories: int, order: int, theta: float, spiking: bool = False):
        super().__init__()
        self.memories, self.order = memories, order
        self.w_u = nn.Conv1d(dim, memories, 1)
        self.w_h = nn.Conv1d(memories * order + dim, dim, 1)
        if spiking:
            self.f_u = StreamSequential(nn.BatchNorm1d(memories), LIF(memories))
            self.f_m = StreamSequential(nn.BatchNorm1d(memories * order), LIF(memories * order))
            self.f_h = StreamSequential(nn.BatchNorm1d(dim), LIF(dim))
        else:
            self.f_u, self.f_m, self.f_h = nn.Identity(), nn.Identity(), nn.ReLU()
        # float64 constants, deliberately not buffers: .float()/.half() must not round them
        self._abar, self._bbar = lmu_matrices(order, theta)
        self._kernels: dict[int, np.ndarray] = {}

    def memory(self, u: torch.Tensor) -> torch.Tensor:
        """Parallel memory: ``(B, memories, T) -> (B, memories * order, T)``."""
        b, n, t = u.shape
        if t not in self._kernels:  # conv weight (order, 1, T): the flipped impulse response
            h = impulse_response(self._abar, self._bbar, t)
            self._kernels[t] = np.ascontiguousarray(h[::-1].T[:, None, :])
        w = torch.from_numpy(self._kernels[t]).to(u.dtype)
        m = F.conv1d(F.pad(u.reshape(b * n, 1, t), (t - 1, 0)), w)
        return m.reshape(b, n * self.order, t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.f_m(self.memory(self.f_u(self.w_u(x))))
        return self.f_h(self.w_h(torch.cat([m, x], dim=1)))

    def stream_state(self, batch: int, dtype) -> dict[str, torch.Tensor]:
        return {"m": torch.zeros(batch, self.memories, self.order, dtype=dtype)}

    def stream_step(self, x, state, new, prefix, ctx: StepContext):
        u = step(self.f_u, self.w_u(x), state, new, prefix + "f_u.", ctx)  # (B, memories, 1)
        m_old = state[prefix + "m"]
        abar_t = torch.from_numpy(self._abar.T.copy()).to(x.dtype)
        bbar = torch.from_numpy(self._bbar).to(x.dtype)
        m = _keep_until_valid(torch.matmul(m_old, abar_t) + u * bbar, m_old, ctx)
        new[prefix + "m"] = m
        mf = step(self.f_m, m.reshape(m.shape[0], -1, 1), state, new, prefix + "f_m.", ctx)
        return step(self.f_h, self.w_h(torch.cat([mf, x], dim=1)), state, new, prefix + "f_h.",
                    ctx)
