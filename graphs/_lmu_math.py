"""Legendre Memory Unit maths (Voelker et al. 2019; parallel form of Chilkuri & Eliasmith 2021).

Continuous memory of order ``d`` over a window of ``theta`` frames:
``A_ij = (2i+1)/theta * (-1 if i < j else (-1)^(i-j+1))``, ``B_i = (2i+1)(-1)^i / theta``.
Zero-order hold with dt = 1: ``Ā = e^A``, ``B̄ = A^-1 (Ā - I) B``.

Because ``u`` does not depend on the memory, ``m_t = Ā m_{t-1} + B̄ u_t`` unrolls to the
causal convolution ``m_t = sum_{j<=t} H_{t-j} u_j`` with the impulse response
``H_k = Ā^k B̄``. The parallel form computes it as one Conv1d with a length-T kernel (an FFT
of length 2T gives the same numbers for long sequences); the step form keeps ``m`` as state.
``Ā``, ``B̄`` and ``H`` are computed in float64 and cast to the input's dtype, so the two
forms agree to rounding in fp32 and to ~1e-15 in fp64.
"""

from __future__ import annotations

import numpy as np
import torch


def lmu_matrices(order: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """ZOH-discretised ``(Ā, B̄)`` in float64: shapes ``(order, order)`` and ``(order,)``."""
    i = np.arange(order)[:, None]
    j = np.arange(order)[None, :]
    a = np.where(i < j, -1.0, (-1.0) ** (i - j + 1)) * (2 * i + 1) / theta
    b = (2 * np.arange(order) + 1) * (-1.0) ** np.arange(order) / theta
    abar = torch.linalg.matrix_exp(torch.from_numpy(a)).numpy()  # numpy has no expm
    bbar = np.linalg.solve(a, (abar - np.eye(order)) @ b)
    return abar, bbar


def impulse_response(abar: np.ndarray, bbar: np.ndarray, length: int) -> np.ndarray:
    """``H[k] = Ā^k B̄`` for k < length, shape ``(length, order)``, float64."""
    h = np.empty((length, bbar.shape[0]))
    h[0] = bbar
    for k in range(1, length):
        h[k] = abar @ h[k - 1]
    return h
