"""LMUFormer-style sequence classifier (Liu et al. 2024), written from the math.

``x: (B, T, features)`` -> per-frame logits ``(B, T, classes)``:

1. patch embedding: ``embed_layers`` x [Conv1d over time (kernel ``embed_kernel``, looking
   ``lookahead`` frames ahead) -> BatchNorm -> ReLU | LIF];
2. ``depth`` blocks of ``x + LMU(x)`` (token mixing along time) and
   ``x + ChannelMixer(x)`` (1x1 conv -> BN -> act -> 1x1 conv -> BN);
3. a head on the running mean of the features (the prediction after t frames uses frames
   0..t only), so every frame has an output and the last one classifies the sequence.

``spiking=True`` swaps every ReLU for a LIF neuron and adds BN + LIF around the LMU's
memory (see ``LMU``). With ``lookahead=0`` everything is causal and the step form has no
delay; each frame of lookahead delays the step form's outputs by one frame.
"""

from __future__ import annotations

import torch
from torch import nn

from edgekit.streaming.protocol import StepContext, step

from ._init_utils import randomize_norm_stats
from ._stream_layers import (
    LIF,
    LMU,
    CausalConv1d,
    CumulativeMeanHead,
    Residual,
    StreamSequential,
)


class LMUFormer(nn.Module):
    def __init__(self, features: int, dim: int = 32, depth: int = 1, memories: int = 4,
                 order: int = 8, theta: float = 16.0, classes: int = 10, embed_kernel: int = 3,
                 embed_layers: int = 2, lookahead: int = 0, mixer: bool = True,
                 spiking: bool = False):
        super().__init__()
        self.spiking = spiking

        def act(channels: int) -> nn.Module:
            return LIF(channels) if spiking else nn.ReLU()

        layers: list[nn.Module] = []
        for i in range(embed_layers):
            layers += [CausalConv1d(features if i == 0 else dim, dim, embed_kernel, lookahead),
                       nn.BatchNorm1d(dim), act(dim)]
        self.embed = StreamSequential(*layers)
        blocks: list[nn.Module] = []
        for _ in range(depth):
            blocks.append(Residual(LMU(dim, memories, order, theta, spiking)))
            if mixer:
                blocks.append(Residual(StreamSequential(
                    nn.Conv1d(dim, 2 * dim, 1), nn.BatchNorm1d(2 * dim), act(2 * dim),
                    nn.Conv1d(2 * dim, dim, 1), nn.BatchNorm1d(dim))))
        self.blocks = StreamSequential(*blocks)
        self.head = CumulativeMeanHead(dim, classes)
        self.stream_delay = embed_layers * lookahead

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(x.transpose(1, 2))))

    def stream_step(self, x, state, new, prefix, ctx: StepContext):
        """One frame ``(B, 1, features)`` -> its logits ``(B, 1, classes)``."""
        h = step(self.embed, x.transpose(1, 2), state, new, prefix + "embed.", ctx)
        h = step(self.blocks, h, state, new, prefix + "blocks.", ctx)
        return step(self.head, h, state, new, prefix + "head.", ctx)


def make(seed: int = 0, **config) -> LMUFormer:
    """Deterministic random weights and BatchNorm statistics, eval mode."""
    torch.manual_seed(seed)
    model = randomize_norm_stats(LMUFormer(**config), seed)
    if config.get("spiking"):  # drive the neurons hard enough that a fair share of them fire
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm1d):
                    m.weight.mul_(2.0)
                    m.bias.add_(0.5)
    return model
