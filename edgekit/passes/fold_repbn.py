"""fold-repbn: fold SLAB's RepBN ``BN(x) + α·x`` (eval mode) into adjacent linear layers.

In eval mode, with the BN's running statistics and ``s = γ/√(σ²+ε)``, RepBN is a per-channel
affine ``a⊙x + b`` with ``a = s + α`` and ``b = β − μ·s``. It is recognised as an
``Add(P, Q)`` over one tensor ``t`` whose channel axis is the BN's axis 1:

- ``P`` is ``BatchNormalization(t)``, or fold-bn's leftover ``Mul(t, s) + shift``, either in
  ``t``'s layout or transposed back (``Transpose(BN(Transpose(x)))``, ``Q`` then reads ``x``);
- ``Q`` is ``Mul(t, α)`` (α a constant scalar or per-channel vector), or ``t`` itself (α=1).

This covers both SLAB's module (``transpose → BN + α·x → transpose``) and the form
``BN(xᵀ)ᵀ + α·x``. The affine is then folded, trying in order:

1. into the preceding Conv/Gemm/MatMul (e.g. the patch embedding, through its Reshape and
   Transpose): ``W' = diag(a)·W``, ``bias' = a⊙bias + b``. SLAB's reference ``merge_bn``
   writes ``bias' = s⊙(bias − μ) + β``, dropping ``α·bias``: wrong whenever the conv has a
   bias (PyTorch's default); this pass uses the exact form;
2. into every following MatMul/Gemm (qkv, fc1, or the head behind a token mean/cls pick):
   ``W' = W·diag(a)``, ``bias' = W·b + bias`` (the bias is created if absent);
3. else, with ``decompose`` (default), ``Mul(t, a) + b``: still one op pair instead of
   BN + Mul + Add (+ Transposes).

A fold is refused, with the reason, when a reader is not linear (e.g. the residual stream),
when a value on the way is read elsewhere, or when the weight is shared. Run it before
``fold-bn`` or after: fold-bn leaves a RepBN's BN as ``Mul+Add``, which is recognised too.
Only checkpoints whose PRepBN schedule has finished are RepBN models: while λ > 0 a
``LinearNorm`` computes ``λ·LN(x) + (1−λ)·RepBN(x)`` (SLAB's reference eval mode drops the LN
term anyway, exporting a model that was never trained). A RepBN whose sum meets a
``LayerNormalization`` of the stream in one Add (through Transposes and constant Muls) is such
a checkpoint: the pass refuses it, naming the RepBN and the LN and giving λ.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgekit.passes._bn_utils import (
    ChannelAffine,
    bn_scale_shift,
    fold_affine,
    other_user,
)
from edgekit.passes._channel_axis import channel_vector
from edgekit.passes._ir import Builder, const_array
from edgekit.passes.core import Pass, PassContext, PassRefused, PassReport


def _producer(value: ir.Value, op_type: str) -> ir.Node | None:
    p = value.producer()
    return p if p is not None and p.op_type == op_type else None


def _norm_part(value: ir.Value) -> tuple[ir.Value, tuple | str, list[ir.Node]] | None:
    """``BN(t)`` or ``Mul(t, s) + shift`` on axis 1: (t, (s, shift) or why not, nodes)."""
    bn = _producer(value, "BatchNormalization")
    if bn is not None:
        return bn.inputs[0], bn_scale_shift(bn), [bn]
    add = _producer(value, "Add")
    for i in (0, 1) if add is not None else ():
        mul, shift = _producer(add.inputs[i], "Mul"), const_array(add.inputs[1 - i])
        for j in (0, 1) if mul is not None and shift is not None else ():
            t, scale = mul.inputs[j], const_array(mul.inputs[1 - j])
            if scale is None or t.shape is None or len(t.shape) < 2:
                continue
            s, b = channel_vector(scale, len(t.shape), 1), channel_vector(shift, len(t.shape), 1)
            if s is not None and b is not None:
                return t, np.broadcast_arrays(s, b), [mul, add]
    return None


def _same(u: ir.Value, v: ir.Value) -> bool:
    """The same tensor, or two identical Transposes of one tensor (exports may not CSE)."""
    if u is v:
        return True
    pu, pv = _producer(u, "Transpose"), _producer(v, "Transpose")
    return pu is not None and pv is not None and pu.inputs[0] is pv.inputs[0] \
        and list(pu.attributes.get_ints("perm", [])) == list(pv.attributes.get_ints("perm", []))


def match_repbn(add: ir.Node) -> ChannelAffine | str | None:
    """The RepBN whose sum is ``add``, why it cannot be folded, or None if it is none."""
    for i in (0, 1):
        norm_value, alpha_value = add.inputs[i], add.inputs[1 - i]
        part, back = _norm_part(norm_value), None
        if part is None:  # maybe transposed back to the layout of x
            back = _producer(norm_value, "Transpose")
            part = _norm_part(back.inputs[0]) if back is not None else None
        if part is None:
            continue
        t, params, nodes = part
        mul = _producer(alpha_value, "Mul")
        k = next((j for j in (0, 1) if mul and const_array(mul.inputs[1 - j]) is not None), None)
        w, alpha = (mul.inputs[k], const_array(mul.inputs[1 - k])) if k is not None \
            else (alpha_value, np.ones(1))
        nodes = [*nodes, add, *([mul] if k is not None else [])]
        if back is None:
            src, axis = t, 1  # the sum is in the BN's own layout
            if not _same(w, t):
                continue
            nodes += [w.producer()] if w is not t else []
        else:  # BN(xᵀ)ᵀ + α·x: the Transposes must cancel
            first = _producer(t, "Transpose")
            perm = list(first.attributes.get_ints("perm", [])) if first else []
            back_perm = list(back.attributes.get_ints("perm", []))
            if not first or first.inputs[0] is not w or sorted(perm) != list(range(len(perm))) \
                    or [perm[p] for p in back_perm] != list(range(len(perm))):
                continue
            src, axis, nodes = w, perm[1], [*nodes, first, back]
        name = nodes[0].name
        if isinstance(params, str):
            return f"RepBN {name!r}: {params}"
        for node in nodes:  # intermediates must feed only the RepBN (the sum replaces them)
            for out in node.outputs:
                user = other_user(out, set(nodes)) if out is not add.outputs[0] else None
                if user:
                    return f"RepBN {name!r}: {out.name!r} is also used by {user}"
        alpha_vec = channel_vector(alpha, len(src.shape or ()), axis)
        if alpha_vec is None:
            return f"RepBN {name!r}: alpha of shape {alpha.shape} is not per-channel"
        scale, shift, alpha_vec = np.broadcast_arrays(params[0], params[1], alpha_vec)
        return ChannelAffine(name, src, add.outputs[0], axis, scale + alpha_vec, shift.copy(),
                             nodes)
    return None


_THROUGH = ("Transpose", "Mul", "Cast", "Identity")  # what stands between a norm and the mix


def _mixing_add(value: ir.Value) -> ir.Node | None:
    """The Add that ``value`` reaches through a single-reader chain of ``_THROUGH`` ops."""
    for _ in range(4):
        uses = list(value.uses())
        if len(uses) != 1 or uses[0].node.op_type not in ("Add", *_THROUGH):
            return None
        if uses[0].node.op_type == "Add":
            return uses[0].node
        value = uses[0].node.outputs[0]
    return None


def _layernorm_behind(value: ir.Value) -> tuple[ir.Node, float | None] | None:
    """(LayerNormalization, its constant weight λ if any) that ``value`` is computed from."""
    weight = None
    for _ in range(4):
        node = value.producer()
        if node is None or node.op_type not in ("LayerNormalization", *_THROUGH):
            return None
        if node.op_type == "LayerNormalization":
            return node, weight
        if node.op_type == "Mul":
            consts = [const_array(v) for v in node.inputs]
            k = next((i for i, c in enumerate(consts) if c is not None), None)
            if k is None:
                return None
            weight = float(consts[k].reshape(-1)[0]) if consts[k].size == 1 else None
            value = node.inputs[1 - k]
        else:
            value = node.inputs[0]
    return None


def check_schedule_ended(aff: ChannelAffine) -> None:
    """Refuse a RepBN still mixed with LayerNorm (an unfinished PRepBN LinearNorm)."""
    add = _mixing_add(aff.out)
    for other in add.inputs if add is not None else ():
        found = _layernorm_behind(other)
        if found is not None:
            ln, lam = found
            weight = f" (LN weight λ = {lam:.4g})" if lam is not None else ""
            raise PassRefused(
                f"RepBN {aff.name!r} is mixed with LayerNormalization {ln.name!r} in "
                f"{add.name!r}{weight}: its PRepBN LinearNorm schedule has not ended, so this "
                "checkpoint is not a RepBN model; train until the schedule ends (iter = 0) "
                "before folding", aff.name)


def apply(model: ir.Model, ctx: PassContext, *, decompose: bool = True) -> PassReport:
    graph, report = model.graph, ctx.report  # exact: the samples are not needed
    found = []
    for add in [n for n in graph if n.op_type == "Add"]:
        match = match_repbn(add)
        if isinstance(match, str):
            report.skip(add.name, match)
        elif match is not None:
            check_schedule_ended(match)
            found.append(add)
    if not found and not report.skipped:
        raise PassRefused("no RepBN (BatchNormalization(x) + alpha*x over the same x) found")
    report.details["repbn"] = len(found)
    builder = Builder(graph)
    for add in found:
        aff = match_repbn(add)  # again: folding the RepBN before it may have rewired its input
        if isinstance(aff, ChannelAffine):
            fold_affine(builder, aff, report, decompose)
    return report


PASS = Pass(
    name="fold-repbn",
    summary="fold SLAB RepBN (BN(x) + alpha*x) into the adjacent Conv/Linear (else Mul+Add)",
    exact=True,
    apply=apply,
)
