"""Schedule of the packed int8 GEMM kernels that ``Int8Kernels`` emits (after FuseOps fused
their epilogue); ``schedules.apply_default`` dispatches here for such kernels.

Kernel (see ``int8_kernels``): ``a = x + shift`` in the layout's activation type (``PACK``),
then ``acc[m, n] = sum_k a[m, k] * Wp[n // c, k // g, n % c, k % g]`` (``GEMM``), then
elementwise ops on ``acc``. The layout (``c`` lanes x ``g`` products, ``int8_intrin``) is read
from the kernel's buffers. Schedule:

- rows ``M`` (the last leading axis; the others are outer loops) and columns ``N``: ``N`` in
  tiles of ``V`` vectors of ``c`` int32 lanes, ``M`` in tiles of ``R`` rows, ``R * V`` at
  most the layout's accumulator count (the register file less the ``V`` weight vectors, the
  broadcast activations and a product: 10 on AVX2's 16 ymm, 24 on 32 zmm / NEON registers);
  loop order ``n_tile, m_tile | k_group, r, v, [c x g]`` with the column tile outermost, so
  its weight panels (``V c Kp`` bytes) stay in L1/L2 while the row tiles stream past; the
  ``(n_tile, m_tile)`` loop runs in parallel on the cores;
- the ``c x g`` block is tensorized with the instruction (``vpmaddwd``, ``vpdpbusd``,
  ``sdot``) when the target has it, else vectorized over the lanes (LLVM picks widening
  multiply-adds);
- the accumulator tile lives in a ``local`` buffer (registers); its write-back computes the
  epilogue (compensation, astype, scale, bias) element by element while the tile is in cache;
- ``N`` is a multiple of ``c`` (``Int8Kernels`` pads the panels) and ``V`` divides ``N / c``;
  ``R`` divides ``M`` (``M`` prime: one row per tile, slower but exact).

Integer sums are exact: any order gives the same int32 result, so these reorderings cannot
change the output.
"""

from __future__ import annotations

import contextlib
from typing import Any

from edgekit.compiler import int8_intrin, tiling

GEMM = "edgekit_int8_gemm"
PACK = "edgekit_int8_pack_a"
NCHW_OUT = "edgekit_int8_nchw"  # a conv's NCHW output, transposed from the NHWC tile
_MIN_PARALLEL_WORK = 1 << 20  # multiply-adds below which waking threads costs more
_REDUCE = 2  # IterVar.CommReduce


def is_int8_kernel(func) -> bool:
    """Whether a PrimFunc holds an ``Int8Kernels`` GEMM (its root block allocates the
    converted activations; cheaper than printing or walking every kernel of a model)."""
    root = getattr(getattr(func, "body", None), "block", None)
    return any(str(b.name).startswith(PACK) for b in getattr(root, "alloc_buffers", ()))


def _extent(loop_rv, sch) -> int:
    return int(sch.get(loop_rv).extent)


