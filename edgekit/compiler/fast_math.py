"""Relax pass: slow scalar math before lowering -> vectorizable polynomials (``FastMath``).

TVM lowers ``tanh``, ``erf`` and ``exp`` on CPUs to calls of the C library, one element at a
time (a vectorized GELU loop still makes 16 scalar calls per vector: ~10 ns per element, as
long as the matmul before it), and ``power(x, 3.0)`` to ``powf``. The pass rewrites

- ``tanh(x)``, ``erf(x)``, ``exp(x)``, the erf inside ``nn.gelu`` and the exp inside
  ``nn.softmax`` (float32) -> TOPI's ``fast_tanh`` / ``fast_erf`` / ``fast_exp``: rational /
  polynomial approximations with a clamped range, plain arithmetic that vectorizes. Measured
  against float64 on [-10, 10]: relative error <= 3.3e-7 (tanh), 4.2e-7 (erf), 5.7e-7 (exp),
  a few float32 ulp. ``fast_erf`` clamps its input to [-4, 4] with TIR ``max``/``min``, which
  turn NaN into a number (``max(NaN, c)`` is ``c``: an ordered compare), so the erf here is
  ``isnan(x) ? x : fast_erf(x)``: NaN in, NaN out, as onnxruntime; +-Inf clamp to +-4, where
  the rational form is exactly +-1.0f (erf(4) = 1 - 1.5e-8 rounds to 1 in float32). The
  select is one more vector compare-and-blend per element, in the same loop;
- ``power(x, c)`` with a scalar constant ``c`` of 2 or 3 -> ``x * x`` / ``x * x * x``
  (within an ulp or two of ``powf``).

Preconditions: any Relax module; calls of other dtypes or exponents are left alone.
"""

from __future__ import annotations

import tvm
from tvm import relax, te, tirx, topi
from tvm.relax import PyExprMutator, expr_functor


def _scalar_const(expr) -> float | None:
    data = getattr(expr, "value", None)
    if not hasattr(data, "numpy"):
        return None
    value = data.numpy()
    return float(value.reshape(-1)[0]) if value.size == 1 else None


def _erf(x):
    """TOPI's ``fast_erf`` that keeps NaN (its clamp would map NaN to erf(4) = 1)."""
    fast = topi.fast_erf(x)
    return te.compute(x.shape, lambda *i: tirx.Select(tirx.isnan(x(*i)), x(*i), fast(*i)),
                      name="T_erf")


def _gelu(x):
    """Relax's legalization of ``nn.gelu``, x * (0.5 + erf(x / sqrt 2) * 0.5), with fast_erf
    (a NaN x makes the product NaN, so the clamp inside needs no NaN select here)."""
    half = tirx.const(0.5, x.dtype)
    return x * (half + topi.fast_erf(x * tirx.const(0.5**0.5, x.dtype)) * half)


# partial sums of a symbolic-length softmax row: two AVX2 vectors, four NEON ones; AVX-512
# would use one vector of them (softmax_rows)
_SOFTMAX_PARTS = 16


def _lanes() -> int:
    """fp32 lanes of the target in scope (``to_relax`` sets it), else of this CPU."""
    from edgekit.compiler.constant_weights import current_or_host
    from edgekit.compiler.reductions import vector_lanes

    return vector_lanes(current_or_host())


# relax op -> (TE function, kernel name; per_op maps kernels to ONNX nodes by these names)
_FAST = {"relax.tanh": (topi.fast_tanh, "fast_tanh"), "relax.erf": (_erf, "fast_erf"),
         "relax.exp": (topi.fast_exp, "fast_exp")}


@expr_functor.mutator
class _Rewrite(PyExprMutator):
    def visit_call_(self, call):
        call = self.builder_.normalize(super().visit_call_(call))
        name = getattr(call.op, "name", "")
        if getattr(call.ty, "dtype", None) != "float32":
            return call
        if name == "relax.nn.softmax":
            x = call.args[0]
            axis = int(call.attrs.axis) % x.ty.ndim
            last = x.ty.shape.values[-1] if x.ty.shape is not None else None
            if axis == x.ty.ndim - 1 and (not isinstance(last, tirx.IntImm) or (
                    int(last) > _SOFTMAX_PARTS and int(last) % _lanes())):
                # a symbolic row length (attention over seq keys), or one the static row
                # schedule cannot split into vectors (ViT's 197 tokens): partials + tail
                from edgekit.compiler import softmax_rows

                return self.builder_.call_te(softmax_rows.softmax_te, x, _SOFTMAX_PARTS,
                                             primfunc_name_hint="softmax")
            return self.builder_.call_te(topi.nn.fast_softmax, x, int(call.attrs.axis),
                                         primfunc_name_hint="softmax")
        if name == "relax.nn.gelu":
            return self.builder_.call_te(_gelu, call.args[0], primfunc_name_hint="gelu")
        if name in _FAST:
            fast, hint = _FAST[name]
            return self.builder_.call_te(fast, call.args[0], primfunc_name_hint=hint)
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
