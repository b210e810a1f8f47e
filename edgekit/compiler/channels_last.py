"""Relax pass: 2-D convolutions in NHWC with HWIO weights (``ChannelsLast``)."""

from __future__ import annotations

import tvm
from tvm import relax

from edgekit.compiler.progress import Progress, no_progress
from edgekit.errors import last_line


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
    anyway), and where ``ConvertLayout`` raises on an op it cannot follow, the module stays
    as it was (NCHW) and ``progress`` says so, instead of the compile failing."""

    def __init__(self, progress: Progress = no_progress):
        self.progress = progress

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        try:
            decomposed = relax.transform.DecomposeOpsForInference()(mod)
            return relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "HWIO"]})(decomposed)
        except Exception as exc:  # noqa: BLE001 - an op the layout pass cannot follow
            self.progress(f"convolutions stay NCHW (the layout change failed: {last_line(exc)})")
            return mod
