"""Relax pass: slow scalar math before lowering -> vectorizable polynomials (``FastMath``).

TVM lowers ``tanh``, ``erf`` and ``exp`` on CPUs to calls of the C library, one element at a
time (a vectorized GELU loop still makes 16 scalar calls per vector: ~10 ns per element, as
long as the matmul before it), and ``power(x, 3.0)`` to ``powf``. The pass rewrites

- ``tanh(x)``, ``erf(x)``, ``exp(x)``, the erf inside ``nn.gelu`` and the exp inside
  ``nn.softmax`` (float32) -> TOPI's ``fast_tanh`` / ``fast_erf`` / ``fast_exp``: rational /
  polynomial approximations with a clamped range, plain arithmetic that vectorizes. Measured
  against float64 on [-10, 10]: relative error <= 3.3e-7 (tanh), 4.2e-7 (erf), 5.7e-7 (exp),
  a few float32 ulp;
- ``power(x, c)`` with a scalar constant ``c`` of 2 or 3 -> ``x * x`` / ``x * x * x``
  (within an ulp or two of ``powf``).

Preconditions: any Relax module; calls of other dtypes or exponents are left alone.
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx, topi
from tvm.relax import PyExprMutator, expr_functor

_FAST = {"relax.tanh": "fast_tanh", "relax.erf": "fast_erf", "relax.exp": "fast_exp"}


def _scalar_const(expr) -> float | None:
    data = getattr(expr, "value", None)
    if not hasattr(data, "numpy"):
        return None
    value = data.numpy()
    return float(value.reshape(-1)[0]) if value.size == 1 else None


def _gelu(x):
    """Relax's legalization of ``nn.gelu``, x * (0.5 + erf(x / sqrt 2) * 0.5), with fast_erf."""
    half = tirx.const(0.5, x.dtype)
    return x * (half + topi.fast_erf(x * tirx.const(0.5**0.5, x.dtype)) * half)


@expr_functor.mutator
class _Rewrite(PyExprMutator):
    def visit_call_(self, call):
        call = self.builder_.normalize(super().visit_call_(call))
        name = getattr(call.op, "name", "")
        if getattr(call.ty, "dtype", None) != "float32":
            return call
        if name == "relax.nn.softmax":
            return self.builder_.call_te(topi.nn.fast_softmax, call.args[0],
                                         int(call.attrs.axis), primfunc_name_hint="softmax")
        if name == "relax.nn.gelu":
            return self.builder_.call_te(_gelu, call.args[0], primfunc_name_hint="gelu")
        if name in _FAST:
            return self.builder_.call_te(getattr(topi, _FAST[name]), call.args[0],
                                         primfunc_name_hint=_FAST[name])
        if name == "relax.power":
            base, exponent = call.args
            c = _scalar_const(exponent)
            if c in (2.0, 3.0) and base.ty.ndim >= exponent.ty.ndim >= 0:
                square = relax.op.multiply(base, base)
                if c == 2.0:
                    return square
                return relax.op.multiply(self.builder_.emit(square), base)
        return call


@tvm.transform.module_pass(opt_level=0, name="edgekit.FastMath")
class FastMath:
    """float32 ``tanh``, ``erf``, ``exp``, ``nn.gelu`` and ``nn.softmax`` become TOPI's fast
    polynomial versions and ``power(x, 2 or 3)`` becomes products (see the module docstring).
    TVM's own ``FastMathTransform`` has no case for ``nn.gelu`` (its erf appears only when it
    is legalized, after this point) or ``power``, which stay libm calls; it does not look at
    the dtype, while the error bounds above are measured for float32 only; and it names the
    kernels after TOPI's functions, where these keep the op's name (``softmax``, ``gelu``)
    that per-op timing maps kernels to ONNX nodes by."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        rewrite = _Rewrite(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewrite.builder_.update_func(gv, rewrite.visit_expr(func))
        return rewrite.builder_.get()
