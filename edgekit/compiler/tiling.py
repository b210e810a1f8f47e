"""Register-tiled schedule for reductions whose innermost output axis is wide (matmul, NHWC conv).

Kernel: ``out[s_0, ..., s_{n-2}, j] = sum_r f(...)`` with the innermost spatial axis ``j``
contiguous in the output (matmul columns, NHWC output channels) and at least one vector wide.

Schedule (the classic CPU GEMM micro-kernel, without packing):

- ``j`` is tiled as ``jo, jv2, jv`` with ``jv`` one vector (16 fp32 lanes) and ``jv2`` up to 3
  vectors; the second-innermost axis (matmul rows, output pixels along a row) is tiled as
  ``io, ii`` with ``ii`` a few rows. Loop order ``jo, s..., io, r..., ii, jv2, jv``: for each
  reduction step one scalar of the left operand is broadcast and used for ``jv2`` vectors, each
  vector of the right operand is used for ``ii`` rows, so ``ii * jv2`` vector accumulators
  stay in registers (a ``local`` cache of the output tile, written back once per tile);
- ``jo`` outermost keeps one column panel of the right operand in cache while every row
  tile streams past it (a 768 x 50257 LM head is read once, not once per row tile);
- when ``j`` is not a multiple of the tile, the loop is partitioned first: the main part runs
  the tiled code, the few tail columns run the plain loop nest. A masked tail inside the
  vector loop would make TVM scalarize the whole kernel;
- a grouped conv (reads at ``channel // k``) is tiled within one group of ``k`` channels, with
  vectors of 16, 8 or 4 lanes dividing ``k``, so that no vector straddles two groups;
- elementwise consumers of the output (bias, BatchNorm, activation) are inlined into the
  write-back of the tile, while it is in cache;
- the outer tile loops are fused and run in parallel when the kernel is large enough.

Matmuls (one reduction axis, ``B[.., k, j]``) go through ``tile_matmul`` instead when the
caller passes the target's ``machine.Machine``: the register tile comes from
``cache_blocking.register_tile`` (registers and vector width of the target, not the fixed
4 rows x 3 vectors of 16 lanes above), and a matmul whose weights overflow half of L2 gets
``tile_blocked`` (blocks over K and N, a packed weight panel kept in L2, padded tails).

Only loop order and tiling change: every output element sums its terms in the same order
as the unscheduled kernel (the reduction loops keep their order; a split of ``k`` into blocks
keeps the partial sum in the accumulator buffer between blocks).
"""

from __future__ import annotations

import contextlib
from typing import Any

LANES = 16  # fp32 lanes of one AVX-512 register
# Rows per register tile, in order of preference (divisors of the row extent avoid a tail).
_ROWS = (4, 7, 6, 5, 8, 3, 2)


def _vectors(n: int, lanes: int) -> int:
    """Vectors per column tile (at most 3): the widest tile that leaves the shortest tail."""
    return min((v for v in (3, 2, 1) if v * lanes <= n), key=lambda v: (n % (v * lanes), -v))


def _rows(m: int) -> int:
    if m <= 8:
        return m
    return next((r for r in _ROWS if m % r == 0), 4)


def _group_size(sch, block, axis: int, n: int) -> int | None:
    """``k`` when the block reads at ``j // k`` (``j`` the innermost output axis): a grouped
    conv with ``k`` channels per group, whose vectors must not straddle two groups."""
    import re

    stmt = sch.get(block)
    var = stmt.iter_vars[axis].var.name
    sizes = {int(k) for k in re.findall(rf"\b{var} // T\.int64\((\d+)\)", str(stmt))}
    sizes = {k for k in sizes if 1 < k < n and n % k == 0 and k % LANES}
    return min(sizes) if sizes else None


def _panel_index(var: str, op: str, index: str) -> bool:
    """Whether ``index`` (a printed TIR index) is ``var // B`` or ``var % B`` (``op``) for a
    constant ``B``: how a weight packed by ``matmul_layout`` is read, ``Wp[j // B, k, j % B]``."""
    import re

    return re.fullmatch(rf"{var} {op} T\.int(32|64)\(\d+\)", index) is not None


