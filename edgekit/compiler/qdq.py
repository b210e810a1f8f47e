"""Relax passes for QDQ graphs: integer matmul/conv (``LowerQDQ``), ORT-exact quantize
(``ExactQuantize``).

TVM's ONNX importer turns QuantizeLinear/DequantizeLinear into ``R.quantize``/``R.dequantize``
and keeps the MatMul/Gemm/Conv between them in float32: a QDQ graph compiles to float compute.

``LowerQDQ`` math. With an activation quantized per tensor, ``q_x = quantize(x, s_x, z_x)``
(int8 or uint8), and a constant int8 weight ``W`` with zero point 0 and scales ``s_w[n]`` per
output channel (or one per tensor),

    y[m, n] = sum_k s_x (q_x[m, k] - z_x) * s_w[n] W[k, n]
            = s_x s_w[n] * (acc[m, n] - z_x * c[n]),   acc = sum_k q_x[m, k] W[k, n],
                                                         c[n] = sum_k W[k, n]

so the pass emits ``acc = R.matmul(q_x, W, out_dtype="int32")`` (``W`` an int8 ``R.const``
[K, N]), then ``R.astype(acc, "float32") * (s_x s_w) - (s_x s_w z_x c)``, both factors
float32 constants computed with NumPy here (the subtraction only when ``z_x != 0``). The
integer sum is exact (``|acc| <= 255 * 128 * K < 2^31``: K up to 65793; longer reductions
stay float), so the result is the QDQ graph's up to float rounding of the rescale. A conv
is the same with ``c[o] = sum_{i,kh,kw} W[o, i, kh, kw]``; its zero padding means ``x = 0``,
i.e. ``q = z_x``, so a padded conv with ``z_x != 0`` gets an explicit
``R.nn.pad(q_x, pad_value=z_x)`` and an unpadded int conv (exact at the borders).
Matched forms: ``matmul(A(dequantize(q_x)), B(dequantize(W)))`` where ``A`` is a chain of
``reshape``/``permute_dims`` (replayed on ``q_x``) and ``B`` at most one ``permute_dims``
(Gemm ``transB``); ``conv2d(dequantize(q_x), dequantize(W))`` in NCHW/OIHW.

Left in float (exact, just not integer), and counted in the module attribute
``edgekit.qdq`` (``{"lowered": n, "float": m, "reasons": {reason: count}}``): weights with a
non-zero zero point, scales along the reduced axis, per-channel activation scales, weights
that are not constants (activation x activation matmuls), batched (3-D+) weights, conv1d/3d
and transposed convs, anything else not matching the forms above.

``ExactQuantize``: TVM's ``R.quantize`` lowering clamps with ordered ``max``/``min``, so a
NaN input gives the type's maximum (measured: NaN -> 127 for int8, 255 for uint8);
onnxruntime computes ``clamp(nearbyint(x / s) + z, qmin, qmax)`` (half to even) and maps NaN
to ``qmin`` (measured, onnxruntime 1.32, opsets 13-21, int8 and uint8). The pass replaces every
int8/uint8 ``R.quantize`` of a float32 tensor with that compute; the clamp is
``min(max(r, qmin), qmax)``: TVM's LLVM codegen emits ``max(a, b)`` as ``a > b ? a : b``
with an ordered compare, so NaN fails it and gives ``qmin``, then ``min(qmin, qmax) = qmin``
(never an out-of-range float to integer cast, which LLVM makes poison). ``r`` appears once: the
fused epilogues inline quantize chains (quantize, dequantize, add, quantize, GELU, quantize),
and a clamp that read ``r`` three times grew them 3x per quantize (170 kB kernels for MiniLM's
FFN, minutes of TIR lowering).

Preconditions: static shapes; scales and zero points are ``R.const``.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import tvm
from tvm import relax, te, tirx
from tvm.relax import PyExprMutator, expr_functor

_SHAPE_OPS = ("relax.reshape", "relax.permute_dims")
_LINEAR = ("relax.matmul", "relax.nn.conv2d", "relax.nn.conv1d", "relax.nn.conv3d",
           "relax.nn.conv2d_transpose", "relax.nn.conv1d_transpose")
# |acc| <= 255 * 128 * K must fit int32: longer reductions stay float
_MAX_REDUCTION = (2**31 - 1) // (255 * 128)
_INT8 = ("int8", "uint8")


def _const(expr) -> np.ndarray | None:
    return expr.value.numpy() if isinstance(expr, tvm.ir.expr.GenericConst) else None


def _dtype(expr) -> str:
    return str(getattr(expr.ty, "dtype", ""))


def _op(expr) -> str:
    return getattr(getattr(expr, "op", None), "name", "") if isinstance(expr, relax.Call) else ""


def _replay(op: str, call, value):
    """``call`` (a reshape or permute_dims) applied to ``value`` instead of its input."""
    if op == "relax.reshape":
        return relax.op.reshape(value, call.args[1])
    return relax.op.permute_dims(value, call.attrs.axes)


def _weight(dq) -> tuple[np.ndarray, np.ndarray] | str:
    """(int weights, float64 scale broadcast to the weights' shape) of ``dequantize(const)``,
    or why not: the zero point must be 0."""
    w, s, z = (_const(a) for a in dq.args)
    if w is None or s is None or z is None:
        return "weight is not a constant"
    if w.dtype != np.int8:
        return f"weight dtype {w.dtype} (int8 only)"
    if np.any(z != 0):
        return "weight zero point is not 0"
    scale = s.astype(np.float64)
    if scale.size > 1:
        shape = [1] * w.ndim
        shape[int(dq.attrs.axis) % w.ndim] = scale.size
        scale = scale.reshape(shape)
    return w, np.broadcast_to(scale, w.shape)


def _per_output(scale: np.ndarray, axis_out: int) -> np.ndarray | None:
    """The scale as a vector along ``axis_out`` when it is constant along every other axis."""
    vec = np.moveaxis(scale, axis_out, 0).reshape(scale.shape[axis_out], -1)
    return vec[:, 0] if np.all(vec == vec[:, :1]) else None


@expr_functor.mutator
class _Lower(PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.counts: Counter[str] = Counter()

    def _bound(self, expr):
        if not isinstance(expr, relax.Var):
            return expr
        bound = self.lookup_binding(expr)  # None for a function parameter
        return expr if bound is None else bound

    def _source(self, expr):
        """The binding behind ``expr`` seen through reshapes and transposes."""
        node = self._bound(expr)
        while _op(node) in _SHAPE_OPS:
            node = self._bound(node.args[0])
        return node

    def _activation(self, expr):
        """(q_x, s_x, z_x, shape ops to replay) when ``expr`` is a dequantized per-tensor
        activation seen through reshapes/transposes, else a reason string."""
        chain = []
        node = self._bound(expr)
        while _op(node) in _SHAPE_OPS:
            chain.append(node)
            node = self._bound(node.args[0])
        if _op(node) != "relax.dequantize":
            return "input is not dequantized"
        q, s, z = node.args
        s, z = _const(s), _const(z)
        if s is None or z is None:
            return "activation scale is not a constant"
        if s.size != 1 or z.size != 1:
            return "per-channel activation scale"
        if _dtype(q) not in _INT8 or _const(q) is not None:
            return "activation is not an int8/uint8 tensor"
        return q, float(s.reshape(())), int(z.reshape(())), chain[::-1]

    def _skip(self, call, reason: str):
        self.counts["float"] += 1
        self.counts[f"reason: {reason}"] += 1
        return call

    def _rescale(self, acc, scale: np.ndarray, offset: np.ndarray | None):
        y = self.builder_.emit(relax.op.astype(acc, "float32"))
        y = self.builder_.emit(relax.op.multiply(y, relax.const(scale.astype(np.float32))))
        if offset is not None:
            y = relax.op.subtract(y, relax.const(offset.astype(np.float32)))
        self.counts["lowered"] += 1
        return y

    def visit_call_(self, call):
        call = self.builder_.normalize(super().visit_call_(call))
        name = _op(call)
        if name not in _LINEAR or _dtype(call) != "float32" or len(call.args) < 2:
            return call
        wq = self._bound(call.args[1])
        if "relax.dequantize" not in (_op(self._source(call.args[0])), _op(self._source(wq))):
            return call  # a float op of a float graph: not counted
        if name not in ("relax.matmul", "relax.nn.conv2d"):
            return self._skip(call, f"{name.split('.')[-1]} (matmul and conv2d only)")
        act = self._activation(call.args[0])
        if isinstance(act, str):
            return self._skip(call, act)
        if name == "relax.matmul":
            return self._matmul(call, act, wq)
        return self._conv(call, act, wq)

    def _matmul(self, call, act, wq):
        q, sx, zx, chain = act
        transposed = False
        if _op(wq) == "relax.permute_dims":  # Gemm transB: the weight read transposed
            axes = wq.attrs.axes
            transposed = axes is None or [int(a) for a in axes] == [1, 0]
            wq = self._bound(wq.args[0])
        if _op(wq) != "relax.dequantize":
            return self._skip(call, "weight is not dequantized")
        weight = _weight(wq)
        if isinstance(weight, str):
            return self._skip(call, weight)
        w, scale = weight
        if w.ndim != 2:
            return self._skip(call, f"{w.ndim}-D weight")
        if transposed:
            w, scale = w.T, scale.T
        if w.shape[0] > _MAX_REDUCTION:
            return self._skip(call, "reduction too long for an int32 sum")
        sw = _per_output(scale, 1)
        if sw is None:
            return self._skip(call, "weight scale along the reduced axis")
        for node in chain:
            q = self.builder_.emit(_replay(_op(node), node, q))
        acc = self.builder_.emit(relax.op.matmul(
            q, relax.const(np.ascontiguousarray(w)), out_dtype="int32"))
        factor = sx * sw
        offset = factor * zx * w.astype(np.int64).sum(axis=0) if zx else None
        return self._rescale(acc, factor, offset)

    def _conv(self, call, act, wq):
        q, sx, zx, chain = act
        a = call.attrs
        if chain or _op(wq) != "relax.dequantize" or a.data_layout != "NCHW" \
                or a.kernel_layout != "OIHW" or a.out_layout != "NCHW":
            return self._skip(call, "conv form (NCHW/OIHW of dequantized tensors only)")
        weight = _weight(wq)
        if isinstance(weight, str):
            return self._skip(call, weight)
        w, scale = weight
        if w[0].size > _MAX_REDUCTION:
            return self._skip(call, "reduction too long for an int32 sum")
        sw = _per_output(scale, 0)
        if sw is None:
            return self._skip(call, "weight scale not per output channel")
        padding = [int(p) for p in a.padding]
        if zx and any(padding):  # pads must hold z_x (the float 0), not the integer 0
            top, left, bottom, right = padding
            q = self.builder_.emit(relax.op.nn.pad(
                q, [0, 0, 0, 0, top, bottom, left, right], pad_value=float(zx)))
            padding = [0, 0, 0, 0]
        acc = self.builder_.emit(relax.op.nn.conv2d(
            q, relax.const(w), strides=a.strides, padding=padding, dilation=a.dilation,
            groups=int(a.groups), data_layout="NCHW", kernel_layout="OIHW",
            out_layout="NCHW", out_dtype="int32"))
        factor = (sx * sw).reshape(1, -1, 1, 1)
        colsum = w.astype(np.int64).reshape(w.shape[0], -1).sum(axis=1).reshape(1, -1, 1, 1)
        return self._rescale(acc, factor, factor * zx * colsum if zx else None)


@tvm.transform.module_pass(opt_level=0, name="edgekit.LowerQDQ")
class LowerQDQ:
    """Float matmuls/convs of dequantized int8 tensors become int32-accumulating integer
    matmuls/convs plus a float rescale (math and what stays float: module docstring). TVM has
    no such pass for Relax (its QNN dialect was Relay-only)."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        lower = _Lower(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                lower.builder_.update_func(gv, lower.visit_expr(func))
        out = relax.transform.DeadCodeElimination()(lower.builder_.get())
        counts = lower.counts
        reasons = {k.split(": ", 1)[1]: v for k, v in counts.items() if k.startswith("reason")}
        return out.with_attr("edgekit.qdq", {"lowered": counts["lowered"],
                                             "float": counts["float"], "reasons": reasons})


def qdq_counts(mod: tvm.IRModule) -> dict:
    """The ``edgekit.qdq`` record ``LowerQDQ`` left on ``mod`` (zeros when it did not run)."""
    attrs = mod.attrs
    record = attrs["edgekit.qdq"] if attrs is not None and "edgekit.qdq" in attrs else None
    if record is None:
        return {"lowered": 0, "float": 0, "reasons": {}}
    return {"lowered": int(record["lowered"]), "float": int(record["float"]),
            "reasons": {str(k): int(v) for k, v in record["reasons"].items()}}


def _quantize_te(axis: int, out_dtype: str):
    """TE function: onnxruntime's QuantizeLinear (half-to-even rounding, saturation, NaN to
    qmin) for a scalar or per-``axis`` scale and zero point."""
    info = np.iinfo(out_dtype)

    def f(x: te.Tensor, s: te.Tensor, z: te.Tensor) -> te.Tensor:
        def pick(t, i):
            return t(*([0] * len(t.shape))) if int(np.prod([int(d) for d in t.shape])) == 1 \
                else t(i[axis])

        def body(*i):
            r = tirx.nearbyint(x(*i) / pick(s, i)) + pick(z, i).astype("float32")
            lo, hi = tirx.const(float(info.min), "float32"), tirx.const(float(info.max), "float32")
            # r once: a consumer that reads it k times inlines k copies, not 3k
            return tirx.min(tirx.max(r, lo), hi).astype(out_dtype)

        return te.compute(x.shape, body, name="quantized")

    return f


@expr_functor.mutator
class _Quantize(PyExprMutator):
    def visit_call_(self, call):
        call = self.builder_.normalize(super().visit_call_(call))
        if _op(call) != "relax.quantize" or _dtype(call) not in _INT8 \
                or _dtype(call.args[0]) != "float32":
            return call
        x, s, z = call.args
        if _const(s) is None or _const(z) is None or _const(s).ndim > 1:
            return call
        ndim = len(x.ty.shape.values)
        return self.builder_.call_te(_quantize_te(int(call.attrs.axis) % ndim, _dtype(call)),
                                     x, s, z, primfunc_name_hint="quantize")


@tvm.transform.module_pass(opt_level=0, name="edgekit.ExactQuantize")
class ExactQuantize:
    """int8/uint8 ``R.quantize`` becomes onnxruntime's QuantizeLinear compute (rounding half to
    even, NaN to qmin; see the module docstring). TVM's lowering sends NaN to qmax."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        rewrite = _Quantize(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewrite.builder_.update_func(gv, rewrite.visit_expr(func))
        return rewrite.builder_.get().with_attrs(mod.attrs) if mod.attrs is not None \
            else rewrite.builder_.get()


def _region_dtype(region) -> str:
    """The element type of a block's read/write region (its buffer's)."""
    return str(getattr(getattr(region, "source", None), "dtype", ""))


def int8_kernels(mod: tvm.IRModule) -> list[str]:
    """Names of the PrimFuncs (kernels) that compute in integers: a reduction block that
    reads int8/uint8 buffers and accumulates into an int32 one."""
    from tvm import s_tir

    names = []
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        sch = s_tir.Schedule(func)
        todo = list(sch.get_child_blocks(sch.get_sblock("root")))
        while todo:
            rv = todo.pop()
            block = sch.get(rv)
            todo.extend(sch.get_child_blocks(rv))
            if (any(iv.iter_type == tirx.IterVar.CommReduce for iv in block.iter_vars)
                    and any(_region_dtype(r) == "int32" for r in block.writes)
                    and any(_region_dtype(r) in _INT8 for r in block.reads)):
                names.append(gv.name_hint)
                break
    return sorted(names)
