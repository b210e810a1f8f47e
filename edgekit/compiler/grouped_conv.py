"""Relax pass: grouped 2-D convolutions whose groups are not a vector wide, one conv per group.

Math: a conv with ``g`` groups computes output channels ``[i*co, (i+1)*co)`` from input
channels ``[i*ci, (i+1)*ci)`` and weights ``W[i*co:(i+1)*co]`` only; so it equals ``g`` plain
convs on channel slices, concatenated on the channel axis. Every output sums the same terms
in the same order as before.

Why: the default CPU schedule (``edgekit.compiler.tiling``) vectorizes over output channels;
with 34 or 68 channels per group (ShuffleNet) no vector width divides the group, and a vector
that straddles two groups reads the input through a gather. A plain conv over one group gets a
vector tile plus a short tail loop instead.

Preconditions: ``relax.nn.conv2d`` calls in NCHW / OIHW (what the ONNX importer emits) with
known channel counts, ``1 < groups <= 8``, more than one input channel per group (depthwise
convs are left alone) and output channels per group not a multiple of 16.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax import PyExprMutator, expr_functor

_MAX_GROUPS = 8  # more groups: more kernel calls than the vectors save


def _static(ty, axis: int) -> int | None:
    """Dim ``axis`` of a tensor type when it is a known number."""
    dims = getattr(getattr(ty, "shape", None), "values", None)  # None: not a ShapeExpr
    dim = None if dims is None else dims[axis]
    return int(dim) if isinstance(dim, tvm.tirx.IntImm) else None


@expr_functor.mutator
class _Split(PyExprMutator):
    def visit_call_(self, call):
        call = self.builder_.normalize(super().visit_call_(call))
        if getattr(call.op, "name", "") != "relax.nn.conv2d":
            return call
        a = call.attrs
        g = int(a.groups)
        if (g <= 1 or g > _MAX_GROUPS or a.data_layout != "NCHW"
                or a.kernel_layout != "OIHW" or a.out_layout != "NCHW"):
            return call
        x, w = call.args
        cin, cout = _static(x.ty, 1), _static(w.ty, 0)
        if cin is None or cout is None:
            return call
        ci, co = cin // g, cout // g
        if ci <= 1 or co % 16 == 0:
            return call
        parts = []
        for i in range(g):
            xi = self.builder_.emit(relax.op.strided_slice(x, [1], [i * ci], [(i + 1) * ci]))
            wi = self.builder_.emit(relax.op.strided_slice(w, [0], [i * co], [(i + 1) * co]))
            parts.append(self.builder_.emit(relax.op.nn.conv2d(
                xi, wi, strides=a.strides, padding=a.padding, dilation=a.dilation,
                groups=1, data_layout="NCHW", kernel_layout="OIHW", out_layout="NCHW",
                out_dtype=a.out_dtype or None)))
        return relax.op.concat(parts, axis=1)


@tvm.transform.module_pass(opt_level=0, name="edgekit.SplitGroupedConvs")
class SplitGroupedConvs:
    """A grouped NCHW conv with at most 8 groups, more than one input channel per group and
    output channels per group not a multiple of 16 becomes one plain conv per group on channel
    slices, concatenated (exact; see the module docstring). TVM has no such pass: its grouped
    conv stays one kernel, whose vectors over output channels straddle two groups and gather."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        split = _Split(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                split.builder_.update_func(gv, split.visit_expr(func))
        return split.builder_.get()
