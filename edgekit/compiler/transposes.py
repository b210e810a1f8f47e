"""Default schedule of elementwise kernels that read an input transposed: the loop over the
input's innermost (contiguous) axis moves next to the output's innermost loop.

A kernel ``out[c, h, w] = f(x[h, w, c])`` (an NHWC -> NCHW transpose, often with a
BatchNorm and ReLU fused in: Inception v2 between its channels-last convs and its NCHW
concatenations) loops ``c, h, w`` and vectorizes ``w``: each vector gathers 16 floats ``C``
apart, and for every ``c`` the whole input streams through the cache again (64 passes over
3.2 MB for Inception v2's first one: 1.0 ms). Looping ``h, c, w`` instead reads one input row
``x[h]`` (``W x C`` floats, 28 KB there) ``C`` times while it sits in L1, and writes whole
output rows: 0.24 ms, the same elements in another order.

Rule: in an elementwise block, take the largest input whose innermost index is one loop
variable ``u`` that is neither the output's innermost loop ``v`` nor the loop right outside
it; move ``u``'s loop to just outside ``v``'s, vectorize ``v`` (a masked last vector when no
width divides it) and run the fused outer loops in parallel from ``~1M`` elements.
"""

from __future__ import annotations

import contextlib
import math

_VECTOR = (16, 8, 4)


def _extent(sch, loop) -> int | None:
    from tvm import tirx

    extent = sch.get(loop).extent
    return int(extent.value) if isinstance(extent, tirx.IntImm) else None


def _transposed_axis(sch, info) -> int | None:
    """Index (in loop order) of the loop to move, or None when no input is read transposed."""
    block = sch.get(info.block_rv)
    variables = [iv.var for iv in block.iter_vars]
    output = block.writes[0].source
    best, size = None, 0
    for region in block.reads:
        buffer = region.source
        if buffer.same_as(output) or len(region.region) < 2:
            continue
        last = region.region[-1].min
        axis = next((i for i, v in enumerate(variables) if v.same_as(last)), None)
        elements = math.prod(int(d) for d in buffer.shape)
        if axis is not None and axis < len(variables) - 2 and elements > size:
            best, size = axis, elements
    return best


def schedule(sch, info, cores: int, min_parallel_work: int) -> bool:
    """Schedule one elementwise block as the module docstring says; False (nothing changed)
    when it reads no input transposed."""
    if set(info.dom_kind()) != {"S"}:
        return False
    loops = sch.get_loops(info.block_rv)
    extents = [_extent(sch, lp) for lp in loops]
    block = sch.get(info.block_rv)
    if (len(loops) != len(block.iter_vars) or any(e is None for e in extents)
            or [int(iv.dom.extent) for iv in block.iter_vars] != extents):
        return False  # loops and block axes not one to one, in order
    axis = _transposed_axis(sch, info)
    if axis is None:
        return False
    order = [lp for i, lp in enumerate(loops) if i not in (axis, len(loops) - 1)]
    sch.reorder(*order, loops[axis], loops[-1])
    n = extents[-1]
    lanes = next((v for v in _VECTOR if n % v == 0), 8 if n > 8 else None)
    if lanes is not None and n > lanes:
        _, vec = sch.split(loops[-1], [None, lanes])
    else:
        vec = loops[-1]
    sch.vectorize(vec)
    if cores > 1 and math.prod(extents) >= min_parallel_work:
        fused = sch.fuse(*order) if len(order) > 1 else (order[0] if order else None)
        with contextlib.suppress(Exception):  # e.g. a loop that cannot be parallel
            if fused is not None:
                sch.parallel(fused)
    return True
