"""Default schedules for kernels whose loop extents are symbolic (``seq`` rows, ``seq x seq``
attention scores): one compiled kernel serves every length inside the bounds.

Kernels and their schedule (``schedules.schedule_func`` dispatches here when any block has an
extent that is not a constant; each rule declines what it does not fit, and a declined block
keeps its loops):

- matmul with symbolic rows and a static, vector-wide column axis (the dense layers of a
  transformer, ``(seq, 384) x (384, 1536)``; also scores x values, ``(seq, seq) x (seq, 32)``,
  whose symbolic reduction stays one plain loop): the rows are padded to a multiple of 4
  (``pad_einsum``: each tile copies its 4 rows of the left operand, zero past ``seq``, at
  the tile; the write-back skips the padded rows), then ``tiling.tile_reduction``, the same
  4-row register tile as static kernels, its columns partitioned into main part and tail as
  for static kernels. Padding rather than splitting ``seq`` by 4: the split puts a predicate
  ``io * 4 + ii < seq`` on the tile, and the tile's accumulators then left registers
  (1.2-1.5x slower than the static kernel, measured); TVM cannot partition a loop with a
  symbolic extent into main part and tail;
- row reductions (LayerNorm, softmax over a static row) with symbolic rows:
  ``reductions.schedule_rows`` (it takes symbolic row extents); softmax over ``seq`` keys
  (a symbolic row length, which its vector partial sums cannot split without a predicate):
  rows fused, each row's blocks computed at its row, rows in parallel, plain loops along
  the row;
- every other block (elementwise, the attention scores
  ``(seq, 32) x (32, seq)``, whose symbolic columns would need a masked write-back): loops
  reordered
  ``[spatial..., reduction..., innermost spatial]`` so the innermost loop is the contiguous
  output axis. A static innermost axis is split by the vector width (tail: a masked last
  vector) and vectorized; a symbolic one stays a plain counted loop that LLVM vectorizes
  with its own scalar tail (a TIR ``vectorize`` over a symbolic extent is rejected). The
  outer spatial loops are fused and run in parallel when the kernel's work at ``HINT`` (a
  representative length) is large enough.

Work estimates (parallel or not) use ``HINT`` for every symbolic extent. Only loop order,
tiling and padding with zero rows change, never the order of a reduction's terms, except in
row reductions (``reductions``: vector partial sums, rounding only).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

from edgekit.compiler import reductions, softmax_rows, tiling

# Length assumed for a symbolic extent when estimating work (the parallel threshold):
# a typical sentence (10-40 tokens) is shorter, a document longer.
HINT = 64
# Rows the cache blocks of a symbolic matmul are sized for (``cache_blocking.matmul_tiles``):
# a long input, so that one row block holds every row up to it and the weight panel is
# packed once per call (sized for HINT rows, MiniLM's 384 x 384 layer ran 1.6x the static
# kernel at 128 rows, sized for 256 1.35x).
TILE_ROWS = 256
_MIN_PARALLEL_WORK = 1 << 20  # as schedules._MIN_PARALLEL_WORK: ~1M operations
_MIN_PARALLEL_ROWS_WORK = 1 << 19
# Symbolic matmul rows are padded to a multiple of the 4-row register tile: a symbolic loop
# cannot be split without a predicate on the tile, which keeps its accumulators out of
# registers (measured 1.2-1.5x slower than the static tile), nor partitioned into main part
# and tail (TVM's loop_partition needs constant extents).
_ROW_PAD = 4


def const(expr: Any) -> int | None:
    value = getattr(expr, "value", expr)
    return int(value) if isinstance(value, int) else None


def has_symbolic_extent(infos) -> bool:
    """Whether any block of the kernel has a loop extent that is not a constant."""
    return any(const(d) is None for info in infos for d in info.dom())


def _hinted(info) -> list[int]:
    """The block's extents with every symbolic one replaced by ``HINT``."""
    return [const(d) if const(d) is not None else HINT for d in info.dom()]


def _work(extents: list[int]) -> int:
    work = 1
    for e in extents:
        work *= e
    return work


