"""Legendre Memory Unit (Voelker et al. 2019) in the parallel form of Chilkuri & Eliasmith
(2021), with its step form: one LMU layer between an input projection and a per-frame head.

The maths (ZOH discretisation, impulse response, parallel vs step form) is in
``graphs/_lmu_math.py``. The layer itself (``_stream_layers.LMU``): ``u = f_u(W_u x)``,
``m = f_m(memory(u))``, ``h = f_h(W_h [m; x])``; the spiking variant puts BatchNorm + LIF in
each ``f`` (and the step form keeps them, unlike the LMUFormer reference code's recurrent path).
"""

from __future__ import annotations

SUMMARY = ("LMU layer in parallel form: 1x1 input projection, 4 order-8 Legendre memories "
           "(theta=32), per-frame head; streamable")
INPUTS = (("x", (1, 32, 8), "float32"),)


def build(seed: int = 0):
    """A single LMU layer between a linear input projection and the per-frame head."""
    from ._lmuformer_net import make  # torch only when a model is built, not when listed

    return make(seed, features=INPUTS[0][1][2], dim=16, memories=4, order=8, theta=32,
                embed_kernel=1, embed_layers=1, mixer=False)
