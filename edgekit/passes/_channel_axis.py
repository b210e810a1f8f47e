"""Where a per-channel axis goes through layout ops (the BatchNorm-family passes' walk).

A per-channel affine ``y = s·x + t`` along ``axis`` commutes with ops that only move or select
whole channels: Transpose (the axis moves to ``perm.index(axis)``), Reshape/Flatten/Squeeze/
Unsqueeze that keep the axis whole (same size, same number of elements before it), ReduceMean
over other axes, and Gather/Slice on other axes. ``axis_forward`` follows the axis from an op's
input to its output, ``axis_backward`` from output to input; None means it does not commute.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from edgekit.passes._ir import const_array

RESHAPES = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")


def channel_vector(arr: np.ndarray, rank: int, axis: int) -> np.ndarray | None:
    """``arr`` as a per-channel vector if it broadcasts only along ``axis`` of a rank tensor."""
    if arr.ndim > rank:
        return None
    shape = (1,) * (rank - arr.ndim) + arr.shape
    if any(d != 1 for i, d in enumerate(shape) if i != axis):
        return None
    return arr.astype(np.float64).reshape(-1)


def rank_of(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


def reshape_axis(src: ir.Value, dst: ir.Value, axis: int) -> int | None:
    """Where ``axis`` of ``src`` lands in ``dst``: same size, same elements before it."""
    dims = [list(v.shape) if v.shape is not None else [None] for v in (src, dst)]
    if not all(isinstance(d, int) for d in dims[0] + dims[1]):
        return None
    before, size, acc = math.prod(dims[0][:axis]), dims[0][axis], 1
    for j, d in enumerate(dims[1]):
        if acc == before and d == size:
            return j
        acc *= d
        if acc > before:
            return None
    return None


def _ints(node: ir.Node, name: str, input_index: int) -> list[int] | None:
    """An ints attribute, or the same list given as a constant input (newer opsets)."""
    if node.attributes.get(name) is not None:
        return list(node.attributes.get_ints(name))
    arr = const_array(node.inputs[input_index]) if len(node.inputs) > input_index else None
    return None if arr is None else [int(i) for i in arr.reshape(-1)]


def axis_forward(node: ir.Node, axis: int) -> int | None:
    """The channel axis of ``node``'s output if ``node`` commutes with the affine on input 0."""
    rank = rank_of(node.inputs[0])
    if node.op_type == "Transpose":
        perm = node.attributes.get_ints("perm") or list(reversed(range(rank or 0)))
        return list(perm).index(axis) if axis in perm else None
    if node.op_type in RESHAPES:
        return reshape_axis(node.inputs[0], node.outputs[0], axis)
    if rank is None:
        return None
    if node.op_type == "ReduceMean":  # mean(a*x + b) = a*mean(x) + b off the channel axis
        axes = [a % rank for a in _ints(node, "axes", 1) or []]
        if not axes or axis in axes:
            return None
        kept = node.attributes.get_int("keepdims", 1)
        return axis if kept else axis - sum(a < axis for a in axes)
    if node.op_type == "Gather":
        gather, indices = node.attributes.get_int("axis", 0) % rank, rank_of(node.inputs[1])
        if gather == axis or indices is None:
            return None
        return axis if axis < gather else axis - 1 + indices
    if node.op_type == "Slice":
        starts = _ints(node, "starts", 1)
        axes = _ints(node, "axes", 3) or list(range(len(starts or [])))
        return None if starts is None or axis in [a % rank for a in axes] else axis
    return None


def axis_backward(node: ir.Node, axis: int) -> int | None:
    if node.op_type == "Transpose":
        rank = rank_of(node.inputs[0]) or 0
        perm = node.attributes.get_ints("perm") or list(reversed(range(rank)))
        return perm[axis] if axis < len(perm) else None
    return reshape_axis(node.outputs[0], node.inputs[0], axis)
