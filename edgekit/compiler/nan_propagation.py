"""Relax pass: max/min/relu/clip that propagate NaN as onnxruntime does (``PropagateNaN``).

TVM lowers TIR ``max(a, b)`` to ``a > b ? a : b`` and ``min(a, b)`` to ``a < b ? a : b``
(LLVM ``fcmp ogt/olt`` + ``select``). A comparison with NaN is false, so ``max(NaN, 0)`` is
``0``: compiled ``Relu``, ``Clip``, ``HardSigmoid`` and ``Max(x, c)`` turned a NaN input into
0 (a NaN image got a confident class), while onnxruntime and torch return NaN. The pass
rewrites, before lowering,

- ``nn.relu(x)`` -> ``x < 0 ? 0 : x`` (one elementwise kernel named ``relu``): the compare
  is false for NaN, so NaN comes through, at the cost of TVM's own ``max``;
- ``clip(x, lo, hi)`` -> ``t > hi ? hi : t`` with ``t = x < lo ? lo : x`` (``clip``);
- ``maximum(a, b)`` / ``minimum(a, b)``, and the ``call_tir`` of TOPI's ``maximum`` /
  ``minimum`` that TVM's ONNX importer emits for ``Clip`` with tensor bounds, -> the same
  compare-and-select with broadcasting, plus ``isnan(b) ? b : ...`` when both operands may be
  NaN (an operand that cannot is a constant without NaN, or the importer's
  ``where(isnan(c), +-inf, c)`` Clip bound);
- ``max``/``min`` reductions (ONNX ``ReduceMax``/``ReduceMin``, and ``Max``/``Min``, which
  TVM imports as ``stack`` + a reduction) -> a reduction whose combiner keeps a NaN: any NaN
  in the reduced elements gives NaN, as in torch and numpy. onnxruntime's reductions keep a
  NaN only in the first element (``x > acc`` never holds for NaN), so the two agree when
  the NaN comes first, which is where the compile check puts it (``build.check_library``).

Each elementwise replacement is one TIR block, like the op it replaces, so fusion and the
default schedules are unchanged, and costs what TVM's ``max``/``min`` cost (one compare and
select; measured on mobile-cnn in docs/compile.md).

Left as it is: ``MaxPool``, where onnxruntime swallows NaN wherever it sits (it starts from
the lowest float and compares ``x > acc``), and TVM's pooling swallows a NaN except as the
last element of a window; ``softmax`` propagates already (its max and sum see the NaN).

Preconditions: static shapes; float dtypes only (integer max/min cannot hold NaN and are
left alone).
"""

from __future__ import annotations

import math
import re

import numpy as np
import tvm
from tvm import relax, s_tir, te, tirx
from tvm.relax import PyExprMutator, expr_functor

_BINARY = {"relax.maximum": "maximum", "relax.minimum": "minimum"}


def _is_float(expr) -> bool:
    return str(getattr(expr.ty, "dtype", "")).startswith(("float", "bfloat"))


def _static(*exprs) -> bool:
    """Every one of ``exprs`` is a tensor of known rank and integer dims (no symbolic ones)."""
    for e in exprs:
        values = getattr(getattr(e.ty, "shape", None), "values", None)
        if values is None or not all(isinstance(d, tirx.IntImm) for d in values):
            return False
    return True


def _guard(value, *operands):
    """``value`` unless one of ``operands`` is NaN, then that operand (the first one)."""
    for x in reversed(operands):
        value = tirx.Select(tirx.isnan(x), x, value)
    return value


def _max_keep_a(a, b):
    """max(a, b) that keeps a NaN ``a``: ``a < b ? b : a`` (the compare is false for NaN)."""
    return tirx.Select(a < b, b, a)


def _min_keep_a(a, b):
    """min(a, b) that keeps a NaN ``a``: ``a > b ? b : a``."""
    return tirx.Select(a > b, b, a)


def _relu(x: te.Tensor) -> te.Tensor:
    zero = tirx.const(0, x.dtype)
    return te.compute(x.shape, lambda *i: _max_keep_a(x(*i), zero), name="relu")


def _clip(x: te.Tensor, lo: float, hi: float) -> te.Tensor:
    def body(*i):
        v = x(*i)
        if not math.isinf(lo):
            v = _max_keep_a(v, tirx.const(lo, x.dtype))
        if not math.isinf(hi):
            v = _min_keep_a(v, tirx.const(hi, x.dtype))
        return v

    return te.compute(x.shape, body, name="clip")


def _broadcast_read(t: te.Tensor, out_ndim: int, idx):
    """``t`` read at output index ``idx`` under numpy broadcasting (static shapes)."""
    offset = out_ndim - len(t.shape)
    return t(*(0 if int(d) == 1 else idx[k + offset] for k, d in enumerate(t.shape)))


def _binary(kind: str, out_shape, guard_a: bool, guard_b: bool):
    """TE function for a NaN-propagating broadcast ``maximum``/``minimum``."""
    keep_a = _max_keep_a if kind == "maximum" else _min_keep_a

    def f(a: te.Tensor, b: te.Tensor) -> te.Tensor:
        def body(*i):
            va, vb = _broadcast_read(a, len(out_shape), i), _broadcast_read(b, len(out_shape), i)
            if guard_a or not guard_b:  # the operand that may be NaN goes first
                return _guard(keep_a(va, vb), vb) if guard_b else keep_a(va, vb)
            return keep_a(vb, va)

        return te.compute(out_shape, body, name=kind)

    return f


