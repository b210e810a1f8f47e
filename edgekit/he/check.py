"""The HE checker: can this ONNX graph run under CKKS, and at what multiplicative depth?

Every tensor is either *plaintext* (initializers, constants, shapes, inputs the server may see
such as a sequence length, and anything computed only from those: the server computes it in
the clear) or *ciphertext* (the encrypted inputs and everything that depends on them). For a
ciphertext tensor the checker propagates (polynomial degree in the inputs, multiplicative
depth), following techniques.md §3:

* Add / Sub / Sum / Neg: max over the ciphertext operands (a plaintext operand is free);
* Mul, and Div by a plaintext: ct·pt costs one level and keeps the degree; ct·ct costs one
  level beyond the deeper operand and adds the degrees;
* MatMul / Gemm / Conv with plaintext weights: one level (ct×ct MatMul, as in QKᵀ and AV: one
  level beyond the deeper operand, degrees add); ReduceSum is free, ReduceMean costs the
  plaintext 1/n; Pow by a constant positive integer p: ⌈log2 p⌉ levels, degree × p;
* layout ops (Reshape, Transpose, Slice, Concat, Gather, Pad with zeros, ...) are free when
  their indices / shapes are plaintext.

Anything else on a ciphertext (Exp, Softmax, Erf, Div by a ciphertext, comparisons, ...) is
an *offender*, reported with its node name; propagation continues past it so that one run
lists them all.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from edgekit.onnx_nodes import attr as _attr

FREE = {"Add", "Sub", "Sum", "Neg", "Identity", "ReduceSum"}
LAYOUT = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Expand", "Slice",
          "Concat", "Gather", "Split", "Tile", "Pad", "Dropout"}
LINEAR = {"MatMul", "Gemm", "Conv", "ConvTranspose"}


@dataclass(frozen=True)
class Info:
    degree: int
    depth: int


@dataclass
class Offender:
    node: str
    op: str
    reason: str

    def to_dict(self) -> dict:
        return {"node": self.node, "op": self.op, "reason": self.reason}


@dataclass
class HEReport:
    """The checker's verdict; ``tensors`` maps every ciphertext tensor to its Info."""

    depth: int
    degree: int
    offenders: list[Offender]
    outputs: dict[str, Info]
    tensors: dict[str, Info] = field(default_factory=dict)
    plain_inputs: list[str] = field(default_factory=list)
    ciphertext_ops: dict[str, int] = field(default_factory=dict)
    cut: dict | None = None  # the client/server cut made first (``he.cut.Cut.to_dict``)

    @property
    def he_friendly(self) -> bool:
        return not self.offenders

    def to_dict(self, tensors: bool = True) -> dict:
        out = {
            "he_friendly": self.he_friendly,
            "depth": self.depth,
            "degree": self.degree,
            "offenders": [o.to_dict() for o in self.offenders],
            "outputs": {k: {"degree": v.degree, "depth": v.depth}
                        for k, v in self.outputs.items()},
            "plain_inputs": self.plain_inputs,
            "ciphertext_ops": self.ciphertext_ops,
        }
        if self.cut is not None:
            out["cut"] = self.cut
        if tensors:
            out["tensors"] = {k: {"degree": v.degree, "depth": v.depth}
                              for k, v in self.tensors.items()}
        return out


