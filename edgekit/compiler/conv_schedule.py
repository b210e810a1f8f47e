"""Register tile and TIR schedule of the packed-weight convolutions that ``PackConvWeights``
(``conv_layout``) emits; ``schedules.apply_default`` dispatches here for such kernels.

Kernel (see ``conv_layout``), NHWC activations, output pixels ``m = i OW + j`` as one axis,
output channels in panels of ``B``:

    xp[n, y, z, c]  = x[n, y - top, z - left, c] inside the image, else 0   (convs with padding)
    acc[n, m, o]    = sum_{r, s, c} xp[n, i sh + r dh, j sw + s dw, c] * Wp[o // B, r, s, c, o % B]
                      (i, j the pixel min(m, OH OW - 1))
    out[n, i, j, o] = acc[n, i OW + j, o]  (then the fused epilogue)

Schedule (the CPU GEMM micro-kernel over output pixels x channels):

- ``xp`` is computed once per call, pixels in parallel, channels vectorized;
- pixels are tiled by ``R`` rows (a tile may cross image rows); ``acc`` has ``OH OW``
  rounded up to whole tiles (``padded_rows``: at most an eighth more, else ``R`` divides
  ``OH OW``), its extra rows recompute the last pixel and their write-back is predicated
  off; channels are tiled by the panel ``B = V L``: ``V`` vectors of ``L`` fp32 lanes, ``L``
  from the target's features, ``V`` chosen by the pass (``tile_shape``);
- loop order ``n, panel_group, m_tile | panel | r, (s c) | m_row, vector, lane`` (``s`` and
  ``c`` fused into one loop, the same order): per reduction
  step one input scalar per row is broadcast and ``V`` contiguous weight vectors of the panel
  are loaded, for ``R V`` fused multiply-adds into accumulators held in registers (a
  ``local`` tile written back once per panel, with ``out``'s index change and the epilogue:
  bias, BatchNorm, activation, residual add);
- ``R V + V + 1 <= registers`` (16 vector registers on AVX/AVX2, 32 with AVX-512 or NEON),
  the most multiply-adds per load ``R V / (R + V)``, then the most accumulators;
- the panels of a group (as many as fit ``_L2_BUDGET``) pass one row tile while its input
  rows are in L1, so a large input is not fetched again from memory for every panel;
- ``(n, panel_group, m_tile)`` is one loop, parallel on the cores when the kernel does at
  least ``_MIN_PARALLEL_WORK`` multiply-adds.

The reduction keeps its order (r, s, c), unsplit: every output element sums its terms in
the order of the unscheduled kernel.
"""

from __future__ import annotations

import contextlib
from typing import Any

from edgekit.compiler import tiling

CONV = "edgekit_conv_packed"  # the block (and kernel name hint) of a packed conv
PAD = "edgekit_conv_pad"  # the zero-padded input (convs with padding)
NHWC = "edgekit_conv_nhwc"  # its output, pixels m back to (i, j): inlined into the tile's write
_MIN_PARALLEL_WORK = 1 << 20  # multiply-adds below which waking threads costs more
_MAX_TAIL = 0.125  # extra rows computed, as a share of the pixels, for a wider row tile
_MIN_PARALLEL_COPY = 1 << 18  # elements of a padded copy below which it stays serial
# Bytes of weight panels kept in L2 while a row tile passes them: half of the smallest L2 of
# the CPUs measured (512 KiB per core on AMD Zen 2-4; 1-2 MiB on Intel Xeons).
_L2_BUDGET = 256 << 10


def vector_registers(features: frozenset[str]) -> int:
    """Vector registers of the target: 32 with AVX-512 or on AArch64 (NEON), else 16."""
    return 32 if "avx512f" in features or "neon" in features else 16


def tile_shape(rows: int, panels: int, registers: int) -> tuple[int, int]:
    """(R rows, V vectors) of the register tile: ``R`` from ``tile_rows`` (output pixels),
    ``V`` divides ``panels`` (output channels / lanes), ``R V + V + 1 <= registers``; the
    most multiply-adds per load (``R V / (R + V)``: 4 x 3 on 16 registers), then the most
    accumulators."""
    best, score = (1, 1), (0.0, 0)
    for v in range(1, 7):
        r = tile_rows(rows, v, registers)
        if panels % v == 0 and (r * v / (r + v), r * v) > score:
            best, score = (r, v), (r * v / (r + v), r * v)
    return best