def _reduce(kind: str, axes: list[int], keepdims: bool):
    """TE function for a NaN-propagating ``max``/``min`` reduction over ``axes``."""
    op = tirx.max if kind == "max" else tirx.min

    def combine(x, y):
        return _guard(op(x, y), x, y)

    def f(x: te.Tensor) -> te.Tensor:
        ident = tirx.min_value if kind == "max" else tirx.max_value
        reducer = te.comm_reducer(combine, lambda t: ident(t), name=f"nan_{kind}")
        rs = {a: te.reduce_axis((0, x.shape[a]), name=f"k{a}") for a in axes}
        kept = [a for a in range(len(x.shape)) if a not in rs]
        shape = [1 if a in rs else x.shape[a] for a in range(len(x.shape))] if keepdims \
            else [x.shape[a] for a in kept]

        def body(*i):
            out = iter(i) if not keepdims else None
            idx = [rs[a] if a in rs else (i[a] if keepdims else next(out))
                   for a in range(len(x.shape))]
            return reducer(x(*idx), axis=list(rs.values()))

        return te.compute(shape, body, name=kind)

    return f


def _needs_guard(expr, lookup) -> bool:
    """False for an operand that cannot be NaN: a constant without NaN, or the Clip bound TVM's
    importer computes, ``where(isnan(c), +-inf, c)``; ``lookup`` finds a variable's binding."""
    if isinstance(expr, tvm.ir.expr.GenericConst):
        return bool(np.isnan(expr.value.numpy()).any())
    bound = lookup(expr) if isinstance(expr, relax.Var) else None
    if getattr(getattr(bound, "op", None), "name", "") == "relax.where":
        cond = bound.args[0]
        cond = lookup(cond) if isinstance(cond, relax.Var) else cond
        return not (getattr(getattr(cond, "op", None), "name", "") == "relax.isnan"
                    and isinstance(bound.args[1], tvm.ir.expr.GenericConst)
                    and np.isinf(bound.args[1].value.numpy()).all())
    return True


def _prim_value(expr) -> float:
    """The number in a ``PrimValue`` bound of ``clip`` (an int, a float or an immediate)."""
    value = expr.value
    return float(getattr(value, "value", value))


@expr_functor.mutator
class _Rewrite(PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.mod = mod

    def visit_call_(self, call):
        call = self.builder_.normalize(super().visit_call_(call))
        name = getattr(call.op, "name", "")
        if not _is_float(call) or not hasattr(call.ty, "shape"):
            return call
        if name == "relax.nn.relu":
            return self.builder_.call_te(_relu, call.args[0], primfunc_name_hint="relu")
        if name == "relax.clip":
            lo, hi = _prim_value(call.args[1]), _prim_value(call.args[2])
            return self.builder_.call_te(_clip, call.args[0], lo, hi, primfunc_name_hint="clip")
        if name in ("relax.max", "relax.min") and _static(call.args[0]):
            x = call.args[0]
            ndim = len(x.ty.shape.values)
            axes = sorted(a % ndim for a in call.attrs.axis) if call.attrs.axis is not None \
                else list(range(ndim))
            kind = name.split(".")[-1]
            return self.builder_.call_te(_reduce(kind, axes, bool(call.attrs.keepdims)), x,
                                         primfunc_name_hint=kind)
        kind = _BINARY.get(name)
        args = list(call.args)
        if kind is None and name == "relax.call_tir":
            kind, args = self._topi_binary(call)
        if kind is None or len(args) != 2 or not all(map(_is_float, args)) \
                or not _static(call, *args):
            return call
        shape = [int(d) for d in call.ty.shape.values]
        f = _binary(kind, shape, _needs_guard(args[0], self._lookup),
                    _needs_guard(args[1], self._lookup))
        return self.builder_.call_te(f, args[0], args[1], primfunc_name_hint=kind)

    def _lookup(self, var):
        try:
            return self.lookup_binding(var)
        except Exception:  # noqa: BLE001 - not a variable bound in this function
            return None

    def _topi_binary(self, call):
        """(``maximum``/``minimum``, operands) for a ``call_tir`` of TOPI's broadcast
        max/min as TVM's ONNX importer emits them (a PrimFunc of one block named so)."""
        gv, args = call.args[0], call.args[1]
        match = re.fullmatch(r"(maximum|minimum)\d*", getattr(gv, "name_hint", ""))
        if match is None or not isinstance(args, relax.Tuple):
            return None, []
        kind = match.group(1)
        func = self.mod[gv]
        if not isinstance(func, tvm.tirx.PrimFunc):
            return None, []
        sch = s_tir.Schedule(func)
        blocks = [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]
        if blocks != [f"T_{kind}"]:
            return None, []
        return kind, list(args.fields)


@tvm.transform.module_pass(opt_level=0, name="edgekit.PropagateNaN")
class PropagateNaN:
    """Float ``relu``, ``clip``, ``maximum`` and ``minimum`` become NaN-propagating
    elementwise kernels (see the module docstring for why and what is left alone). TVM has
    no pass or lowering option for this: its TIR ``max``/``min`` are ordered compares."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        rewrite = _Rewrite(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewrite.builder_.update_func(gv, rewrite.visit_expr(func))
        out = rewrite.builder_.get()
        return relax.transform.DeadCodeElimination()(out)
