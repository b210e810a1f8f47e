"""Relax pass: 2-D convolutions in NHWC with HWIO weights (``ChannelsLast``)."""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax import PyExprMutator, expr_functor

from edgekit.compiler.constant_weights import rewrite_functions
from edgekit.compiler.progress import Progress, no_progress
from edgekit.errors import last_line

_BINARY = frozenset({"relax.add", "relax.subtract", "relax.multiply", "relax.divide",
                     "relax.maximum", "relax.minimum", "relax.power"})


@expr_functor.mutator
class _FullRankConstants(PyExprMutator):
    """``x (N, C, H, W) * k (C, 1, 1)`` -> ``x * k' (1, C, 1, 1)``, ``k'`` the same values:
    NumPy broadcasting pads the lower rank with leading 1s, so the result is identical.
    Why: ``ConvertLayout`` cannot follow a binary op whose operands differ in rank and puts
    the op back in NCHW, with a transpose before and after it (Inception v2's per-channel
    scale after each BatchNorm left 81 transposes between its convs)."""

    def __init__(self, mod):
        super().__init__(mod)
        self.count = 0

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if getattr(call.op, "name", "") not in _BINARY or len(call.args) != 2:
            return call
        ranks = [getattr(a.ty, "ndim", -1) for a in call.args]
        if max(ranks) != 4 or min(ranks) < 0 or ranks[0] == ranks[1]:
            return call  # only next to 4-D activations: the ranks the layout pass changes
        args = []
        for arg, rank in zip(call.args, ranks, strict=True):
            if rank < 4 and isinstance(arg, tvm.ir.expr.Constant):
                value = arg.value.numpy()
                arg = relax.const(value.reshape((1,) * (4 - rank) + value.shape), str(value.dtype))
            args.append(arg)
        if all(a.same_as(b) for a, b in zip(args, call.args, strict=True)):
            return call
        self.count += 1
        return relax.Call(call.op, args, call.attrs)


@tvm.transform.module_pass(opt_level=0, name="edgekit.ChannelsLast")
class ChannelsLast:
    """Every 2-D conv in NHWC / HWIO, by TVM's ``ConvertLayout``: transposes of the constant
    weights fold away, activations are transposed once at the graph's edges, and elementwise
    ops, pooling and residual adds between convs follow the layout. Why: in NCHW the innermost
    output axis of a conv is the output width (7, 14, 56 pixels), short and rarely a multiple
    of the vector width, so default schedules vectorize badly; in NHWC it is the output
    channel, contiguous in output and weights, and a conv becomes a matmul-like kernel
    (``conv_layout`` packs the weights of plain convs for it, the rest get
    ``edgekit.compiler.tiling``). Only the summation order inside each conv changes (channels
    innermost). What this pass adds to ``ConvertLayout``: inference ops are decomposed first
    (BatchNorm becomes elementwise ops, which follow any layout; lowering decomposes them
    anyway) and the tuple BatchNorm leaves behind is bound away, lower-rank constants of
    binary ops get the activation's rank (``_FullRankConstants``), and where
    ``ConvertLayout`` raises on an op it cannot follow, the module stays as it was (NCHW) and
    ``progress`` says so, instead of the compile failing."""

    def __init__(self, progress: Progress = no_progress):
        self.progress = progress

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        try:
            decomposed = relax.transform.DecomposeOpsForInference()(mod)
            # BatchNorm decomposes to (y, mean, var)[0]: an op the layout pass stops at
            decomposed = relax.transform.CanonicalizeBindings()(decomposed)
            decomposed = rewrite_functions(_FullRankConstants(decomposed), decomposed)
            return relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "HWIO"]})(decomposed)
        except Exception as exc:  # noqa: BLE001 - an op the layout pass cannot follow
            self.progress(f"convolutions stay NCHW (the layout change failed: {last_line(exc)})")
            return mod
