"""Analytic register tile and cache blocks for a matmul ``C[M, N] = A[M, K] @ B[K, N]`` (fp32),
from the target's vector width, vector register count and cache sizes (``machine``).

Register tile ``mr x nr`` (``nr = nv`` vectors of ``lanes``): per reduction step the
micro-kernel loads ``nv`` vectors of ``B``, broadcasts ``mr`` scalars of ``A`` and issues
``mr * nv`` FMAs into accumulators held in registers, so it needs
``mr * nv + nv + 1 <= registers`` and does ``mr * nv / (mr + nv)`` FMAs per load. Among the
tiles that fit, the most FMAs per load wins, weighted by the share of useful work (the
blocked schedule pads ``M`` and ``N`` up to whole tiles): AVX2 (16 registers x 8 lanes) gives
4 x 24, AVX-512 (32 x 16) 6 x 64, NEON (32 x 4) 6 x 16.

Cache blocks, after the analytic model of Low et al., "Analytical modeling is enough for
high-performance BLIS" (TOMS 2016), simplified to the loop order of ``tiling.tile_blocked``
(``jc | pc | ir | jr | k | micro-kernel``):

- ``kc`` (reduction block): the ``A`` micro-panel ``mr x kc`` and one ``B`` micro-panel
  ``kc x nr`` fill at most 3/4 of L1: ``(mr + nr) * kc * 4 <= 3/4 L1``; the block used is a
  divisor of ``K`` in ``[kc/2, kc]`` (a split that leaves a tail would predicate the
  micro-kernel), else ``K`` is not split;
- ``nc`` (weight panel): the packed ``B`` block ``kc x nc`` fills at most half of L2, so it
  stays in L2 while every row tile streams past it, whatever ``K`` and ``N`` are;
- ``mc`` (row block): the accumulator block ``mc x nc`` (a stack buffer across the ``kc``
  blocks) at most half of L2;
- the ``(panel, row block)`` pairs run in parallel: among the panel widths that fit, the one
  that splits best over ``cores`` wins (a 768-wide ``N`` on 2 cores: 4 panels, not 3).

Blocking applies when ``B`` (``K x N x 4`` bytes) is larger than half of L2 and ``M`` is at
least one register tile; smaller matmuls keep one panel (the register tile alone).
``tuning`` callers: :func:`matmul_tiles` is the search's natural starting point (its sizes are
the split factors of ``tiling.tile_blocked``).
"""

from __future__ import annotations

from dataclasses import dataclass

from edgekit.compiler.machine import Machine

_FLOAT = 4  # bytes


@dataclass(frozen=True)
class MatmulTiles:
    """Register tile and cache blocks of one matmul (module docstring)."""

    rows: int  # mr: rows of the register tile
    vectors: int  # nv: vectors of the register tile
    lanes: int
    k_block: int  # kc: reduction block (== K: not split)
    panel_tiles: int  # nc / nr: register tiles per weight panel
    row_tiles: int  # mc / mr: register tiles per row block
    blocked: bool  # whether the cache-blocked schedule applies

    @property
    def cols(self) -> int:
        """nr: columns of the register tile."""
        return self.vectors * self.lanes


def register_tile(m: int, n: int, lanes: int, registers: int) -> tuple[int, int]:
    """(mr, nv) for an ``m x n`` output (module docstring); ``n >= lanes``."""
    best, best_score = (1, 1), -1.0
    for nv in range(1, 5):
        if nv * lanes > n:
            break
        nr = nv * lanes
        for mr in range(1, min(m, 16) + 1):
            if mr * nv + nv + 1 > registers:
                break
            covered = m / (-(-m // mr) * mr) * n / (-(-n // nr) * nr)
            score = mr * nv / (mr + nv) * covered
            if score > best_score + 1e-9:
                best, best_score = (mr, nv), score
    return best


def _k_block(k: int, target: int) -> int:
    if k <= target:
        return k
    return next((d for d in range(target, target // 2 - 1, -1) if k % d == 0), k)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _balance(chunks: int, cores: int) -> float:
    """Share of ``cores`` busy when ``chunks`` equal chunks run on them."""
    return chunks / (-(-chunks // cores) * cores)


_MIN_ROW_TILES = 4


def matmul_tiles(m: int, k: int, n: int, machine: Machine, cores: int) -> MatmulTiles:
    """The tiles for ``(m, k) @ (k, n)`` on ``machine`` with ``cores`` threads."""
    lanes = machine.lanes
    mr, nv = register_tile(m, n, lanes, machine.vector_registers)
    nr = nv * lanes
    n_tiles, m_tiles = -(-n // nr), -(-m // mr)
    # Packing a weight panel costs a read and a write of it per call, repaid only when
    # several row tiles reuse it: with fewer than _MIN_ROW_TILES (a short sequence, a few
    # tokens) the unpacked tile streams the weights once and wins.
    big = (k * n * _FLOAT > machine.l2 // 2 and m_tiles >= _MIN_ROW_TILES and n_tiles > 1)
    if not big:
        return MatmulTiles(mr, nv, lanes, k, n_tiles, m_tiles, False)
    kc = _k_block(k, max(3 * machine.l1d // 4 // ((mr + nr) * _FLOAT) // 8 * 8, 8))
    max_panel = max(machine.l2 // 2 // (kc * nr * _FLOAT), 1)
    panels = [d for d in _divisors(n_tiles) if d <= max_panel] or [1]
    # balance first (90% busy counts as balanced), then the widest panel
    best = max(panels, key=lambda d: (min(_balance(n_tiles // d, cores), 0.9), d))
    max_rows = max(machine.l2 // 2 // (best * nr * mr * _FLOAT), 1)
    row_tiles = max(d for d in _divisors(m_tiles) if d <= max_rows)
    if n_tiles // best < cores:  # too few panels to share: split the rows too
        row_tiles = max((d for d in _divisors(m_tiles) if d <= row_tiles
                         and _balance(n_tiles // best * (m_tiles // d), cores) == 1.0),
                        default=row_tiles)
    return MatmulTiles(mr, nv, lanes, kc, best, row_tiles, True)
