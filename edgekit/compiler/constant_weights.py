"""What the Relax passes that re-lay out constant weights share (``conv_layout``,
``matmul_layout``, ``int8_kernels``): the value of a weight behind layout ops, the target in
scope, and running a rewriter over a module.

Relax passes that re-lay out weights at compile time (``conv_layout``, ``matmul_layout``) see
a weight as a ``relax.Var`` bound to a constant, or to ops that only move constant elements
(``ConvertLayout``'s ``permute_dims`` of an ONNX OIHW weight, the ``permute_dims`` of a
``Gemm`` with ``transB``, the slices of ``SplitGroupedConvs``, a ``broadcast_to`` in the ONNX
light zoo). :func:`constant_value` folds those ops alone, at compile time; any other constant
math (a quantize, a cast) keeps its own lowering.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import tvm
from tvm import relax

# ops that only move weight elements: folded at compile time when they read constants
LAYOUT_OPS = frozenset({"relax.permute_dims", "relax.strided_slice", "relax.split",
                        "relax.reshape", "relax.layout_transform", "relax.broadcast_to"})


def constant_value(expr, lookup: Callable[[Any], Any], depth: int = 8) -> np.ndarray | None:
    """``expr``'s value when it is a constant or ``LAYOUT_OPS`` of constants, else None.
    ``lookup``: the mutator's ``lookup_binding`` (a variable's bound expression)."""
    closed = _closed(expr, lookup, depth)
    if closed is None:
        return None
    if isinstance(closed, tvm.ir.expr.Constant):
        return closed.value.numpy()
    bb = relax.BlockBuilder()
    with bb.function("main", []):
        with bb.dataflow():  # FoldConstant folds inside dataflow blocks only
            out = bb.emit_output(closed)
        bb.emit_func_output(out)
    body = relax.transform.FoldConstant()(bb.get())["main"].body
    # folded: the block may be gone, the constant returned directly
    value = body.blocks[-1].bindings[-1].value if body.blocks else body.body
    return value.value.numpy() if isinstance(value, tvm.ir.expr.Constant) else None


def _closed(expr, lookup, depth: int):
    """``expr`` with its variables replaced by their bindings, when it is built from
    constants by ``LAYOUT_OPS`` only; else None."""
    if isinstance(expr, relax.Var):
        expr = lookup(expr)
    if isinstance(expr, tvm.ir.expr.Constant) or (
            expr is not None and not isinstance(expr, relax.Expr)):
        return expr  # a constant, or a non-tensor argument (shape, PrimValue)
    if isinstance(expr, relax.TupleGetItem) and depth:
        inner = _closed(expr.tuple_value, lookup, depth - 1)
        return None if inner is None else relax.TupleGetItem(inner, expr.index)
    if (depth and isinstance(expr, relax.Call)
            and getattr(expr.op, "name", "") in LAYOUT_OPS):
        args = [_closed(a, lookup, depth - 1) if isinstance(a, relax.Var | relax.Call)
                else a for a in expr.args]
        if any(a is None for a in args):
            return None
        return relax.Call(expr.op, args, expr.attrs, expr.ty_args)
    if isinstance(expr, relax.ShapeExpr | relax.Tuple):
        return expr
    return None


def current_or_host():
    """The TVM target in scope (``to_relax`` sets it), else this machine's CPU."""
    target = tvm.target.Target.current(allow_none=True)
    if target is not None:
        return target
    from edgekit.targets import load_target

    return load_target("host").tvm_target()


def rewrite_functions(rewriter, mod: tvm.IRModule) -> tvm.IRModule:
    """``rewriter`` (a ``PyExprMutator`` counting its rewrites in ``count``) over every Relax
    function of ``mod``: ``mod`` itself when nothing was rewritten, else the new module
    without the bindings the rewrites left dead (the original weights)."""
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
    if not rewriter.count:
        return mod
    return relax.transform.DeadCodeElimination()(rewriter.builder_.get())