def check(model: onnx.ModelProto, plain_inputs: Iterable[str] = ()) -> HEReport:
    """Propagate (degree, depth) through ``model``; ``plain_inputs`` are not encrypted."""
    graph = model.graph
    plain = set(plain_inputs)
    inits = {i.name: i for i in graph.initializer}
    names = {i.name for i in graph.input}
    unknown = plain - names
    if unknown:
        from edgekit.errors import EdgekitError

        raise EdgekitError(f"--plain {sorted(unknown)[0]!r} is not an input of the model "
                           f"(inputs: {', '.join(i.name for i in graph.input)})")
    consts: dict[str, np.ndarray] = {k: numpy_helper.to_array(v) for k, v in inits.items()}
    ct: dict[str, Info] = {i.name: Info(1, 0) for i in graph.input
                           if i.name not in inits and i.name not in plain}
    offenders: list[Offender] = []
    ops: Counter = Counter()
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    consts[node.output[0]] = numpy_helper.to_array(a.t)
        enc = [ct[i] for i in node.input if i in ct]
        if not enc:
            continue  # plaintext only: the server computes it in the clear
        ops[node.op_type] += 1
        info, why = _rule(node, [ct.get(i) for i in node.input], consts)
        if why:
            offenders.append(Offender(node.name, node.op_type, why))
            info = Info(max(e.degree for e in enc), max(e.depth for e in enc))
        if node.op_type in ("Shape", "Size"):
            continue  # shapes are public
        for o in node.output:
            if o:
                ct[o] = info
    outputs = {o.name: ct.get(o.name, Info(0, 0)) for o in graph.output}
    return HEReport(max((v.depth for v in outputs.values()), default=0),
                    max((v.degree for v in outputs.values()), default=0), offenders, outputs,
                    dict(ct), sorted(plain), dict(sorted(ops.items())))


def _rule(node: onnx.NodeProto, ins: list[Info | None], consts: dict) -> tuple[Info, str]:
    """(Info of the outputs, "") or (anything, reason it is not HE-evaluable)."""
    op = node.op_type
    enc = [i for i in ins if i is not None]
    top = Info(max(e.degree for e in enc), max(e.depth for e in enc))
    if node.domain not in ("", "ai.onnx"):
        return top, f"custom-domain op {node.domain}.{op} is not known to be HE-evaluable"
    if op in FREE or op in ("Shape", "Size"):
        return top, ""
    if op in LAYOUT:
        if any(i is not None for i in ins[1:]) and op not in ("Concat", "Sum"):
            return top, f"{op} with encrypted indices / shape"
        if op == "Pad" and _attr(node, "mode", b"constant") != b"constant":
            return top, "Pad in a non-constant mode"
        return top, ""
    if op == "Cast":
        to = _attr(node, "to", 0)
        ok = to in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)
        return top, "" if ok else "Cast of a ciphertext to a non-float type"
    if op in ("Mul", "MatMul", "Gemm") or op in LINEAR:
        if op in ("Conv", "ConvTranspose") and len(ins) > 1 and ins[1] is not None:
            return top, "Conv with an encrypted weight"
        a, b = ins[0], ins[1] if len(ins) > 1 else None
        if a is not None and b is not None:
            return Info(a.degree + b.degree, max(a.depth, b.depth) + 1), ""
        return Info(top.degree, top.depth + 1), ""
    if op == "Div":
        if len(ins) > 1 and ins[1] is not None:
            return top, "Div by a ciphertext (needs a reciprocal: poly-div or poly-* passes)"
        return Info(top.degree, top.depth + 1), ""
    if op == "ReduceMean":
        return Info(top.degree, top.depth + 1), ""
    if op == "Pow":
        p = consts.get(node.input[1]) if len(node.input) > 1 else None
        if ins[1] is not None or p is None or p.size != 1:
            return top, "Pow with a non-constant exponent"
        e = float(np.reshape(p, -1)[0])
        if e < 1 or e != int(e):
            return top, f"Pow with exponent {e:g} (only positive integers are polynomials)"
        return Info(top.degree * int(e), top.depth + math.ceil(math.log2(e))), ""
    hints = {"Softmax": "poly-softmax", "Gelu": "poly-gelu", "Erf": "poly-gelu",
             "LayerNormalization": "poly-layernorm", "Tanh": "poly-act", "Sigmoid": "poly-act"}
    hint = f" (the {hints[op]} pass replaces it)" if op in hints else ""
    return top, f"{op} is not a polynomial on ciphertexts{hint}"


def load(path) -> onnx.ModelProto:
    """Read and validate an ONNX file for checking (dynamic dims are fine here)."""
    from pathlib import Path

    from edgekit.errors import EdgekitError, first_line

    path = Path(path)
    if not path.is_file():
        raise EdgekitError(f"ONNX file not found: {path}")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:  # protobuf DecodeError, checker errors
        raise EdgekitError(f"{path} is not a valid ONNX model: {first_line(exc)}") from None
    return model
