"""Default CPU schedules: reasonable code for kernels that no tuning record covers.

Why: TVM's default Relax pipeline leaves every kernel as a serial scalar loop nest, and its
dlight CPU rules (GEMV, Reduction) cover few of our kernels. This rule, for each block of an
unscheduled kernel:

- inlines elementwise blocks into the elementwise blocks that consume them (an epilogue chain
  such as bias add -> ReLU6 becomes one loop nest; real padding stays apart so the
  reduction's inner loop reads a plain buffer, a no-op pad copy is inlined);
- a reduction whose innermost output axis is at least one vector wide (matmul columns,
  NHWC conv output channels; ``channels_last`` puts convs in NHWC) gets the register-tiled
  micro-kernel of ``edgekit.compiler.tiling``; every other block gets the rule below;
- an elementwise block whose innermost axis is a concatenation or a channel shuffle gets
  ``edgekit.compiler.pieces`` (segments / shuffle lanes unrolled instead of vectors), one
  that reads an input transposed ``edgekit.compiler.transposes`` (the input's contiguous
  axis looped next to the output's);
- reorders loops as [spatial..., reduction..., innermost spatial] so the innermost loop is a
  contiguous spatial one (output column / feature), splits it by the vector width (a
  non-multiple width gets a masked last vector) and vectorizes it; for a matmul this is the
  classic i, j_outer, k, j_vector order;
- with a reduction, blocks 4 rows (matmul) or output channels (conv) inside the reduction
  and unrolls them, so each vector loaded is used four times;
- fuses the outer spatial loops and runs them in parallel on the target's cores when the
  kernel does at least ~1M operations (below that, waking threads costs more than it saves).

Row-reduction kernels (softmax, LayerNorm, RMSNorm: reductions over the innermost axis of each
row, then an elementwise pass over the row) get ``edgekit.compiler.reductions`` instead: rows
in parallel, vector-wide partial sums (rfactor), vectorized normalise pass.

Each kernel is scheduled independently; a block the rule cannot handle keeps its loops.
Schedules change loop order only: every output element is reduced in the same order as in the
unscheduled kernel, except row reductions, whose sums are reassociated into vector-wide partial
sums (rounding differences only; max is exact).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

from edgekit.compiler import (
    conv_schedule,
    gemv,
    half,
    int8_schedule,
    machine,
    pieces,
    reductions,
    softmax_rows,
    symbolic,
    tiling,
    transposes,
)

# The PrimFunc attribute that marks a kernel as scheduled (by a tuning record or by this rule):
# later steps leave such kernels alone.
SCHEDULED = "tirx.is_scheduled"
_BLOCK = (4, 2)  # rows / channels per register block
_VECTOR = (16, 8, 4)  # lanes to try, widest first (fp32: 16 = one AVX-512 register)
# Multiply-adds (or elements) below which a kernel stays serial: waking the thread pool costs
# more than ~1M operations save on 2 cores.
_MIN_PARALLEL_WORK = 1 << 20
# Row kernels (softmax, norms), counted as elements x blocks (an element costs several
# operations, exp dozens). Measured on the shared 2-core machine, parallel against serial rows:
# softmax 12 x 128 x 128 (590k) 1.0-1.5x, LayerNorm 128 x 384 (147k) 0.8-1.3x.
_MIN_PARALLEL_ROWS_WORK = 1 << 19
# compute_inline copies a producer's expression into every read of it: a chain of blocks that
# read their input several times (fast tanh/exp polynomials) would grow exponentially. Blocks
# whose printed form is longer than this stay separate.
_MAX_INLINE_TEXT = 6000


def _inline_epilogues(sch, infos) -> None:
    """compute_inline spatial blocks whose consumers are all spatial (not padding before a
    reduction, not an output)."""
    kinds = {info.name: info.is_injective() for info in infos}
    for info in infos:
        if not info.is_injective():
            continue
        consumers = sch.get_consumers(info.block_rv)
        if not consumers:
            continue
        text = str(sch.get(info.block_rv))
        if len(text) > _MAX_INLINE_TEXT:
            continue
        copy = "if_then_else" not in text  # no padding condition
        if not copy and not all(kinds.get(sch.get(c).name_hint, False) for c in consumers):
            continue
        try:
            sch.compute_inline(info.block_rv)
        except Exception:  # noqa: BLE001 - the block stays separate; still correct
            continue


def _tile(sch, info, cores: int, cpu=None) -> bool:
    """Matmul / NHWC conv (a reduction with a wide innermost output axis): register tiles;
    a matmul, with ``cpu`` (``machine.Machine``), tiles and cache blocks sized for it."""
    kinds = info.dom_kind()
    extents = [symbolic.const(d) for d in info.dom()]
    if len(sch.get_loops(info.block_rv)) != len(kinds) or any(e is None for e in extents):
        return False
    work = 1
    for e in extents:
        work *= e
    parallel = cores > 1 and work >= _MIN_PARALLEL_WORK
    if cpu is not None and tiling.tile_matmul(sch, info.block_rv, kinds, extents, cpu, cores,
                                              parallel):
        return True
    return tiling.tile_reduction(sch, info.block_rv, kinds, extents, parallel)


def _schedule_block(sch, info, cores: int) -> bool:
    loops = sch.get_loops(info.block_rv)
    kinds = info.dom_kind()
    if len(loops) != len(kinds) or "O" in kinds or "S" not in kinds:
        return False
    extents = [symbolic.const(d) for d in info.dom()]
    if any(e is None for e in extents):
        return False
    spatial = [lp for lp, k in zip(loops, kinds, strict=True) if k == "S"]
    reduce = [lp for lp, k in zip(loops, kinds, strict=True) if k == "R"]
    s_ext = [e for e, k in zip(extents, kinds, strict=True) if k == "S"]
    inner, inner_ext = spatial[-1], s_ext[-1]
    lanes = next((v for v in _VECTOR if inner_ext % v == 0), None)
    if lanes is None and inner_ext > 4:  # e.g. a 13- or 27-wide feature map: masked tail
        lanes = 8 if inner_ext > 8 else 4
    if reduce and not tiling.contiguous_in_a_read(sch, info.block_rv, kinds.rindex("S")):
        lanes = None  # a row reduction (softmax, norms): vectors would be gathers
    outer = spatial[:-1]
    vec = None
    if lanes is not None and inner_ext > lanes:
        inner_o, vec = sch.split(inner, factors=[None, lanes])
        outer = [*outer, inner_o]
    elif lanes is not None:
        vec = inner
    else:
        outer = spatial  # no vectorizable inner loop: keep it with the parallel part
    block = None
    if reduce and vec is not None and len(spatial) >= 2:
        # Register blocking: a few rows (matmul) / output channels (conv) per vector loop,
        # so each vector loaded in the reduction is used several times.
        b = 1 if len(spatial) >= 4 else len(spatial) - 2
        rows = next((v for v in _BLOCK if s_ext[b] % v == 0), None)
        if rows is not None and s_ext[b] > 1:
            b_o, block = sch.split(spatial[b], factors=[None, rows])
            outer = [b_o if lp.same_as(spatial[b]) else lp for lp in outer]
    if reduce:
        order = [*outer, *reduce] + ([block] if block is not None else []) + (
            [vec] if vec is not None else [])
        sch.reorder(*order)
    n_out = 1
    for e in s_ext:
        n_out *= e
    work = n_out
    for e, k in zip(extents, kinds, strict=True):
        work *= e if k == "R" else 1
    if outer and cores > 1 and work >= _MIN_PARALLEL_WORK:
        fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        # e.g. init and update not compact under this loop: the kernel stays serial
        with contextlib.suppress(Exception):
            sch.parallel(fused)
    if vec is not None:
        sch.vectorize(vec)
    if block is not None:
        sch.unroll(block)
    if reduce:  # after parallel/vectorize: they need the reduction block whole
        init = sch.decompose_reduction(info.block_rv, reduce[0])
        if vec is not None:
            with contextlib.suppress(Exception):
                sch.vectorize(sch.get_loops(init)[-1])
    return True


def _transposed(sch, info, cores: int) -> bool:
    """An elementwise block reading an input transposed: ``transposes.reorder``, then the
    generic rule over the new loop order."""
    return transposes.reorder(sch, info) and _schedule_block(sch, info, cores)


def _row_kernel(sch, infos, cores: int, lanes: int) -> bool:
    """Softmax / norm kernels: ``softmax_rows`` for its kernel (a softmax row that is not
    whole vectors), else ``reductions.schedule_rows``; parallel from
    ``_MIN_PARALLEL_ROWS_WORK`` elements x blocks."""
    extents = [symbolic.const(d) for d in infos[-1].dom()]
    if any(e is None for e in extents):
        return False
    work = len(infos)
    for e in extents:
        work *= e
    parallel = cores > 1 and work >= _MIN_PARALLEL_ROWS_WORK
    return (softmax_rows.schedule(sch, parallel)
            or reductions.schedule_rows(sch, infos, parallel, lanes))


def schedule_func(func, cores: int, lanes: int = 4, cpu=None):
    """A scheduled copy of one PrimFunc, or None when the rule does not apply. ``lanes``: fp32
    lanes of one vector register of the target (row reductions only); ``cpu``: the target's
    ``machine.Machine`` (matmul tiles and cache blocks; without it, fixed tiles)."""
    from tvm import s_tir
    from tvm.s_tir.dlight.analysis import normalize_prim_func

    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    if not infos:
        return None
    _inline_epilogues(sch, infos)
    infos = normalize_prim_func(sch)
    if not infos:
        return None
    if symbolic.has_symbolic_extent(infos):  # variable-length kernels: their own rules
        return symbolic.schedule(sch, infos, cores, lanes, cpu)
    snapshot = sch.copy()
    try:
        if _row_kernel(sch, infos, cores, lanes):
            return sch.mod["main"]
    except Exception:  # noqa: BLE001 - fall back to the per-block rule below
        pass
    sch = snapshot
    infos = normalize_prim_func(sch)
    done = 0
    for info in infos:
        rules = (functools.partial(_tile, cpu=cpu),
                 functools.partial(pieces.schedule, min_parallel_work=_MIN_PARALLEL_WORK),
                 _transposed,
                 _schedule_block)
        for rule in rules:
            snapshot = sch.copy()
            try:
                if rule(sch, info, cores):
                    done += 1
                    break
            except Exception:  # noqa: BLE001 - this block keeps its loops; still correct
                pass
            sch = snapshot  # a rule that gave up may have changed loops half-way
    return sch.mod["main"] if done else None


def scheduled_count(mod) -> int:
    """Kernels of ``mod`` marked as scheduled."""
    import tvm

    return sum(1 for _, f in mod.functions.items()
               if isinstance(f, tvm.tirx.PrimFunc) and f.attrs and f.attrs.get(SCHEDULED))


def apply_default(mod, tvm_target) -> tuple[Any, int]:
    """Schedule every kernel of ``mod`` not yet scheduled (e.g. by a tuning record).
    Returns (module, number of kernels scheduled here). CPU (llvm) targets only."""
    import tvm

    if tvm_target.kind.name != "llvm":
        return mod, 0
    cores = machine.cores(tvm_target)
    lanes = reductions.vector_lanes(tvm_target)
    cpu = machine.describe(tvm_target)
    out = mod.clone()
    count = 0
    for gv, func in mod.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        if func.attrs and func.attrs.get(SCHEDULED):
            continue
        # Int8Kernels' packed int8 GEMMs get their own schedule (int8_schedule), the rest this
        # rule; an int8 kernel that schedule does not fit falls back to this rule
        new = int8_schedule.schedule(func, tvm_target, cores)
        new = conv_schedule.schedule(func, tvm_target, cores) if new is None else new
        new = gemv.schedule(func, cpu, cores) if new is None else new
        # 16-bit float kernels: twice the lanes per register (compiler/half.py)
        new = (schedule_func(func, cores, half.vector_lanes(func, lanes), cpu) if new is None
               else new)
        if new is None:
            continue
        for key, value in (func.attrs or {}).items():
            if key not in (new.attrs or {}):
                new = new.with_attr(key, value)
        out.update_func(gv, new.with_attr(SCHEDULED, True))
        count += 1
    return out, count