def tile_rows(rows: int, vectors: int, registers: int) -> int:
    """The most rows whose ``vectors``-wide tile fits the registers, when padding ``rows`` up
    to a multiple of it computes at most ``_MAX_TAIL`` more; else the most such rows dividing
    ``rows`` (at least 1: a panel packed for a wider target still compiles, with spills)."""
    fit = max(1, min((registers - 1 - vectors) // vectors, rows))
    if (-rows % fit) <= rows * _MAX_TAIL:
        return fit
    return next((r for r in range(fit, 0, -1) if rows % r == 0), 1)


def padded_rows(rows: int, vectors: int, registers: int) -> int:
    """``rows`` rounded up to whole row tiles (the kernel computes the extra rows from the
    last pixel again and never writes them)."""
    r = tile_rows(rows, vectors, registers)
    return -(-rows // r) * r


def panel_group(panels: int, panel_bytes: int) -> int:
    """Panels computed for one row tile before the next (a divisor of ``panels``): the row
    tile's input stays in L1 while they pass, and the group's weights must stay in L2
    (``_L2_BUDGET``), else every row tile would fetch them from memory again."""
    return max(g for g in range(1, panels + 1)
               if panels % g == 0 and (g == 1 or g * panel_bytes <= _L2_BUDGET))


def _conv_block(sch) -> Any:
    """The packed conv's block, or None (another kernel)."""
    try:
        return sch.get_sblock(CONV)
    except Exception:  # noqa: BLE001 - no such block (or several: not ours)
        return None


def schedule(func, tvm_target, cores: int) -> Any:
    """The scheduled PrimFunc, or None when ``func`` is not a packed conv or its shape does not
    fit the tile (``schedules.apply_default`` then uses its generic rule)."""
    from tvm import s_tir

    from edgekit.compiler.int8_intrin import cpu_features
    from edgekit.compiler.reductions import vector_lanes

    sch = s_tir.Schedule(func)
    block = _conv_block(sch)
    if block is None:
        return None
    try:
        _schedule(sch, block, vector_lanes(tvm_target),
                  vector_registers(cpu_features(tvm_target)), cores)
    except Exception:  # noqa: BLE001 - the generic rule still schedules it correctly
        return None
    return sch.mod["main"]


def _schedule(sch, block, lanes: int, registers: int, cores: int) -> None:
    stmt = sch.get(block)
    weights = next(r.source for r in stmt.reads if len(r.source.shape) == 5)
    panel = int(weights.shape[-1])
    if panel % lanes:  # packed for a narrower target: vectors of what divides the panel
        lanes = next(v for v in (16, 8, 4, 1) if panel % v == 0)
    _schedule_pad(sch, cores)
    n, m, o, r, s, c = sch.get_loops(block)
    ext = [int(sch.get(lp).extent) for lp in (n, m, o, r, s, c)]
    tile_v = panel // lanes  # the pass sized the panel as the tile's columns
    tile_r = tile_rows(ext[1], tile_v, registers)
    mo, mi = sch.split(m, [None, tile_r])
    panel_bytes = 4 * panel * ext[3] * ext[4] * ext[5]
    group = panel_group(ext[2] // panel, panel_bytes)
    og, oo, ov2, ov = sch.split(o, [None, group, tile_v, lanes])
    sch.reorder(n, og, mo, oo, r, s, c, mi, ov2, ov)
    # one loop over (s, c), in the same order: a pixel's taps along a row are contiguous
    # channels in NHWC, and one longer loop beats two short ones (the 3-channel 7x7 stem:
    # 21 steps instead of 7 x 3; measured +7-22% on 3x3 and 7x7 layers, 1x1 unchanged)
    sch.fuse(s, c)
    outer = sch.fuse(n, og, mo)
    write = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(write, oo)
    tiling.inline_consumers(sch, write)
    work = ext[0] * ext[1] * ext[2] * ext[3] * ext[4] * ext[5]
    if cores > 1 and work >= _MIN_PARALLEL_WORK:
        with contextlib.suppress(Exception):  # a loop that cannot run in parallel stays serial
            sch.parallel(outer)
    sch.unroll(mi)
    sch.unroll(ov2)
    sch.vectorize(ov)
    init = sch.decompose_reduction(block, r)
    for blk in (init, write):
        with contextlib.suppress(Exception):
            sch.vectorize(sch.get_loops(blk)[-1])


def _schedule_pad(sch, cores: int) -> None:
    """The padded copy: pixels in parallel (large inputs), channels vectorized."""
    try:
        pad = sch.get_sblock(PAD)
    except Exception:  # noqa: BLE001 - no padding
        return
    for producer in sch.get_producers(pad):  # an elementwise prologue FuseOps put first
        with contextlib.suppress(Exception):
            sch.compute_inline(producer)
    n, y, z, c = sch.get_loops(pad)
    ext = [int(sch.get(lp).extent) for lp in (n, y, z, c)]
    outer = sch.fuse(n, y, z)
    if cores > 1 and ext[0] * ext[1] * ext[2] * ext[3] >= _MIN_PARALLEL_COPY:
        with contextlib.suppress(Exception):
            sch.parallel(outer)
    lanes = next((v for v in (16, 8, 4) if ext[3] % v == 0), None)
    if lanes is not None:
        _, vec = sch.split(c, [None, lanes])
        sch.vectorize(vec)
