"""merge-repvgg: sum parallel RepVGG branches of one input into a single convolution.

Convolution is linear in its kernel, so ``Σ_i conv(x, W_i) + B_i = conv(x, ΣW_i) + ΣB_i``
when every branch sees the same input with the same stride, groups and output grid. A
sum of branches of one input ``x``, written as nested Adds in any order, is merged when
each term is one of:

- ``Conv(x, W, B)``, optionally followed by an inference BatchNormalization (folded first:
  ``W·s``, ``(B − μ)·s + β``), which is what ``edgekit export`` leaves once its optimizer
  has folded the BNs;
- the identity ``x``, ``BatchNormalization(x)`` or ``Mul(x, s)`` (per-channel): a kernel
  with ``s_i`` at the centre of ``(i, i mod Cin/g)``; it needs ``Cin == Cout`` and stride 1;
- a per-channel constant (fold-bn leaves an identity BN as ``Mul + Add``), added to the bias.

Every conv kernel is zero-padded to the largest (centred) kernel ``K``, so each must have odd
size, symmetric pads ``k//2``, dilation 1 and no auto_pad (a 1×1 conv has pads 0): then all
branches sample the same output grid. Each term must be read only by the sum. The merged
Conv uses ``K`` with pads ``K//2``; a failed requirement is reported as the skip reason.
A sum is a candidate when at least two terms read the same input, one of them a Conv.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from edgekit.passes._bn_utils import (
    bn_scale_shift,
    other_user,
    remove_dead,
    replace_value,
)
from edgekit.passes._channel_axis import channel_vector
from edgekit.passes._ir import Builder, const_array
from edgekit.passes.core import Pass, PassContext, PassRefused, PassReport


@dataclass
class _Term:
    """One summand: ``conv(src, kernel) + bias``, or ``scale*src + bias`` when no conv."""

    value: ir.Value
    src: ir.Value | None  # None: a constant
    nodes: tuple[ir.Node, ...] = ()  # what computes it (removed once merged)
    conv: ir.Node | None = None
    kernel: np.ndarray | None = None
    scale: np.ndarray | float = 1.0
    bias: np.ndarray | float = 0.0
    problem: str | None = None  # why it cannot be merged


def _tree(add: ir.Node) -> tuple[list[ir.Value], list[ir.Node]]:
    """Terms and Adds of the sum rooted at ``add`` (inner Adds read only by their parent)."""
    terms, adds = [], [add]
    for value in add.inputs:
        inner = value.producer()
        if inner is not None and inner.op_type == "Add" and other_user(value, {add}) is None:
            more, inner_adds = _tree(inner)
            terms, adds = terms + more, adds + inner_adds
        else:
            terms.append(value)
    return terms, adds


def _term(value: ir.Value, rank: int) -> _Term:
    const = const_array(value)
    if const is not None:
        vec = channel_vector(const, rank, 1)
        return _Term(value, None, bias=0.0 if vec is None else vec,
                     problem=None if vec is not None else f"{value.name!r} is not per-channel")
    p = value.producer()
    if p is not None and p.op_type == "BatchNormalization":
        bn, inner = bn_scale_shift(p), p.inputs[0].producer()
        if isinstance(bn, str):
            return _Term(value, p.inputs[0], (p,), problem=f"{p.name!r}: {bn}")
        if inner is None or inner.op_type != "Conv" or other_user(p.inputs[0], {p}):
            return _Term(value, p.inputs[0], (p,), scale=bn[0], bias=bn[1])
        term = _term(p.inputs[0], rank)  # conv + BN: fold the BN into the conv's terms
        if term.problem is None:
            term.kernel = term.kernel * bn[0].reshape((-1,) + (1,) * (term.kernel.ndim - 1))
            term.bias = term.bias * bn[0] + bn[1]
        term.value, term.nodes = value, (p, inner)
        return term
    if p is not None and p.op_type == "Conv":
        w = const_array(p.inputs[1])
        has_bias = len(p.inputs) > 2 and p.inputs[2] is not None
        b = const_array(p.inputs[2]) if has_bias else np.zeros(1)
        if w is None or b is None:
            return _Term(value, p.inputs[0], (p,), p,
                         problem=f"Conv {p.name!r} has a non-constant weight or bias")
        return _Term(value, p.inputs[0], (p,), p, w.astype(np.float64), bias=b.astype(np.float64))
    if p is not None and p.op_type == "Mul":
        for i in (0, 1):
            const = const_array(p.inputs[1 - i])
            vec = None if const is None else channel_vector(const, rank, 1)
            if vec is not None:
                return _Term(value, p.inputs[i], (p,), scale=vec)
    return _Term(value, value)  # the identity branch, if this is the convs' input


def _conv_geometry(conv: ir.Node, kernel: np.ndarray) -> tuple | str:
    """(strides, group) of a conv whose kernel is centred on its output grid, or why not."""
    attrs, k = conv.attributes, kernel.shape[2:]
    if attrs.get_string("auto_pad", "NOTSET") != "NOTSET":
        return f"Conv {conv.name!r} uses auto_pad"
    if any(d != 1 for d in attrs.get_ints("dilations", [1] * len(k))):
        return f"Conv {conv.name!r} is dilated"
    pads = list(attrs.get_ints("pads", [0] * 2 * len(k)))
    if any(d % 2 == 0 for d in k) or pads != [d // 2 for d in k] * 2:
        return f"Conv {conv.name!r} (kernel {list(k)}, pads {pads}) is not centred (pads k//2)"
    return tuple(attrs.get_ints("strides", [1] * len(k))), attrs.get_int("group", 1)


def _merge(builder: Builder, root: ir.Node) -> int | str | None:
    """Merge the sum at ``root``: branches merged, why not, or None (not a candidate)."""
    rank = len(root.outputs[0].shape) if root.outputs[0].shape is not None else -1
    values, adds = _tree(root)
    terms = [_term(v, rank) for v in values]
    convs = [t for t in terms if t.conv is not None]
    srcs = [t.src for t in terms if t.src is not None]
    if not convs or not any(srcs.count(c.src) > 1 for c in convs):
        return None
    x = convs[0].src
    for t in terms:
        if t.problem:
            return t.problem
        if t.src is not None and t.src is not x:
            return f"term {t.value.name!r} does not read {x.name!r}"
        user = other_user(t.value, set(adds)) if t.value is not x else None
        if user:  # the branch would stay computed: merging would save nothing
            return f"term {t.value.name!r} is also used by {user}"
    geometry = {_conv_geometry(c.conv, c.kernel) for c in convs}
    bad = [g for g in geometry if isinstance(g, str)]
    if bad or len(geometry) > 1 or len({c.kernel.shape[:2] for c in convs}) > 1:
        return bad[0] if bad else f"the convs reading {x.name!r} differ in stride/groups/channels"
    (strides, group), = geometry
    cout, cin_g = convs[0].kernel.shape[:2]
    size = tuple(max(c.kernel.shape[d] for c in convs) for d in range(2, convs[0].kernel.ndim))
    kernel, bias = np.zeros((cout, cin_g, *size)), np.zeros(cout)
    for t in terms:
        if t.conv is not None:  # zero-pad the kernel to the centre of the largest
            window = tuple(slice((big - k) // 2, (big + k) // 2)
                           for big, k in zip(size, t.kernel.shape[2:], strict=True))
            kernel[(slice(None), slice(None), *window)] += t.kernel
        elif t.src is not None:  # identity: output channel i reads input i (slot i % Cin/g)
            if any(s != 1 for s in strides) or cin_g * group != cout:
                return f"identity term {t.value.name!r} needs stride 1 and Cin == Cout"
            idx = np.arange(cout)
            kernel[(idx, idx % cin_g, *(k // 2 for k in size))] += np.broadcast_to(t.scale, cout)
        bias += np.broadcast_to(t.bias, cout)
    big = max(convs, key=lambda c: c.kernel.size).conv
    dtype = const_array(big.inputs[1]).dtype
    w = builder.const(kernel.astype(dtype), f"{big.inputs[1].name}_merged")
    b = builder.const(bias.astype(dtype), f"{big.name}_bias_merged")
    attrs = {"kernel_shape": list(size), "pads": [k // 2 for k in size] * 2,
             "strides": list(strides), "group": group}
    out = builder.op("Conv", [x, w, b], attrs, at=root, hint=f"{big.name}_merged",
                     like=root.outputs[0], shape=root.outputs[0].shape)
    replace_value(builder, root.outputs[0], out)
    remove_dead(builder.graph, adds + [n for t in terms for n in t.nodes])
    return sum(t.src is not None for t in terms)


def _is_inner(add: ir.Node) -> bool:
    """Whether ``add`` is inside the sum of the one Add that reads it."""
    readers = {node for node, _ in add.outputs[0].uses()}
    return len(readers) == 1 and not add.outputs[0].is_graph_output() \
        and next(iter(readers)).op_type == "Add"


def _visit(builder: Builder, add: ir.Node, report: PassReport) -> tuple[bool, bool]:
    """Merge the sum at ``add``, else the sums nested in it: (merged, was a candidate)."""
    result = _merge(builder, add)
    if isinstance(result, int):
        report.change(f"merge-{result}-branches")
        return True, True
    inner, mark = _tree(add)[1][1:], len(report.skipped)
    nested = [_visit(builder, v.producer(), report) for v in add.inputs
              if v.producer() in inner]
    merged = any(m for m, _ in nested)
    if isinstance(result, str) and not merged:  # say it once, at the outermost sum
        report.skipped[mark:] = [s for s in report.skipped[mark:] if s[1] != result]
        report.skip(add.name, result)
    return merged, result is not None or any(c for _, c in nested)


def apply(model: ir.Model, ctx: PassContext) -> PassReport:
    graph, report, builder = model.graph, ctx.report, Builder(model.graph)  # exact: no samples
    roots = [n for n in graph if n.op_type == "Add" and not _is_inner(n)]
    if not any([_visit(builder, add, report)[1] for add in roots if add.graph is graph]):
        raise PassRefused("no Add sums parallel conv branches that read the same input")
    return report


PASS = Pass(
    name="merge-repvgg",
    summary="merge RepVGG-style parallel conv / 1x1 / identity branches into one conv",
    exact=True,
    apply=apply,
)
