"""Relax pass ``PackConvWeights``: float32 NHWC convolutions with constant weights become one
kernel over weights re-laid out at compile time into the panels its micro-kernel reads.

Input (what ``ChannelsLast`` leaves): ``R.nn.conv2d(x, W)`` with ``x`` float32 NHWC of static
shape, ``W`` a constant HWIO ``[KH, KW, C, O]`` (or ``permute_dims`` of the ONNX OIHW constant,
evaluated here), groups 1, any strides, dilation and padding.

Output: ``R.call_tir`` of one kernel (``conv_schedule`` states and schedules it)

    acc[n, i OW + j, o] = sum_{r, s, c} xp[n, i sh + r dh, j sw + s dw, c]
                                        * Wp[o // B, r, s, c, o % B]
    Wp[p, r, s, c, b]   = W[r, s, c, p B + b]           (NumPy, once, at compile time)

so one panel (``B`` output channels, the register tile's width) is contiguous in the order the
reduction reads it. ``xp`` is ``x`` zero-padded, a block of the same kernel (convs without
padding read ``x``). ``Wp`` is a Relax constant: the module holds no per-call packing kernel.
The kernel's op pattern stays a reduction with an elementwise output (``kOutEWiseFusable``), so
FuseOps fuses bias, BatchNorm, activation and residual add into it as before.

``B = V L``: ``L`` fp32 lanes of one vector register, ``V`` vectors of the tile chosen for the
shape (``conv_schedule.tile_shape``), both from the target in effect (its LLVM features; never
this machine's CPU unless it is the target). Left unchanged (the generic schedule handles
them): grouped and depthwise convs, non-float32, a weight that is not a constant, output
channels not a multiple of ``L``, symbolic shapes, and targets other than LLVM CPUs.

Sums are in the same order (r, s, c) as the unscheduled NHWC conv.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tvm
from tvm import relax
from tvm.relax import PyExprMutator, expr_functor

from edgekit.compiler import conv_schedule
from edgekit.compiler.constant_weights import (
    constant_value,
    current_or_host,
    rewrite_functions,
)
from edgekit.compiler.conv_schedule import CONV, NHWC, PAD


def pack_weights(hwio: np.ndarray, panel: int) -> np.ndarray:
    """``W[KH, KW, C, O]`` -> ``Wp[O / panel, KH, KW, C, panel]`` (``O`` a multiple of
    ``panel``)."""
    kh, kw, c, o = hwio.shape
    return np.ascontiguousarray(hwio.reshape(kh, kw, c, o // panel, panel)
                                .transpose(3, 0, 1, 2, 4))


def _conv_te(x, wp, strides, dilation, padding, rows: int):
    """The kernel of the module docstring (TE, for ``call_te``)."""
    from tvm import te, tirx

    n, h, w, _ = (int(d) for d in x.shape)
    panels, kh, kw, c, panel = (int(d) for d in wp.shape)
    top, left, bottom, right = padding
    (sh, sw), (dh, dw) = strides, dilation
    oh = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
    ow = (w + left + right - dw * (kw - 1) - 1) // sw + 1
    r, s = te.reduce_axis((0, kh), name="r"), te.reduce_axis((0, kw), name="s")
    rc = te.reduce_axis((0, c), name="c")
    src = x
    if any(padding):
        # the padded input, once per call inside the kernel: predicated loads in the
        # reduction (if_then_else or a select) compiled to branches and spills in the
        # innermost loop and ran at a third of this (docs/performance.md)
        def padded(b, y, z, ch):
            inside = tirx.all(y >= top, y < top + h, z >= left, z < left + w)
            return tirx.if_then_else(inside, x[b, y - top, z - left, ch],
                                     tirx.const(0.0, "float32"))

        src = te.compute((n, h + top + bottom, w + left + right, c), padded, name=PAD)

    # pixels as one axis m = i OW + j: the schedule's row tiles may cross image rows
    # rows >= OH OW: whole row tiles; the extra rows recompute the last pixel (never read)
    last = oh * ow - 1

    def pixel(m):
        return m if rows == oh * ow else tirx.min(m, last)

    acc = te.compute(
        (n, rows, panels * panel),
        lambda b, m, o: te.sum(
            src[b, pixel(m) // ow * sh + r * dh, pixel(m) % ow * sw + s * dw, rc]
            * wp[o // panel, r, s, rc, o % panel], axis=[r, s, rc]),
        name=CONV)
    return te.compute((n, oh, ow, panels * panel), lambda b, i, j, o: acc[b, i * ow + j, o],
                      name=NHWC)


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
    def __init__(self, mod, lanes: int, registers: int):
        super().__init__(mod)
        self.lanes, self.registers = lanes, registers
        self.count = 0

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if getattr(call.op, "name", "") != "relax.nn.conv2d" or len(call.args) != 2:
            return call
        out = self._conv(call, *call.args)
        return call if out is None else out

    def _conv(self, call, x, w):
        a = call.attrs
        hwio = constant_value(w, self.lookup_binding)
        if (hwio is None or int(a.groups) != 1
                or (str(a.data_layout), str(a.kernel_layout), str(a.out_layout))
                != ("NHWC", "HWIO", "NHWC")
                or hwio.dtype != np.float32 or str(getattr(x.ty, "dtype", "")) != "float32"
                or str(a.out_dtype) not in ("None", "", "float32", "void")):
            return None
        shape, out = _static_shape(x), _static_shape(call)
        if shape is None or out is None or hwio.ndim != 4 or hwio.shape[2] != shape[3]:
            return None
        o = hwio.shape[3]
        if o % self.lanes:
            return None
        _, vectors = conv_schedule.tile_shape(out[1] * out[2], o // self.lanes, self.registers)
        rows = conv_schedule.padded_rows(out[1] * out[2], vectors, self.registers)
        wp = pack_weights(hwio, vectors * self.lanes)
        strides = tuple(int(v) for v in a.strides)
        dilation = tuple(int(v) for v in a.dilation)
        padding = tuple(int(v) for v in a.padding)
        self.count += 1
        return self.builder_.call_te(
            lambda t, p: _conv_te(t, p, strides, dilation, padding, rows), x, relax.const(wp),
            primfunc_name_hint=CONV)


@tvm.transform.module_pass(opt_level=0, name="edgekit.PackConvWeights")
class PackConvWeights:
    """float32 NHWC convs with constant weights -> packed-weight kernels (module docstring).
    ``target``: the TVM target whose vector width and register count size the panels
    (default: the current target, else this machine's CPU)."""

    def __init__(self, target: Any = None):
        self.target = target

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        from edgekit.compiler.int8_intrin import cpu_features
        from edgekit.compiler.reductions import vector_lanes

        target = self.target or current_or_host()
        if target.kind.name != "llvm":  # GPUs keep the conv op for their own scheduler
            return mod
        rewriter = _Rewriter(mod, vector_lanes(target),
                             conv_schedule.vector_registers(cpu_features(target)))
        return rewrite_functions(rewriter, mod)