def schedule(sch, infos, cores: int, lanes: int, cpu=None):
    """The scheduled PrimFunc of a kernel with symbolic extents (module docstring), or None
    when no block fits a rule. ``sch``: the kernel's schedule with its epilogues inlined;
    ``cpu``: the target's ``machine.Machine`` (cache-blocked matmuls; None: fixed tiles)."""
    from tvm.s_tir.dlight.analysis import normalize_prim_func

    work = len(infos) * _work(_hinted(infos[-1]))
    if softmax_rows.schedule(sch, cores > 1 and work >= _MIN_PARALLEL_ROWS_WORK):
        return sch.mod["main"]
    snapshot = sch.copy()
    try:
        if reductions.schedule_rows(sch, infos, cores > 1 and work >= _MIN_PARALLEL_ROWS_WORK,
                                    lanes):
            return sch.mod["main"]
    except Exception:  # noqa: BLE001 - not a row kernel that fits: per-block rules below
        pass
    sch = snapshot
    snapshot = sch.copy()
    try:
        if _rows_symbolic_k(sch, infos, cores):
            return sch.mod["main"]
    except Exception:  # noqa: BLE001 - per-block rules below
        pass
    sch = snapshot
    done = 0
    for info in normalize_prim_func(sch):
        for rule in (_tile_padded, _loop_nest):
            before = sch.copy()
            try:
                if rule(sch, info, cores, lanes, cpu):
                    done += 1
                    break
            except Exception:  # noqa: BLE001 - this block keeps its loops; still correct
                pass
            sch = before  # a rule that gave up may have changed loops half-way
    return sch.mod["main"] if done else None


def _rows_symbolic_k(sch, infos, cores: int) -> bool:
    """Softmax over ``seq`` keys (a row kernel whose row length is symbolic): the output's
    row loops fused into one, every other block computed at it (a row's max, exp-sum and
    normalise pass back to back while it is in L1), rows in parallel; the loops along the
    row stay plain counted loops (LLVM vectorizes the elementwise ones)."""
    if not reductions.is_row_reduction(sch, infos, static_k=False):
        return False
    n = len(list(infos[-1].dom())) - 1
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    rows = sch.get_loops(blocks[-1])[:n]
    row = sch.fuse(*rows) if n > 1 else rows[0]
    for block in reversed(blocks[:-1]):
        sch.compute_at(block, row, preserve_unit_loops=True)
    work = len(infos) * _work(_hinted(infos[-1]))
    if cores > 1 and work >= _MIN_PARALLEL_ROWS_WORK:
        with contextlib.suppress(Exception):  # rows write disjoint outputs
            sch.parallel(row)
    return True


def _blocked(sch, info, extents: list[int], cpu, cores: int, parallel: bool) -> bool:
    """A matmul whose weights overflow L2 (``cache_blocking.matmul_tiles`` at ``TILE_ROWS``):
    ``tiling.tile_blocked``, the static kernels' cache-blocked schedule. The symbolic row
    count is padded to a multiple of the register tile's ``mr`` rows, so the tile itself has
    no tail; the row blocks of ``row_tiles`` tiles do get a predicate (whole tiles past the
    end skip), which measured as fast as the static kernel (MiniLM's 1536 x 384 layer at
    128 rows: 8.6 vs 8.3 ms), while blocks of one tile (no predicate) repack the weight
    panel per tile (11.4 ms with 4 tiles, 25 ms with 1)."""
    from edgekit.compiler.cache_blocking import matmul_tiles

    kinds = info.dom_kind()
    if not kinds.endswith("SSR"):
        return False
    tiles = matmul_tiles(TILE_ROWS, extents[-1], extents[-2], cpu, cores)
    if not tiles.blocked:
        return False
    operands = tiling._matmul_operands(sch, info.block_rv, kinds)
    if operands is not None and operands[2]:
        # weights packed at compile time (matmul_layout), rows padded to whole tiles by the
        # kernel itself: row blocks of one tile need no predicate and repack nothing
        tiles = dataclasses.replace(tiles, row_tiles=1)
        extents = [*extents[:-3], tiles.rows * HINT, *extents[-2:]]
        return tiling.tile_blocked(sch, info.block_rv, kinds, extents, tiles, parallel,
                                   rows_inside=True)
    # rows as tile_blocked reads them: a count that is not a multiple of ``mr`` makes it pad
    # the rows (pad_einsum), what a symbolic count needs
    extents = [*extents[:-3], tiles.rows * HINT + 1, *extents[-2:]]
    return tiling.tile_blocked(sch, info.block_rv, kinds, extents, tiles, parallel)


