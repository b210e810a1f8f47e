"""Default schedule for row-reduction kernels: softmax, LayerNorm, RMSNorm (and their fused
dequantize / quantize / residual epilogues).

Kernel shape (after ``schedules`` has inlined the elementwise blocks): every block iterates over
the same rows ``r = (s_0, ..., s_{n-1})``; reduction blocks compute ``acc[r] = ⊕_k f(x[r, k])``
(⊕ = max or +, ``k`` innermost and the last index of what they read, so a row is contiguous)
and the output block ``y[r, k] = g(x[r, k], acc_1[r], ...)`` spans the same ``k`` extent ``K``.

Schedule:

- the row loops of the output block are fused into one loop ``r`` and every other block is
  computed at ``r`` (``compute_at``): a row's reductions and its normalise pass run back to
  back while the row is in L1, and ``r`` runs in parallel when the kernel is large enough;
- each reduction is split ``k = ko * W + ki`` with ``W`` two vectors wide (one when ``K`` is
  not a multiple of two vectors) and ``rfactor``-ed over ``ki``: ``W`` independent partial
  results ``acc_rf[r, ki]`` (``W / lanes`` registers of accumulators, so consecutive adds do
  not wait on each other), updated with vector loads along ``ki`` for ``ko = 0 .. K/W - 1``,
  then a short scalar horizontal ``⊕`` over the ``W`` partials;
- the output block's ``k`` loop is split by the vector width and vectorized.

Numerics: max is exact under any order; sums are reassociated (``W`` strided partial sums,
then their sum), so float results differ from the serial loop by rounding only (relative
~K·eps at worst, ~sqrt(K)·eps typically). Preconditions: a static ``K``, a multiple of
the vector width and longer than one vector; otherwise the rule declines and the per-block
rule of ``schedules`` applies. The row extents may be symbolic (``seq`` rows of a
variable-length model, ``compiler.symbolic``): the fused row loop then has a symbolic extent.
"""

from __future__ import annotations

import contextlib
from typing import Any

from edgekit.compiler import tiling


def _extents(info) -> list[int | str]:
    """The block's extents: ints, a symbolic one as its printed expression (``seq``: rows of
    a variable-length kernel; equal expressions compare equal)."""
    out: list[int | str] = []
    for d in info.dom():
        value = getattr(d, "value", d)
        out.append(int(value) if isinstance(value, int) else str(d))
    return out


def is_row_reduction(sch, infos, static_k: bool = True) -> bool:
    """Whether the blocks form a row-reduction kernel (module docstring): one output block
    ``S^(n+1)``, at least one ``S^n R`` reduction over the output's rows and last extent whose
    reduced axis is contiguous in its reads, every other block spatial over the same rows.
    ``static_k=False`` also accepts a symbolic row length (``compiler.symbolic``)."""
    if len(infos) < 2:
        return False
    out = infos[-1]
    if sch.get_consumers(out.block_rv) or out.dom_kind() != "S" * len(out.dom_kind()):
        return False
    shape = _extents(out)
    if len(shape) < 2 or (static_k and not isinstance(shape[-1], int)):
        return False
    n = len(shape) - 1
    reductions = 0
    for info in infos[:-1]:
        kinds, ext = info.dom_kind(), _extents(info)
        if not sch.get_consumers(info.block_rv):
            return False  # a second output: not one row kernel
        if kinds == "S" * n + "R" and ext == shape:
            if not tiling.contiguous_in_a_read(sch, info.block_rv, n):
                return False  # e.g. a matmul whose unfused epilogue has the same shape
            reductions += 1
        elif kinds not in ("S" * n, "S" * (n + 1)) or ext != shape[:len(kinds)]:
            return False
    return reductions > 0


def _vectorize_last(sch, block, lanes: int, extent: int) -> None:
    loop = sch.get_loops(block)[-1]
    if extent > lanes:
        loop = sch.split(loop, factors=[None, lanes])[-1]
    sch.vectorize(loop)


def schedule_rows(sch, infos, parallel: bool, lanes: int) -> bool:
    """Schedule a row-reduction kernel in place (module docstring); False when it does not fit
    (``K`` symbolic, not a multiple of ``lanes``, or one vector). ``lanes``: fp32 lanes of one
    vector register of the target."""
    if not is_row_reduction(sch, infos):
        return False
    shape = _extents(infos[-1])
    n, k = len(shape) - 1, int(shape[-1])
    # W partial results: two vectors of accumulators where K allows, else one
    partials = next((w for w in (2 * lanes, lanes) if k % w == 0 and k > w), None)
    if partials is None:
        return False
    for info in infos[:-1]:
        if "R" in info.dom_kind():
            ko, ki = sch.split(sch.get_loops(info.block_rv)[-1], factors=[None, partials])
            sch.rfactor(ki, factor_axis=n)  # partials stored [r..., ki]: contiguous vectors
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    out = blocks[-1]
    rows = sch.get_loops(out)[:n]
    row = sch.fuse(*rows) if n > 1 else rows[0]
    for block in reversed(blocks[:-1]):
        sch.compute_at(block, row, preserve_unit_loops=True)
    _vectorize_last(sch, out, lanes, k)
    partial_blocks = []
    for block in blocks[:-1]:
        stmt = sch.get(block)
        kinds = "".join("R" if int(v.iter_type) == 2 else "S" for v in stmt.iter_vars)
        loops = sch.get_loops(block)[1:]
        if stmt.name_hint.endswith("_rf"):  # iter vars (ki, r..., ko): loops in that order
            ki, ko = loops[0], loops[-1]
            sch.reorder(ko, ki)
            sch.vectorize(ki)
            partial_blocks.append((block, ko))
        elif kinds == "S" * (n + 1):  # an elementwise pass kept apart: vectorize its row
            _vectorize_last(sch, block, lanes, k)
    if parallel:  # rows write disjoint outputs; if TVM disagrees the kernel stays serial
        with contextlib.suppress(Exception):
            sch.parallel(row)
    # after vectorize/parallel, which need whole reduction blocks: the partials' init as its
    # own vector loop, ahead of the ko loop
    for block, ko in partial_blocks:
        init = sch.decompose_reduction(block, ko)
        sch.vectorize(sch.get_loops(init)[-1])
    return True


def vector_lanes(tvm_target: Any) -> int:
    """fp32 lanes of one vector register of the target, from its LLVM features."""
    from edgekit.compiler.int8_intrin import cpu_features

    features = cpu_features(tvm_target)
    if "avx512f" in features:
        return 16
    return 8 if "avx" in features or "avx2" in features else 4
