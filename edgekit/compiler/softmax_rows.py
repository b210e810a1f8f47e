"""Softmax over a symbolic last axis (attention over ``seq`` keys), or over a static one that
is not whole vectors (ViT's 197 tokens), as a kernel whose row reductions run in vector
registers, and its schedule (``FastMath`` emits it; ``schedules`` and ``symbolic`` run it).

TOPI's softmax reduces each row with one scalar accumulator: LLVM may not reorder a float
sum or max, so the loop stays scalar, the polynomial ``exp`` inside it too (measured 4.9x the
static kernel at 128 keys). A static row of whole vectors is split into vector-wide partial
sums by ``reductions.schedule_rows``; these rows cannot be split without a predicate in the
vector loop. So the kernel states the split itself, ``P`` lanes, ``n`` keys,
``F = n - n mod P``:

    pmax[r, l] = max_{k < n / P} x[r, k P + l]          (l < P: P vector lanes)
    tmax[r]    = max_{t < n - F} x[r, F + t]            (the tail, under P keys)
    m[r]       = max(max_l pmax[r, l], tmax[r])
    e[r, j]    = fast_exp(x[r, j] - m[r])               (as TOPI's ``fast_softmax``)
    psum, tsum likewise over e;   out[r, j] = e[r, j] / (sum_l psum[r, l] + tsum[r])

Schedule: one loop over rows (parallel when the kernel is large), every block computed at the
row while it is in L1; the partials' lane loop innermost and vectorized; every reduction's
initial value written ahead of its loop (the main and the tail loops are empty for some
``n``); ``e`` inlined (recomputed by the sum and by the output, as the static kernel does,
rather than a per-row buffer of symbolic size). Only the order of the max and sum terms
changes (rounding).
"""

from __future__ import annotations

import contextlib

PREFIX = "edgekit_softmax_rows"  # block names of the kernel: how the scheduler finds it
_REDUCTIONS = ("_pmax", "_tmax", "_lmax", "_psum", "_tsum", "_lsum")


def softmax_te(x, parts: int):
    """The kernel of the module docstring for the last axis of ``x`` (a TE tensor)."""
    from tvm import te, tirx, topi

    *rows, n = x.shape
    full = n // parts * parts
    ko = te.reduce_axis((0, n // parts), name="ko")
    kt = te.reduce_axis((0, n - full), name="kt")

    def lanes(value, name):
        return te.compute((*rows, parts), lambda *i: value(i[:-1], ko * parts + i[-1], ko),
                          name=f"{PREFIX}_{name}")

    def tail(value, name):
        return te.compute(rows, lambda *r: value(r, full + kt, kt), name=f"{PREFIX}_{name}")

    def across(partial, reduce, name):
        lane = te.reduce_axis((0, parts), name="lane")
        return te.compute(rows, lambda *r: reduce(partial[(*r, lane)], axis=lane),
                          name=f"{PREFIX}_{name}")

    pmax = lanes(lambda r, j, k: te.max(x[(*r, j)], axis=k), "pmax")
    tmax = tail(lambda r, j, k: te.max(x[(*r, j)], axis=k), "tmax")
    lmax = across(pmax, te.max, "lmax")
    shifted = te.compute(x.shape, lambda *i: x[i] - tirx.max(lmax[i[:-1]], tmax[i[:-1]]),
                         name=f"{PREFIX}_shifted")
    e = topi.fast_exp(shifted)
    psum = lanes(lambda r, j, k: te.sum(e[(*r, j)], axis=k), "psum")
    tsum = tail(lambda r, j, k: te.sum(e[(*r, j)], axis=k), "tsum")
    lsum = across(psum, te.sum, "lsum")
    return te.compute(x.shape, lambda *i: e[i] / (lsum[i[:-1]] + tsum[i[:-1]]),
                      name=f"{PREFIX}_norm")


def schedule(sch, parallel: bool) -> bool:
    """Schedule the kernel in place (module docstring); False, nothing changed, when ``sch``
    is not this kernel."""
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    names = [sch.get(b).name_hint for b in blocks]
    if f"{PREFIX}_psum" not in names:
        return False
    for block, name in zip(blocks[:-1], names[:-1], strict=True):
        # x - m, its exp, the normalise pass when an epilogue follows (a fused isnan/where):
        # recomputed where read; the partials and the output stay
        if not name.endswith(_REDUCTIONS):
            sch.compute_inline(block)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    out = blocks[-1]
    n = len(sch.get_loops(out)) - 1
    rows = sch.get_loops(out)[:n]
    row = sch.fuse(*rows) if n > 1 else rows[0]
    for block in reversed(blocks[:-1]):
        sch.compute_at(block, row, preserve_unit_loops=True)
    for block in blocks[:-1]:
        name = sch.get(block).name_hint
        if name.endswith(("_pmax", "_psum")):
            *_, lane, k = sch.get_loops(block)
            sch.reorder(k, lane)
            sch.vectorize(lane)
            init = sch.decompose_reduction(block, k)
            sch.vectorize(sch.get_loops(init)[-1])
        elif name.endswith(("_tmax", "_tsum")):
            # the init ahead of the loop: TIR runs a reduction's init in its first iteration,
            # and the tail is empty when P divides n
            sch.decompose_reduction(block, sch.get_loops(block)[-1])
    if parallel:  # rows write disjoint outputs
        with contextlib.suppress(Exception):
            sch.parallel(row)
    return True
