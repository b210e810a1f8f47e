"""transposes: an elementwise kernel reading an input transposed loops the input's contiguous
axis next to the output's innermost one (then the generic vector rule); structure, numerics,
the refusals."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax, s_tir
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.script import relax as R

from edgekit.compiler import pipeline, schedules
from edgekit.compiler.build import build
from edgekit.targets import load_target

SCALE = np.float32(0.5)


def _module(shape, axes):
    """main(x) = relu(permute_dims(x, axes) * 0.5 + 1): a BatchNorm-like epilogue."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.permute_dims(x, axes))
            y = bb.emit(relax.op.add(relax.op.multiply(y, relax.const(SCALE)),
                                     relax.const(np.float32(1))))
            out = bb.emit_output(relax.op.nn.relu(y))
        bb.emit_func_output(out)
    return bb.get()


def _schedule(mod) -> tuple[bool, str, list[int]]:
    """(taken, the kernel's text, its loop extents outermost first)."""
    lowered = pipeline.lower(mod, load_target("host").tvm_target())
    (func,) = [f for _, f in lowered.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    sch = s_tir.Schedule(func)
    schedules._inline_epilogues(sch, normalize_prim_func(sch))
    (info,) = normalize_prim_func(sch)
    taken = schedules._transposed(sch, info, cores=2)
    extents = [int(sch.get(lp).extent) for lp in sch.get_loops(info.block_rv)]
    return taken, sch.mod["main"].script(), extents


@pytest.mark.parametrize("shape, axes", [
    ((1, 12, 10, 16), (0, 3, 1, 2)),  # NHWC -> NCHW: loops n, h, c, w
    ((6, 5, 24), (2, 0, 1)),  # innermost input axis -> outermost output axis
    ((1, 9, 7, 13), (0, 3, 1, 2)),  # odd widths: masked last vector
])
def test_loop_order_and_numerics(shape, axes):
    mod = _module(shape, axes)
    taken, text, extents = _schedule(mod)
    assert taken and "T.vectorized" in text
    # the output loop over the input's last axis sits right outside the (split) inner one
    out_shape = [shape[a] for a in axes]
    inner = out_shape[-1]
    split = 1 if inner <= 4 or inner in (8, 16) else 2  # the generic rule: vectors of 4-16
    assert extents[-split - 1] == out_shape[axes.index(len(shape) - 1)]
    assert inner <= int(np.prod(extents[-split:])) < inner + 8  # a masked last vector
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    vm = relax.VirtualMachine(build(mod, load_target("host")), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    want = np.maximum(x.transpose(axes) * SCALE + np.float32(1), 0)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("axes", [(0, 1, 3, 2), (0, 1, 2, 3)])
def test_refused_when_the_contiguous_axis_is_already_inner(axes):
    """Input's last axis read by the output's innermost loop or the one right outside it
    (NCHW -> NHWC-like reads are already row by row): the generic rule stays."""
    taken, _, _ = _schedule(_module((1, 8, 6, 16), axes))
    assert not taken
