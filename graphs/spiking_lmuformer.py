"""Spiking LMUFormer-style classifier: the LMUFormer of ``_lmuformer_net`` with LIF neurons
(tau=2, threshold 1, hard reset to 0) after every BatchNorm, including around the LMU's
memory. Its step form carries every membrane potential as state."""

from __future__ import annotations

SUMMARY = ("Spiking LMUFormer-style: LIF (tau=2, v_th=1, hard reset) + BatchNorm throughout; "
           "streamable (edgekit export --streaming)")
INPUTS = (("x", (1, 16, 8), "float32"),)


def build(seed: int = 0):
    from ._lmuformer_net import make

    return make(seed, features=INPUTS[0][1][2], dim=32, depth=1, memories=4, order=8, theta=16,
                spiking=True)
