"""Relax pass ``Int8Kernels``: int8 x int8 -> int32 matmuls and convolutions with constant
weights become kernels over weights packed at compile time, run on the CPU's integer
dot-product instruction (``int8_intrin``) by their schedule (``int8_schedule``).

Input (what ``LowerQDQ`` emits): ``R.matmul(x, W, out_dtype="int32")`` with ``x`` int8/uint8
``[..., M, K]`` and ``W`` an int8 constant ``[K, N]``; ``R.nn.conv2d(x, W, out_dtype="int32")``
with an int8 constant kernel, groups 1, NCHW or NHWC: a GEMM over output pixels and
``k = (kh KW + kw) Cp + c`` read in place from the padded activations (no im2col), written
NHWC (an NCHW conv reads NCHW in its conversion block and is transposed back after).

Output: ``R.call_tir`` of one kernel with two blocks (matmul form shown),

    a[..., m, k]   = x[..., m, k] + shift, as a_dtype (0 for K <= k < Kp)  (``PACK``)
    out[..., m, n] = sum_{k < Kp} a[..., m, k] * Wp[n // c, k // g, n % c, k % g]  (``GEMM``)

``Wp`` (NumPy, ``pack_weights``), ``a_dtype`` and ``shift`` are those of the target's
instruction (``int8_intrin.Layout``; per kernel, a faster one the target also runs where the
weights fit it exactly: ``int8_intrin.for_weights``). A non-zero shift is undone by an int32
``- shift * colsum(W)`` after the call; ``N`` not a multiple of the panel width ``c``: the
kernel computes the zero-padded columns and a ``strided_slice`` cuts them off. Both are
elementwise/injective, so FuseOps fuses them with the float epilogue (astype, scale, bias)
into the kernel, whose op pattern is ``kOutEWiseFusable`` (one reduction after an injective
producer). Integer sums are exact: the schedule may reorder them freely.

The layout is chosen from the target in effect when the pass runs (``Int8Kernels(target)``,
else ``tvm.target.Target.current()``, else this machine's CPU); the schedule re-checks the
target it compiles for, and a target without the instruction gets plain vectorized loops
over the same layout (still exact).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tvm
from tvm import relax
from tvm.relax import PyExprMutator, expr_functor

from edgekit.compiler import int8_intrin
from edgekit.compiler.constant_weights import current_or_host, rewrite_functions
from edgekit.compiler.int8_intrin import Layout
from edgekit.compiler.int8_schedule import GEMM, NCHW_OUT, PACK


def pack_weights(w: np.ndarray, layout: Layout) -> np.ndarray:
    """``W[K, N]`` int8 -> ``Wp[ceil(N/c), ceil(K/g), c, g]``, zero-padded."""
    k, n = w.shape
    c, g = layout.cols, layout.group
    kp, np_ = -(-k // g) * g, -(-n // c) * c
    padded = np.zeros((kp, np_), np.int8)
    padded[:k, :n] = w
    return np.ascontiguousarray(padded.reshape(kp // g, g, np_ // c, c).transpose(2, 0, 3, 1))


def _gemm_te(x, wp, k_real: int, cols: int, layout: Layout):
    """The matmul kernel of the module docstring (TE, for ``call_te``)."""
    from tvm import te, tirx

    lead = list(x.shape[:-1])
    kp = int(wp.shape[1]) * layout.group
    zero = tirx.const(0, layout.a_dtype)  # padded K: zero weights there, any value works
    shift = layout.shift(str(x.dtype))

    def pack(*i):
        # x + shift in the other signedness: exact through int16
        value = (x(*i).astype("int16") + shift).astype(layout.a_dtype) if shift \
            else x(*i).astype(layout.a_dtype)
        return value if kp == k_real else tirx.if_then_else(i[-1] < k_real, value, zero)

    a = te.compute((*lead, kp), pack, name=PACK)
    r = te.reduce_axis((0, kp), name="k")
    c, g = layout.cols, layout.group
    return te.compute(
        (*lead, cols),
        lambda *i: te.sum(a(*i[:-1], r).astype("int32")
                          * wp[i[-1] // c, r // g, i[-1] % c, r % g].astype("int32"), axis=r),
        name=GEMM)


def _conv_te(x, wp, layout: Layout, cols: int, cp: int, ksize, strides, dilation, padding,
             nchw: bool):
    """The conv kernel, NHWC out: ``a`` = the padded, converted activations in NHWC (read
    from NCHW ``x`` too: the conversion pass doubles as the layout change);
    ``out[b, i, j, o] = sum_{r, s, c} a[b, i sh + r dh, j sw + s dw, c]
    * Wp[o // lanes, (r KW + s) Cp/g + c // g, o % lanes, c % g]``."""
    from tvm import te, tirx

    n, h, w, c = (int(d) for d in x.shape) if not nchw else (
        int(x.shape[0]), int(x.shape[2]), int(x.shape[3]), int(x.shape[1]))
    top, left, bottom, right = padding
    shift = layout.shift(str(x.dtype))
    fill = tirx.const(shift, layout.a_dtype)  # a padded zero, shifted like every activation

    def pack(b, i, j, ch):
        # clamped indices: a vectorized select may load both sides
        at = (tirx.max(tirx.min(i - top, h - 1), 0), tirx.max(tirx.min(j - left, w - 1), 0),
              tirx.min(ch, c - 1))
        src = x[b, at[2], at[0], at[1]] if nchw else x[b, *at]
        value = (src.astype("int16") + shift).astype(layout.a_dtype)
        inside = tirx.all(i >= top, i < top + h, j >= left, j < left + w, ch < c)
        return tirx.if_then_else(inside, value, fill)

    a = te.compute((n, h + top + bottom, w + left + right, cp), pack, name=PACK)
    (kh, kw), (sh, sw), (dh, dw) = ksize, strides, dilation
    oh = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
    ow = (w + left + right - dw * (kw - 1) - 1) // sw + 1
    r, s = te.reduce_axis((0, kh), name="r"), te.reduce_axis((0, kw), name="s")
    rc = te.reduce_axis((0, cp), name="c")
    lanes, g = layout.cols, layout.group
    acc = te.compute(
        (n, oh, ow, cols),
        lambda b, i, j, o: te.sum(
            a[b, i * sh + r * dh, j * sw + s * dw, rc].astype("int32")
            * wp[o // lanes, (r * kw + s) * (cp // g) + rc // g, o % lanes, rc % g]
            .astype("int32"), axis=[r, s, rc]),
        name=GEMM)
    if not nchw:
        return acc
    # NCHW out, written from the register tile (a separate transpose kernel costs more)
    return te.compute((n, cols, oh, ow), lambda b, o, i, j: acc[b, i, j, o], name=NCHW_OUT)


def _static_shape(expr) -> list[int] | None:
    values = getattr(getattr(expr.ty, "shape", None), "values", None)
    if values is None:
        return None
    try:
        return [int(d) for d in values]
    except (TypeError, AttributeError):  # a symbolic dimension
        return None


@expr_functor.mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod, target: Any):
        super().__init__(mod)
        self.target = target
        self.layout: Layout | None = None  # chosen at the first match (no target lookup else)
        self.count = 0

    def visit_call_(self, call):
        call = super().visit_call_(call)
        name = getattr(call.op, "name", "")
        if name not in ("relax.matmul", "relax.nn.conv2d"):
            return call
        if str(call.attrs.out_dtype) != "int32" or len(call.args) != 2:
            return call
        x, w = call.args
        if (not isinstance(w, tvm.ir.expr.Constant) or str(w.ty.dtype) != "int8"
                or str(getattr(x.ty, "dtype", "")) not in ("int8", "uint8")
                or _static_shape(x) is None):
            return call
        out = self._matmul(x, w) if name == "relax.matmul" else self._conv(call, x, w)
        return call if out is None else out

    def _layout(self) -> Layout:
        self.count += 1
        if self.layout is None:
            self.layout = int8_intrin.choose(self.target or current_or_host())
        return self.layout

    def _finish(self, y, layout: Layout, x_dtype: str, matrix: np.ndarray, cols: int,
                axis: int = -1):
        """Compensation of the activation shift, then the padding columns (output channels
        along ``axis``) cut off; FuseOps fuses both with the epilogue."""
        shift, n = layout.shift(x_dtype), matrix.shape[1]
        ndim = len(y.ty.shape.values)
        axis %= ndim
        if shift:  # sum (x + shift) w - shift sum w
            colsum = np.zeros(cols, np.int64)
            colsum[:n] = matrix.astype(np.int64).sum(axis=0)
            const = (shift * colsum).astype(np.int32).reshape([-1] + [1] * (ndim - 1 - axis))
            y = self.builder_.emit(relax.op.subtract(y, relax.const(const)))
        if cols == n:
            return y
        return relax.op.strided_slice(y, [axis], [0], [n])

    def _gemm(self, x, matrix: np.ndarray):
        layout = int8_intrin.for_weights(self._layout(), matrix)
        k = matrix.shape[0]
        wp = pack_weights(matrix, layout)
        cols = wp.shape[0] * layout.cols  # whole panels: the tiles need no column tail
        y = self.builder_.emit(self.builder_.call_te(
            lambda a, b: _gemm_te(a, b, k, cols, layout), x, relax.const(wp),
            primfunc_name_hint=GEMM))
        return self._finish(y, layout, str(x.ty.dtype), matrix, cols)

    def _matmul(self, x, w):
        weight = w.value.numpy()
        shape = _static_shape(x)
        if weight.ndim != 2 or len(shape) < 2 or shape[-1] != weight.shape[0]:
            return None
        return self._gemm(x, weight)

    def _conv(self, call, x, w):
        a = call.attrs
        weight = w.value.numpy()
        data, kernel = str(a.data_layout), str(a.kernel_layout)
        if (weight.ndim != 4 or int(a.groups) != 1 or data not in ("NCHW", "NHWC")
                or str(a.out_layout) != data or kernel not in ("OIHW", "HWIO")):
            return None
        hwio = weight.transpose(2, 3, 1, 0) if kernel == "OIHW" else weight
        nchw = data == "NCHW"
        if hwio.shape[2] != _static_shape(x)[1 if nchw else 3]:
            return None
        strides = tuple(int(v) for v in a.strides)
        dilation = tuple(int(v) for v in a.dilation)
        padding = tuple(int(v) for v in a.padding)
        return self._direct(x, hwio, strides, dilation, padding, nchw)

    def _direct(self, x, hwio: np.ndarray, strides, dilation, padding, nchw: bool):
        """A KH x KW conv as the GEMM over ``k = (kh KW + kw) Cp + c`` (channels padded to
        the layout's group), reading the padded activations in place (no im2col)."""
        layout = self._layout()
        kh, kw, c, o = hwio.shape

        def gemm_matrix(group: int) -> np.ndarray:  # channels zero-padded to the group
            cp = -(-c // group) * group
            padded = np.zeros((kh, kw, cp, o), np.int8)
            padded[:, :, :c] = hwio
            return padded.reshape(kh * kw * cp, o)

        # checked in the faster layout's rows: its pairs are the target layout's pairs too
        layout = int8_intrin.for_weights(layout, gemm_matrix(int8_intrin.AVX2_U8S8.group))
        cp = -(-c // layout.group) * layout.group
        matrix = gemm_matrix(layout.group)
        wp = pack_weights(matrix, layout)
        cols = wp.shape[0] * layout.cols
        y = self.builder_.emit(self.builder_.call_te(
            lambda a, b: _conv_te(a, b, layout, cols, cp, (kh, kw), strides, dilation,
                                  padding, nchw), x, relax.const(wp),
            primfunc_name_hint=GEMM))
        return self._finish(y, layout, str(x.ty.dtype), matrix, cols, 1 if nchw else 3)


@tvm.transform.module_pass(opt_level=0, name="edgekit.Int8Kernels")
class Int8Kernels:
    """int8 matmuls and 1x1 convs with constant weights -> packed-weight integer kernels
    (see the module docstring). ``target``: the TVM target whose instruction picks the
    weight layout (default: the current target, else this machine's CPU)."""

    def __init__(self, target: Any = None):
        self.target = target

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        target = self.target or current_or_host()
        if target.kind.name != "llvm":  # GPUs keep the int32 matmul for their own scheduler
            return mod
        rewriter = _Rewriter(mod, target)
        return rewrite_functions(rewriter, mod)

