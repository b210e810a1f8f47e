"""pieces: concatenations and channel shuffles along the innermost axis get unrolled segments /
shuffle lanes instead of lane-by-lane selects; structure, numerics, the refusals."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.script import relax as R

from edgekit.compiler import pieces, pipeline, schedules
from edgekit.compiler.build import build
from edgekit.targets import load_target


def _module(widths, shuffle: int = 0, relu: bool = True):
    """main(x_i [1, 5, 6, w_i]) = [shuffle](relu(concat(x_i, axis=-1)))."""
    bb = relax.BlockBuilder()
    xs = [relax.Var(f"x{i}", R.Tensor((1, 5, 6, w), "float32")) for i, w in enumerate(widths)]
    total = sum(widths)
    with bb.function("main", xs):
        with bb.dataflow():
            y = bb.emit(relax.op.concat(xs, axis=-1))
            if relu:
                y = bb.emit(relax.op.nn.relu(y))
            if shuffle:
                y = bb.emit(relax.op.reshape(y, (1, 5, 6, shuffle, total // shuffle)))
                y = bb.emit(relax.op.permute_dims(y, [0, 1, 2, 4, 3]))
                y = bb.emit(relax.op.reshape(y, (1, 5, 6, total)))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _reference(xs, shuffle: int) -> np.ndarray:
    y = np.maximum(np.concatenate(xs, axis=-1), 0)
    if shuffle:
        n = y.shape[-1]
        y = y.reshape(1, 5, 6, shuffle, n // shuffle).transpose(0, 1, 2, 4, 3).reshape(y.shape)
    return y


def _kernel(mod):
    target = load_target("host").tvm_target()
    lowered = pipeline.lower(mod, target)
    (func,) = [f for _, f in lowered.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    return func


def _scheduled_by_pieces(func) -> tuple[bool, str]:
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    schedules._inline_epilogues(sch, normalize_prim_func(sch))
    (info,) = normalize_prim_func(sch)
    taken = pieces.schedule(sch, info, cores=2, min_parallel_work=1 << 20)
    return taken, sch.mod["main"].script()


@pytest.mark.parametrize("widths, shuffle, copies", [
    ((34, 34, 34), 0, 3),  # ShuffleNet's split groups: 3 segments of 34
    ((64, 96, 32, 32), 0, 7),  # Inception: gcd 32, 7 segments
    ((34, 34, 34, 34), 4, 4),  # concat + shuffle of 4 groups: 4 lanes
    ((24, 24), 2, 2),
])
def test_structure_and_numerics(widths, shuffle, copies):
    mod = _module(widths, shuffle)
    taken, text = _scheduled_by_pieces(_kernel(mod))
    assert taken and f"T.unroll(T.int64({copies}))" in text and "T.vectorized" not in text
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((1, 5, 6, w)).astype(np.float32) for w in widths]
    vm = relax.VirtualMachine(build(mod, load_target("host")), tvm.cpu())
    got = vm["main"](*[tvm.runtime.tensor(x) for x in xs]).numpy()
    np.testing.assert_array_equal(got, _reference(xs, shuffle))  # the same expression


def _block(mod):
    from tvm import s_tir

    sch = s_tir.Schedule(_kernel(mod))
    schedules._inline_epilogues(sch, normalize_prim_func(sch))
    (info,) = normalize_prim_func(sch)
    return sch.get(info.block_rv)


def test_bounds_and_divisors_are_found():
    block = _block(_module((34, 34, 34, 34), 4))
    divisors, _ = pieces.pieces(block.body, block.iter_vars[-1].var)
    assert 4 in divisors
    block = _block(_module((34, 34, 34)))
    assert pieces.pieces(block.body, block.iter_vars[-1].var) == (set(), {34, 68})


@pytest.mark.parametrize("widths", [(34, 34, 20), (40,)])
def test_refused_without_pieces_or_with_too_many(widths):
    """(34, 34, 20): gcd 2, 44 segments, too many to unroll; one input: a plain ReLU. Both
    keep the generic vectorized rule."""
    taken, text = _scheduled_by_pieces(_kernel(_module(widths)))
    assert not taken and "T.unroll" not in text
