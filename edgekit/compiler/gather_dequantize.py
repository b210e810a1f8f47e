"""Relax pass ``GatherDequantized``: a lookup into a dequantized constant table gathers the
int8 rows first and dequantizes only those (``quantize-int8`` with ``embeddings=true``).

Input (what TVM's importer makes of ONNX ``Gather(DequantizeLinear(Wq, s, z, axis=0), ids)``):

    t = R.dequantize(Wq, s, z, axis=0)          Wq: constant int8 [V, D]; s, z: [V] (or scalars)
    y = R.take(t, ids, axis=0)

Output:

    y = (float(R.take(Wq, ids)) - float(z_ids)) * s_ids      s_ids = R.take(s, ids)[..., None]

the same float arithmetic as ``DequantizeLinear`` on the rows read (``(q - z) * s``), so the
result equals onnxruntime's. Why: ``FoldConstant`` would otherwise evaluate the dequantize at
compile time and the library would carry the float table (MiniLM's word embeddings: 47 MB of
float32 against 12 MB of int8). A ``shape_of`` of the table (the importer's negative-index
fix-up) becomes its static shape, so the float table has no reader left.
Left unchanged: any other take or dequantize; a table without a static shape.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax import PyExprMutator, expr_functor

from edgekit.compiler.constant_weights import rewrite_functions


def _dequantized_table(expr, lookup):
    """The ``R.dequantize`` call behind ``expr`` when it dequantizes a constant int8 table
    along axis 0 (per row or per tensor), else None."""
    call = lookup(expr) if isinstance(expr, relax.Var) else expr
    if (not isinstance(call, relax.Call) or getattr(call.op, "name", "") != "relax.dequantize"
            or not isinstance(call.args[0], tvm.ir.expr.Constant)
            or len(call.args[0].value.shape) != 2 or int(call.attrs.axis) not in (0, -2)):
        return None
    return call


@expr_functor.mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.count = 0

    def visit_call_(self, call):
        call = super().visit_call_(call)
        name = getattr(call.op, "name", "")
        if name == "relax.shape_of":
            table = _dequantized_table(call.args[0], self.lookup_binding)
            if table is not None:
                return relax.ShapeExpr([int(d) for d in table.args[0].value.shape])
            return call
        if name != "relax.take" or int(call.attrs.axis) != 0:
            return call
        table = _dequantized_table(call.args[0], self.lookup_binding)
        if table is None:
            return call
        wq, scale, zero = table.args
        ids = call.args[1]
        rows = relax.op.astype(relax.op.take(wq, ids, axis=0, mode="clip"), "float32")
        self.count += 1
        return relax.op.multiply(relax.op.subtract(rows, self._per_row(zero, ids)),
                                 self._per_row(scale, ids))

    def _per_row(self, param, ids):
        """``param[ids]`` as a float column to broadcast over a row (a scalar as is)."""
        value = relax.op.astype(param, "float32")
        if len(param.value.shape) == 0:
            return value
        return relax.op.expand_dims(relax.op.take(value, ids, axis=0, mode="clip"), -1)


@tvm.transform.module_pass(opt_level=0, name="edgekit.GatherDequantized")
class GatherDequantized:
    """Lookups into dequantized int8 tables gather the int8 rows (module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return rewrite_functions(_Rewriter(mod), mod)
