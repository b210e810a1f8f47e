"""Relax pass: Gather (``relax.take``) in ``clip`` mode instead of TVM's default ``fast`` mode."""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax import PyExprMutator, expr_functor


@expr_functor.mutator
class _ClipTake(PyExprMutator):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        if getattr(call.op, "name", "") == "relax.take" and call.attrs.mode == "fast":
            return relax.op.take(call.args[0], call.args[1], call.attrs.axis, mode="clip")
        return call


@tvm.transform.module_pass(opt_level=0, name="edgekit.BoundedTake")
class BoundedTake:
    """Every ``relax.take`` in ``fast`` mode becomes ``clip`` mode. TVM's ONNX importer emits
    ``fast``, which reads out of bounds (a segfault or wild memory) for an out-of-range index
    and warns once per Gather at build time, and TVM has no pass that changes the mode.
    ``clip`` costs a min/max per index; in-range indices give the same result. The runtime
    refuses out-of-range token-id inputs before they get here (``runtime.CompiledModel``), and
    computed indices clamp instead of crashing the process."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        out = mod.clone()
        for gv, func in mod.functions.items():
            if isinstance(func, relax.Function):
                out[gv] = _ClipTake().visit_expr(func)
        return out