def contiguous_in_a_read(sch, block, axis: int) -> bool:
    """Whether vectors along iteration variable ``axis`` are plain loads: some buffer the block
    reads is indexed last by it (matmul ``B[k, j]``, conv weights ``W[.., o]``) and no buffer
    uses it in another index (a row reduction reads ``x[i, k]``: vectors along ``i`` would be
    gathers)."""
    import re

    stmt = sch.get(block)
    var = stmt.iter_vars[axis].var
    uses = re.compile(rf"\b{var.name}\b")
    last = False
    for r in stmt.reads:
        if not len(r.region):
            continue
        mins = [str(rng.min) for rng in r.region]
        if _panel_index(var.name, "%", mins[-1]) and all(
                _panel_index(var.name, "//", m) or not uses.search(m) for m in mins[:-1]):
            last = True  # panels packed by matmul_layout: Wp[j // B, k, j % B]
            continue
        if any(uses.search(str(rng.min)) for rng in list(r.region)[:-1]):
            return False
        last = last or bool(uses.search(str(r.region[-1].min)))
    return last


def tile_reduction(sch, block, kinds: str, extents: list[int], parallel: bool) -> bool:
    """Tile one reduction block (see the module docstring); False when it does not fit."""
    spatial = [i for i, k in enumerate(kinds) if k == "S"]
    if "R" not in kinds or not spatial or extents[spatial[-1]] < LANES:
        return False
    if not contiguous_in_a_read(sch, block, spatial[-1]):
        return False
    n = extents[spatial[-1]]
    group = _group_size(sch, block, spatial[-1], n)
    if group is None:
        return _tile(sch, block, kinds, extents, parallel, LANES)
    # grouped conv: split the channels into (group, channel in group), tile the latter
    lanes = next((v for v in (16, 8, 4) if group % v == 0), None)
    if lanes is None:
        return False
    sch.split(sch.get_loops(block)[spatial[-1]], [n // group, group])
    kinds = kinds[:spatial[-1]] + "S" + kinds[spatial[-1]:]
    extents = [*extents[:spatial[-1]], n // group, group, *extents[spatial[-1] + 1:]]
    return _tile(sch, block, kinds, extents, parallel, lanes, grouped=True)


def _tile(sch, block, kinds: str, extents: list[int], parallel: bool, lanes: int,
          rows: int | None = None, vectors: int | None = None, grouped: bool = False) -> bool:
    """The register tile (module docstring); ``rows`` x ``vectors`` from ``cache_blocking``
    where given, else the fixed choice (``_rows``, ``_vectors``)."""
    spatial = [i for i, k in enumerate(kinds) if k == "S"]
    reduce = [i for i, k in enumerate(kinds) if k == "R"]
    n = extents[spatial[-1]]
    vectors = vectors or _vectors(n, lanes)
    width = vectors * lanes
    loops = sch.get_loops(block)
    # j outermost first, so that a partition of j leaves the other loops inside each part.
    sch.reorder(loops[spatial[-1]], *[loops[i] for i in spatial[:-1]],
                *[loops[i] for i in reduce])
    main = n // width * width
    if (n - main) * 8 > n:  # a wide scalar tail (a 27-pixel NCHW row): not worth it
        return False
    if main != n and grouped:  # a grouped conv's partition is not affine
        return False
    if main != n:
        j_main, j_tail = sch.loop_partition(sch.get_loops(block)[0], [main, None])
        block = sch.get_child_blocks(j_main)[0]
        # tail columns innermost: contiguous, a short loop LLVM can vectorize
        tail = sch.get_loops(sch.get_child_blocks(j_tail)[0])[-len(kinds):]
        with contextlib.suppress(Exception):  # needs an affine binding: not after a split
            sch.reorder(*tail[1:], tail[0])
    rows_axis = spatial[-2] if len(spatial) >= 2 and extents[spatial[-2]] > 1 else None
    loops = sch.get_loops(block)[-len(kinds):]
    j, others, red = loops[0], loops[1:len(spatial)], loops[len(spatial):]
    jo, jv2, jv = sch.split(j, [None, vectors, lanes])
    outer, inner = [jo, *others], []
    if rows_axis is not None:
        io, ii = sch.split(others[-1], [None, rows or _rows(extents[rows_axis])])
        outer, inner = [jo, *others[:-1], io], [ii]
    sch.reorder(*outer, *red, *inner, jv2, jv)
    fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    write = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(write, fused)
    inline_consumers(sch, write)
    if parallel:
        with contextlib.suppress(Exception):  # a loop that cannot run in parallel stays serial
            sch.parallel(fused)
    for lp in inner:
        sch.unroll(lp)
    sch.unroll(jv2)
    sch.vectorize(jv)
    init = sch.decompose_reduction(block, red[0])
    for blk in (init, write):
        with contextlib.suppress(Exception):
            sch.vectorize(sch.get_loops(blk)[-1])
    return True


def inline_consumers(sch, write: Any) -> None:
    """Inline the elementwise chain after the output tile into its write-back."""
    for _ in range(8):  # bias -> scale -> activation: a short chain
        consumers = sch.get_consumers(write)
        if len(consumers) != 1:
            return
        try:
            sch.reverse_compute_inline(consumers[0])
        except Exception:  # noqa: BLE001 - not elementwise on the tile: it stays separate
            return


def _matmul_operands(sch, block, kinds: str) -> tuple[int, int, bool] | None:
    """(index of ``A`` among the reads, of ``B``, whether ``B`` is packed) for a matmul block
    ``C[.., i, j] += A[.., i, k] * B[.., k, j]`` (one reduction axis ``k``, innermost; ``B``
    indexed last by ``j`` then ``k``, or packed by ``matmul_layout``: ``Wp[j // nr, k,
    j % nr]``; ``A`` indexed last by ``k``); None for any other block."""
    import re

    if not kinds.endswith("SSR") or kinds.count("R") != 1:
        return None
    stmt = sch.get(block)
    names = [v.var.name for v in stmt.iter_vars]
    i, j, k = (re.compile(rf"\b{n}\b") for n in names[-3:])
    a = b = None
    packed = False
    for index, region in enumerate(stmt.reads):
        mins = [str(rng.min) for rng in region.region]
        if len(mins) < 2 or region.source.same_as(stmt.writes[0].source):
            continue
        if j.fullmatch(mins[-1]) and k.fullmatch(mins[-2]) and b is None:
            b = index
        elif (len(mins) == 3 and b is None and k.fullmatch(mins[1])
              and _panel_index(names[-2], "//", mins[0])
              and _panel_index(names[-2], "%", mins[2])):
            b, packed = index, True
        elif (k.fullmatch(mins[-1]) and a is None and (
                i.fullmatch(mins[-2]) or re.fullmatch(rf"T\.min\({i.pattern}, .*\)", mins[-2]))):
            a = index  # T.min: matmul_layout's padded rows re-read the last row
    return (a, b, packed) if a is not None and b is not None else None


def tile_matmul(sch, block, kinds: str, extents: list[int], cpu, cores: int,
                parallel: bool) -> bool:
    """A matmul block (``_matmul_operands``) with static extents, tiled for ``cpu`` (a
    ``machine.Machine``) by ``cache_blocking.matmul_tiles``: cache-blocked when its weights
    overflow L2, else the register tile alone. False (nothing changed) for other blocks."""
    from edgekit.compiler.cache_blocking import matmul_tiles

    operands = _matmul_operands(sch, block, kinds)
    if operands is None or extents[-2] < cpu.lanes:
        return False
    n, lanes = extents[-2], cpu.lanes
    m = extents[-3]
    if operands[2]:  # packed by matmul_layout for the tiles of A's own row count
        m = int(sch.get(block).reads[operands[0]].source.shape[-2])
    tiles = matmul_tiles(m, extents[-1], n, cpu, cores)
    if tiles.blocked:
        return tile_blocked(sch, block, kinds, extents, tiles, parallel)
    # one panel: the register tile with the shortest scalar tail (no padding, no copies)
    vectors = min((v for v in range(tiles.vectors, 0, -1) if v * lanes <= n),
                  key=lambda v: (n % (v * lanes), -v))
    if n % (vectors * lanes) * 8 > n:
        return False
    return _tile(sch, block, kinds, extents, parallel, lanes, tiles.rows, vectors)


def tile_blocked(sch, block, kinds: str, extents: list[int], tiles, parallel: bool,
                 rows_inside: bool = False) -> bool:
    """Cache-blocked matmul (``cache_blocking`` has the model and the sizes ``tiles``):

    loops ``[batch.., jc, ic] | kc | ir | jr | k | ii, jv2, jv`` with ``jc`` a weight panel of
    ``panel_tiles`` register tiles, ``ic`` a row block of ``row_tiles``, ``kc`` a reduction
    block of ``k_block``. The ``B`` block ``kc x nc`` is copied per ``(jc, kc)`` into a
    contiguous buffer laid out ``[jr, k, nr]`` (each register tile's weights one sequential
    stream, no cache-set conflicts from ``B``'s row stride), which stays in L2 while the row
    tiles pass. The accumulators of the ``ic x jc`` block live in a stack buffer across the
    ``kc`` blocks (the register tile's are loop-invariant in ``k``: registers) and are written
    back once, with the elementwise epilogue. ``M`` and ``N`` not multiples of the register
    tile are padded (``pad_einsum``): the copies of ``A`` and ``B`` fill zeros past the ends,
    the write-back skips them, so the micro-kernel never has a tail. Each output element
    still sums its terms in ``k`` order. False (nothing changed) when the block is not a
    plain matmul."""
    operands = _matmul_operands(sch, block, kinds)
    if operands is None:
        return False
    nr, mr = tiles.cols, tiles.rows
    m, n = extents[-3], extents[-2]
    b_buffer = sch.get(block).reads[operands[1]].source
    prepacked = operands[2]  # by matmul_layout, at compile time: no per-call copy of B
    a_pack = b_pack = None
    if prepacked:
        # matmul_layout padded the rows to whole tiles and sized the panels: the kernel's
        # accumulators are the tile, its row copy (back to M rows) the write-back
        consumers = sch.get_consumers(block)
        if m % mr or n % nr or len(consumers) != 1 or int(b_buffer.shape[-1]) != nr:
            return False
        write = consumers[0]
        sch.set_scope(block, 0, "local")
    elif m % mr or n % nr:
        pad = [1] * (len(kinds) - 3) + [mr if m % mr else 1, nr if n % nr else 1, 1]
        sch.pad_einsum(block, pad)
        for producer in sch.get_producers(block):
            written = sch.get(producer).writes[0].source
            if str(written.name) == f"{b_buffer.name}_pad":
                b_pack = producer
            else:
                a_pack = producer
        write = sch.get_consumers(block)[0]
        sch.set_scope(block, 0, "local")
    else:
        write = sch.cache_write(block, 0, "local")
    if b_pack is None and not prepacked:
        b_pack = sch.cache_read(block, operands[1], "global")
    loops = sch.get_loops(block)[-len(kinds):]
    batch, i, j, k = loops[:-3], loops[-3], loops[-2], loops[-1]
    jc, jr, jv2, jv = sch.split(j, [None, tiles.panel_tiles, tiles.vectors, tiles.lanes])
    ic, ir, ii = sch.split(i, [None, tiles.row_tiles, mr])
    kc, ki = sch.split(k, [None, tiles.k_block])
    if rows_inside:
        # a symbolic row count: (jc, ic) fused would index by ``fused // ceil(M / mr)``, a
        # division by a run-time value that LLVM recomputes in the micro-kernel (the shape
        # var is reloaded from the parallel closure; measured 3x slower than static)
        outer = [*batch, jc]
        sch.reorder(*outer, ic, kc, ir, jr, ki, ii, jv2, jv)
    else:
        outer = [*batch, jc, ic]
        sch.reorder(*outer, kc, ir, jr, ki, ii, jv2, jv)
    fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    sch.reverse_compute_at(write, ic if rows_inside else fused)
    inline_consumers(sch, write)
    if b_pack is not None:
        sch.compute_at(b_pack, kc)
        sch.transform_layout(b_pack, ("write", 0),
                             lambda *ax: (*ax[:-2], ax[-1] // nr, ax[-2], ax[-1] % nr))
    if a_pack is not None:
        sch.compute_at(a_pack, kc)
    if parallel:
        with contextlib.suppress(Exception):  # a loop that cannot run in parallel stays serial
            sch.parallel(fused)
    sch.unroll(ii)
    sch.unroll(jv2)
    sch.vectorize(jv)
    init = sch.decompose_reduction(block, kc)
    if n % nr == 0 and b_pack is not None:  # TVM scalarizes a vector loop around the pad
        # condition, element-wise
        _, lane = sch.split(sch.get_loops(b_pack)[-1], [None, tiles.lanes])
        sch.vectorize(lane)
    for blk in (init, write):
        with contextlib.suppress(Exception):
            sch.vectorize(sch.get_loops(blk)[-1])
    return True
