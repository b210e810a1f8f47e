"""Batch-1 matrix-vector kernels (a decoder's LM head or projections for one token):
``y[j] = sum_k x[k] * W[k, j]`` (leading output axes all of extent 1, ``W`` row-major
``K x N``), then an optional elementwise epilogue ``z[j] = f(y[j], ...)``.

Such a kernel does one multiply-add per weight it reads: it is bound by memory bandwidth, not
FLOPs, and a good schedule streams ``W`` once, sequentially, on every core:

- the columns are cut in two parts (``loop_partition``): chunks of ``W_c`` columns, a whole
  number of vectors (``N`` over a multiple of ``cores`` chunks, each at most half of L2 of
  accumulators), then the few columns left (under ``chunks + 1`` vectors);
- chunks run in parallel; inside a chunk the loop order is ``k / 4, j, k % 4``: each step
  reads a contiguous ``W_c``-column piece of 4 weight rows (tens of KiB each: sequential
  streams the hardware prefetchers follow across pages; narrow column chunks would touch a
  new page, and miss the TLB, at every ``k``) and updates ``W_c`` accumulators that stay in
  L2 (``y``'s chunk), vectorized over ``j``, each accumulator vector loaded and stored once
  per 4 multiply-adds (still in ``k`` order);
- the columns left run a plain loop nest, ``k`` outer, ``j`` contiguous inside;
- the epilogue is one vectorized loop over ``j`` after the reduction (it touches ``N``
  elements, against ``K * N`` weights).

Each ``y[j]`` sums its terms in ``k`` order, as the unscheduled kernel: results are
identical. Preconditions: static extents, one reduction block, ``N`` at least one vector;
otherwise ``schedule`` returns None and the general rules apply.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

_MIN_PARALLEL_WEIGHTS = 1 << 18  # below this many weights, threads cost more than they save
_ROWS = 4  # weight rows per step: one load and store of each accumulator vector per 4 FMAs
_MAX_INLINE_TEXT = 6000  # as schedules._MAX_INLINE_TEXT


def _gemv_block(sch, infos) -> tuple[Any, list[int]] | None:
    """(info of the reduction block, its extents) when the kernel is a GEMV (docstring)."""
    reductions = [i for i in infos if "R" in i.dom_kind()]
    if len(reductions) != 1:
        return None
    info = reductions[0]
    if not re.fullmatch("S+R", info.dom_kind()):
        return None
    # normalize_prim_func drops axes of extent 1 from dom(); the loops keep them
    extents = [getattr(sch.get(lp).extent, "value", None) for lp in sch.get_loops(info.block_rv)]
    if any(not isinstance(e, int) for e in extents) or len(extents) < 2:
        return None
    if any(e != 1 for e in extents[:-2]) or sch.get_producers(info.block_rv):
        return None
    stmt = sch.get(info.block_rv)
    j, k = (re.compile(rf"\b{v.var.name}\b") for v in list(stmt.iter_vars)[-2:])
    weights = any(len(r.region) >= 2 and j.fullmatch(str(r.region[-1].min))
                  and k.fullmatch(str(r.region[-2].min)) for r in stmt.reads)
    return (info, extents) if weights else None


def chunk_columns(n: int, lanes: int, cores: int, l2: int) -> int:
    """Columns per parallel chunk, a whole number of vectors: ``N`` over a multiple of
    ``cores`` chunks (one long sequential range of every weight row per chunk), each at
    most half of L2 of accumulators."""
    chunks = max(cores, -(-n * 4 // max(l2 // 2, 4 * lanes)))
    chunks = -(-chunks // cores) * cores
    return max(n // lanes // chunks, 1) * lanes


def _vector_loops(sch, block, lanes: int, width: int, parallel: bool) -> None:
    """Loops ``[.., j, k]`` of one column part: ``j`` split into chunks of ``width`` and
    vectors, order ``chunk, k, j_vector``, chunks in parallel when asked; accumulate in
    place (a chunk of ``y`` stays in L2)."""
    loops = sch.get_loops(block)
    j, k = loops[-2], loops[-1]
    jo, jw = sch.split(j, [None, width])
    jv2, jv = sch.split(jw, [None, lanes])
    k_ext = int(sch.get(k).extent)
    rows = next(r for r in (_ROWS, 2, 1) if k_ext % r == 0)
    ko, ki = sch.split(k, [None, rows])
    sch.reorder(jo, ko, jv2, ki, jv)
    sch.unroll(ki)
    if parallel:
        with contextlib.suppress(Exception):  # a loop that cannot run in parallel stays serial
            sch.parallel(jo)
    sch.vectorize(jv)
    init = sch.decompose_reduction(block, ko)
    with contextlib.suppress(Exception):
        sch.vectorize(sch.get_loops(init)[-1])


def _epilogue(sch, infos, lanes: int, parallel: bool) -> None:
    """The elementwise blocks after the reduction inlined into the last one (as
    ``schedules`` does; a block whose text is long stays apart: inlining repeats it at each
    read), which becomes one vectorized loop."""
    spatial = [i.block_rv for i in infos if "R" not in i.dom_kind()]
    if not spatial:
        return
    for blk in spatial[:-1]:
        if len(str(sch.get(blk))) <= _MAX_INLINE_TEXT:
            with contextlib.suppress(Exception):  # it stays a loop of its own; still correct
                sch.compute_inline(blk)
    out = spatial[-1]
    loops = sch.get_loops(out)
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    extent = int(sch.get(fused).extent)
    if extent % lanes:
        return
    outer, vec = sch.split(fused, [None, lanes])
    sch.vectorize(vec)
    if parallel:
        with contextlib.suppress(Exception):
            sch.parallel(outer)


def schedule(func, cpu, cores: int):
    """A scheduled copy of ``func`` when it is a GEMV kernel (module docstring), else None.
    ``cpu``: the target's ``machine.Machine``."""
    from tvm import s_tir
    from tvm.s_tir.dlight.analysis import normalize_prim_func

    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    found = _gemv_block(sch, infos) if infos else None
    if found is None:
        return None
    info, extents = found
    k_ext, n = extents[-1], extents[-2]
    lanes = cpu.lanes
    if n < lanes:
        return None
    parallel = cores > 1 and n * k_ext >= _MIN_PARALLEL_WEIGHTS
    width = chunk_columns(n, lanes, cores if parallel else 1, cpu.l2)
    main = n // width * width
    block = info.block_rv
    try:
        _epilogue(sch, infos, lanes, parallel)
        if main != n:
            j_main, j_tail = sch.loop_partition(sch.get_loops(block)[-2], [main, None])
            tail = sch.get_loops(sch.get_child_blocks(j_tail)[0])[-2:]
            # the last columns (fewer than chunks x lanes + lanes): k outer, j contiguous
            with contextlib.suppress(Exception):
                sch.reorder(tail[1], tail[0])
            block = sch.get_child_blocks(j_main)[0]
        _vector_loops(sch, block, lanes, width, parallel)
    except Exception:  # noqa: BLE001 - the general rules apply
        return None
    return sch.mod["main"]
