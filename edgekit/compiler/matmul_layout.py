"""Relax pass ``PackMatmulWeights``: float32 matmuls with a constant weight matrix large enough
for the cache-blocked schedule become one kernel over weights re-laid out at compile time
into the panels its micro-kernel reads.

Input: ``R.matmul(x, W)`` with ``x`` float32 ``[..., M, K]`` (``M`` and the batch dims static
or symbolic, ``K`` static) and ``W`` a constant ``[K, N]`` (or ``LAYOUT_OPS`` of constants:
``Gemm``'s ``transB`` transpose, evaluated here). Output: ``R.call_tir`` of

    acc[..., i, j] = sum_k x[..., min(i, M - 1), k] * Wp[j // B, k, j % B]   (i < M', j < N')
    out[..., i, j] = acc[..., i, j]                                    (i < M, j < N)
    Wp[p, k, b]    = W[k, p B + b], 0 past N                 (NumPy, once, at compile time)

``M'`` is ``M`` rounded up to whole register tiles (``mr`` rows), ``N'`` is ``N`` rounded up
to whole panels (GPT-2's 50257-word LM head): the extra rows recompute the last row, the
extra columns multiply zero weights, and neither is ever read, so the micro-kernel has no
tail and no predicate (a symbolic ``M`` cannot be padded by ``pad_einsum``, which needs plain
indices; a predicate on the row tile keeps its accumulators out of registers, ``symbolic``).
Each register tile's weights (``B`` columns, ``B = nv L`` from
``cache_blocking.matmul_tiles``) are one sequential stream in the order the reduction reads
them. ``tiling.tile_blocked`` schedules it as any blocked matmul, minus the per-call copy of
the weight panel: that copy read and wrote every weight on each call (MiniLM's six layers:
42 MB per call, whatever the input length; GPT-2's LM head alone 154 MB).

Applies where ``matmul_tiles`` blocks the matmul (weights over half of L2, at least four row
tiles; for a symbolic ``M`` at ``symbolic.TILE_ROWS`` rows, so always when the weights are
large). The pass and the schedule compute the same tiles (same target, same core count).
Left unchanged: other dtypes, non-constant weights, matmuls the register tile alone serves
(their weights are read once, unpacked), targets other than LLVM CPUs. Sums keep ``k``
order, as the unpacked kernel's do.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tvm
from tvm import relax
from tvm.relax import PyExprMutator, expr_functor

from edgekit.compiler.constant_weights import (
    constant_value,
    current_or_host,
    rewrite_functions,
)
from edgekit.compiler.symbolic import TILE_ROWS, const

MATMUL = "edgekit_matmul_packed"  # kernel name hint of a packed-weight matmul
OUT = "edgekit_matmul_rows"  # its output: the first M of the padded rows


def pack_weights(w: np.ndarray, panel: int) -> np.ndarray:
    """``W[K, N]`` -> ``Wp[ceil(N / panel), K, panel]``, zero columns past ``N``."""
    k, n = w.shape
    panels = -(-n // panel)
    if panels * panel != n:
        w = np.concatenate([w, np.zeros((k, panels * panel - n), w.dtype)], axis=1)
    return np.ascontiguousarray(w.reshape(k, panels, panel).transpose(1, 0, 2))


def _matmul_te(x, wp, mr: int, n: int):
    from tvm import te, tirx

    *batch, m, k_ext = x.shape
    panels, _, panel = (int(d) for d in wp.shape)
    static = const(m)
    if static is not None and static % mr == 0:
        padded, clamp = static, False
    else:
        padded, clamp = (m + mr - 1) // mr * mr, True
    k = te.reduce_axis((0, k_ext), name="k")

    def row(i):  # rows past M (whole register tiles) recompute the last row: never read
        return tirx.min(i, m - 1) if clamp else i

    acc = te.compute(
        (*batch, padded, panels * panel),
        lambda *ax: te.sum(x[(*ax[:-2], row(ax[-2]), k)]
                           * wp[ax[-1] // panel, k, ax[-1] % panel], axis=k),
        name=MATMUL)
    return te.compute((*batch, m, n), lambda *ax: acc[ax], name=OUT)


@expr_functor.mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod, cpu, cores: int):
        super().__init__(mod)
        self.cpu, self.cores = cpu, cores
        self.count = 0

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if getattr(call.op, "name", "") != "relax.matmul" or len(call.args) != 2:
            return call
        out = self._matmul(call, *call.args)
        return call if out is None else out

    def _matmul(self, call, x, w):
        from edgekit.compiler.cache_blocking import matmul_tiles

        shape = getattr(getattr(x.ty, "shape", None), "values", None)
        if (shape is None or len(shape) < 2 or str(getattr(x.ty, "dtype", "")) != "float32"
                or str(call.attrs.out_dtype) not in ("", "None", "void", "float32")):
            return None
        k = const(shape[-1])
        weights = None if k is None else constant_value(w, self.lookup_binding)
        if (weights is None or weights.ndim != 2 or weights.dtype != np.float32
                or weights.shape[0] != k):
            return None
        rows = const(shape[-2])
        tiles = matmul_tiles(TILE_ROWS if rows is None else rows, k, weights.shape[1],
                             self.cpu, self.cores)
        if not tiles.blocked:
            return None
        self.count += 1
        return self.builder_.call_te(_matmul_te, x,
                                     relax.const(pack_weights(weights, tiles.cols)),
                                     tiles.rows, weights.shape[1], primfunc_name_hint=MATMUL)


@tvm.transform.module_pass(opt_level=0, name="edgekit.PackMatmulWeights")
class PackMatmulWeights:
    """float32 matmuls with large constant weights -> packed-weight kernels (module
    docstring). ``target``: the TVM target whose vector width, registers, caches and core
    count size the panels (default: the current target, else this machine's CPU)."""

    def __init__(self, target: Any = None):
        self.target = target

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        from edgekit.compiler import machine

        target = self.target or current_or_host()
        if target.kind.name != "llvm":  # GPUs keep the matmul op for their own scheduler
            return mod
        rewriter = _Rewriter(mod, machine.describe(target), machine.cores(target))
        return rewrite_functions(rewriter, mod)