def _tile_shape(m: int, n: int, layout) -> tuple[int, int]:
    """(rows R, vectors V) of the register tile: V vectors of ``layout.cols`` columns dividing
    N, R rows dividing M, the most accumulators (then the widest tile)."""
    best, score = (0, 0), (0, 0)
    for v in (4, 3, 2, 1):
        if n % (layout.cols * v) or v > layout.accumulators:
            continue
        r = next(r for r in range(layout.accumulators // v, 0, -1) if m % r == 0)
        if (r * v, v) > score:
            best, score = (r, v), (r * v, v)
    return best


def _kernel_layout(sch, gemm, tvm_target):
    """The layout the kernel's constant was packed in (from its buffers) and whether the
    target has that layout's instruction (else plain loops over the same layout)."""
    buffers = [r.source for r in sch.get(gemm).reads]  # the activations, the packed weights
    a_dtype = next(str(b.dtype) for b in buffers if str(b.name).startswith(PACK))
    cols, group = (int(d) for d in next(b.shape[2:] for b in buffers
                                         if not str(b.name).startswith(PACK)))
    for layout in int8_intrin.LAYOUTS:
        if (layout.cols, layout.group, layout.a_dtype) == (cols, group, a_dtype):
            return layout, int8_intrin.runs_on(layout, tvm_target)
    return None, False


def schedule(func, tvm_target, cores: int) -> Any:
    """The scheduled PrimFunc, or None when ``func`` is no ``Int8Kernels`` kernel or one this
    schedule does not fit (the generic default rule then schedules it; still exact)."""
    from tvm import s_tir

    if not is_int8_kernel(func):
        return None
    try:
        return _schedule(s_tir.Schedule(func), tvm_target, cores)
    except Exception:  # noqa: BLE001 - e.g. an epilogue FuseOps fused in an unexpected form
        return None


def _schedule(sch, tvm_target, cores: int) -> Any:
    gemm = sch.get_sblock(GEMM)
    layout, tensorize = _kernel_layout(sch, gemm, tvm_target)
    if layout is None:
        return None
    _inline_intermediates(sch)
    n_red = sum(1 for iv in sch.get(gemm).iter_vars if int(iv.iter_type) == _REDUCE)
    loops = sch.get_loops(gemm)
    *batch, rows, n_loop = loops[:-n_red]
    red = loops[-n_red:]  # (k) for a matmul, (kh, kw, channel) for a conv
    m, n, kp = _extent(rows, sch), _extent(n_loop, sch), _extent(red[-1], sch)
    work = m * n
    for lp in [*batch, *red]:
        work *= _extent(lp, sch)
    _schedule_pack(sch, cores > 1 and work // n >= _MIN_PARALLEL_WORK // 16)
    r, v = _tile_shape(m, n, layout)
    if not r or kp % layout.group:  # not an Int8Kernels layout: the loop nest stays
        return None
    no, nv, ni = sch.split(n_loop, [None, v, layout.cols])
    ro, ri = sch.split(rows, [None, r])
    ko, ki = sch.split(red[-1], [None, layout.group])
    sch.reorder(no, *batch, ro, *red[:-1], ko, ri, nv, ni, ki)
    fused = sch.fuse(no, *batch, ro)
    write = sch.cache_write(gemm, 0, "local")
    sch.reverse_compute_at(write, fused)
    tiling.inline_consumers(sch, write)
    if cores > 1 and work >= _MIN_PARALLEL_WORK:
        with contextlib.suppress(Exception):  # a loop that cannot run in parallel stays serial
            sch.parallel(fused)
    init = sch.decompose_reduction(gemm, red[0] if n_red > 1 else ko)
    if tensorize:
        int8_intrin.register(layout)
        sch.tensorize(ni, layout.intrin)
    else:
        sch.unroll(ki)
        with contextlib.suppress(Exception):  # e.g. a sliced write-back: LLVM vectorizes
            sch.vectorize(ni)
    sch.unroll(ri)
    sch.unroll(nv)
    with contextlib.suppress(Exception):
        sch.vectorize(sch.get_loops(init)[-1])
    with contextlib.suppress(Exception):  # one register of lanes: a long float epilogue
        _, lanes = sch.split(sch.get_loops(write)[-1], [None, layout.cols])  # spills wider
        sch.vectorize(lanes)
    return sch.mod["main"]


def _schedule_pack(sch, parallel: bool) -> None:
    """The converted activations: one parallel loop over rows, vectors along K."""
    pack = sch.get_sblock(PACK)
    loops = sch.get_loops(pack)
    outer = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
    if _extent(loops[-1], sch) % 8 == 0:
        _, vec = sch.split(loops[-1], [None, 8])
        sch.vectorize(vec)
    if parallel and len(loops) > 1:
        with contextlib.suppress(Exception):
            sch.parallel(outer)


def _inline_intermediates(sch) -> None:
    """compute_inline the elementwise epilogue blocks that feed other epilogue blocks, so one
    block (the kernel's output) remains after the GEMM."""
    blocks = [b for b in sch.get_child_blocks(sch.get_sblock("root"))
              if sch.get(b).name_hint not in (GEMM, PACK, NCHW_OUT)]
    for block in blocks[:-1]:
        with contextlib.suppress(Exception):  # not elementwise: it stays a loop nest
            sch.compute_inline(block)