def _tile_padded(sch, info, cores: int, lanes: int, cpu=None) -> bool:
    """A matmul-like reduction whose output rows and/or columns are symbolic: pad them
    (``pad_einsum``), then the static register tile (module docstring)."""
    kinds = info.dom_kind()
    dom = list(info.dom())
    spatial = [i for i, k in enumerate(kinds) if k == "S"]
    if "R" not in kinds or len(spatial) < 2 or len(sch.get_loops(info.block_rv)) != len(kinds):
        return False
    cols, rows = spatial[-1], spatial[-2]
    if not tiling.contiguous_in_a_read(sch, info.block_rv, cols):
        return False  # not a matmul / NHWC conv: vectors along the columns would be gathers
    if const(dom[cols]) is None or const(dom[cols]) < tiling.LANES:
        # symbolic columns (attention scores, keys): padded to a column tile they measured
        # 3.8x slower than the static kernel (the masked write-back of the scores), the
        # loop-nest rule 1.3x
        return False
    pads = [1] * len(kinds)
    extents = _hinted(info)
    if const(dom[rows]) is None:
        pads[rows] = _ROW_PAD
        extents[rows] = _ROW_PAD * HINT  # a multiple of 4: tiling._rows tiles 4 rows
    parallel = cores > 1 and _work(_hinted(info)) >= _MIN_PARALLEL_WORK
    if cpu is not None and const(dom[rows]) is None and _blocked(sch, info, extents, cpu,
                                                                 cores, parallel):
        return True
    name = sch.get(info.block_rv).name_hint
    before = {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))}
    if pads != [1] * len(kinds):
        sch.pad_einsum(info.block_rv, pads)
    copies = [b for b in sch.get_child_blocks(sch.get_sblock("root"))
              if sch.get(b).name_hint not in before]
    if not tiling.tile_reduction(sch, sch.get_sblock(name), kinds, extents, parallel):
        return False
    tile_loop = sch.get_loops(sch.get_sblock(f"{name}_update"))[0]
    for block in copies:
        # each tile copies the padded rows / columns it reads, at the tile (in cache, in
        # parallel); a copy that cannot move there stays one pass, vectorized when it can be
        with contextlib.suppress(Exception):  # e.g. a padded output: a separate pass
            sch.compute_at(block, tile_loop, preserve_unit_loops=True)
        with contextlib.suppress(Exception):
            _vectorize_static_last(sch, block, lanes)
    return True


def _vectorize_static_last(sch, block, lanes: int) -> None:
    loop = sch.get_loops(block)[-1]
    extent = const(sch.get(loop).extent)
    if extent is None or extent < lanes:
        return  # symbolic: a plain loop, vectorized by LLVM
    if extent % lanes == 0 and extent > lanes:
        loop = sch.split(loop, factors=[None, lanes])[-1]
    elif extent % lanes:
        return
    sch.vectorize(loop)


def _loop_nest(sch, info, cores: int, lanes: int, cpu=None) -> bool:
    """Reorder [spatial..., reduction..., innermost spatial]; vectorize a static innermost
    axis, leave a symbolic one to LLVM; fuse and parallelize the outer spatial loops."""
    loops = sch.get_loops(info.block_rv)
    kinds = info.dom_kind()
    if len(loops) != len(kinds) or "O" in kinds or "S" not in kinds:
        return False
    dom = list(info.dom())
    spatial = [lp for lp, k in zip(loops, kinds, strict=True) if k == "S"]
    reduce = [lp for lp, k in zip(loops, kinds, strict=True) if k == "R"]
    inner_ext = const(dom[kinds.rindex("S")])
    inner = spatial[-1]
    gathers = reduce and not tiling.contiguous_in_a_read(sch, info.block_rv, kinds.rindex("S"))
    vec, outer = None, spatial[:-1]
    if inner_ext is not None and inner_ext >= 4 and not gathers:
        width = next((v for v in (2 * lanes, lanes) if inner_ext % v == 0), lanes)
        if inner_ext > width:
            inner_o, vec = sch.split(inner, factors=[None, width])
            outer = [*outer, inner_o]
        else:
            vec = inner
    elif inner_ext is not None or gathers:
        outer = spatial  # nothing contiguous to vectorize: keep it with the parallel part
    if reduce:
        tail = [vec] if vec is not None else ([inner] if not gathers and inner_ext is None
                                              else [])
        sch.reorder(*outer, *reduce, *tail)
    work = _work(_hinted(info))
    if outer and cores > 1 and work >= _MIN_PARALLEL_WORK:
        fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        with contextlib.suppress(Exception):  # not parallelizable: the kernel stays serial
            sch.parallel(fused)
    if vec is not None:
        sch.vectorize(vec)
    if reduce:
        init = sch.decompose_reduction(info.block_rv, reduce[0])
        if vec is not None:
            with contextlib.suppress(Exception):
                sch.vectorize(sch.get_loops(init)[-1])
    return True
