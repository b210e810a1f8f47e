"""Run an HE-friendly ONNX graph under CKKS with TenSEAL: encrypt, evaluate, decrypt.

Packing: one ciphertext per tensor element, with the slots holding independent samples (the
batch). Every ONNX op then maps onto element-wise ciphertext arithmetic over numpy object
arrays: layout ops move ciphertexts around for free, MatMul/Gemm with plaintext weights are
sums of ciphertext × scalar products, ct×ct MatMul sums ciphertext products. Plaintext-only
nodes (weights, shapes) run in the clear with onnx's reference evaluator. Simple and general,
and slow: the cost is one ciphertext operation per scalar multiply-add of the model, so it
suits small models and blocks, not whole transformers.

Parameters come from the checker's depth: ``depth`` rescaling primes of ``scale_bits`` bits
between two 60-bit primes, and the smallest ring degree whose modulus budget (128-bit
security, SEAL's table) holds them. The client (``encrypt``/``decrypt``) and the server
(``evaluate``) share only the public context.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from edgekit.errors import EdgekitError
from edgekit.he.check import check

MAX_BITS = {4096: 109, 8192: 218, 16384: 438, 32768: 881}  # 128-bit security (SEAL)


@dataclass
class Params:
    ring_degree: int
    coeff_mod_bit_sizes: list[int]
    scale_bits: int

    def to_dict(self) -> dict:
        return {"ring_degree": self.ring_degree, "coeff_mod_bit_sizes": self.coeff_mod_bit_sizes,
                "scale_bits": self.scale_bits, "levels": len(self.coeff_mod_bit_sizes) - 2}


def choose_params(depth: int, scale_bits: int = 40) -> Params:
    """The smallest ring with ``depth`` levels of ``scale_bits`` bits at 128-bit security."""
    bits = [60] + [scale_bits] * depth + [60]
    for n, limit in MAX_BITS.items():
        if sum(bits) <= limit and n >= 8192:
            return Params(n, bits, scale_bits)
    most = (MAX_BITS[32768] - 120) // scale_bits
    raise EdgekitError(f"multiplicative depth {depth} needs more than the {most} levels of "
                       f"{scale_bits} bits that CKKS holds at ring degree 32768 without "
                       "bootstrapping (TenSEAL has none): reduce degrees / iterations")


def make_context(params: Params):
    try:
        import tenseal as ts
    except ImportError:
        raise EdgekitError("TenSEAL is not installed: pip install tenseal") from None
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, params.ring_degree,
                     coeff_mod_bit_sizes=params.coeff_mod_bit_sizes)
    ctx.global_scale = 2.0 ** params.scale_bits
    return ctx


def encrypt(ctx, batch: np.ndarray) -> np.ndarray:
    """(samples, *shape) floats -> object array of shape ``shape`` of ciphertexts."""
    import tenseal as ts

    flat = np.asarray(batch, dtype=np.float64).reshape(batch.shape[0], -1)
    cts = np.empty(flat.shape[1], dtype=object)
    for i in range(flat.shape[1]):
        cts[i] = ts.ckks_vector(ctx, flat[:, i].tolist())
    return cts.reshape(batch.shape[1:])


def decrypt(cts: np.ndarray, samples: int) -> np.ndarray:
    flat = [np.asarray(c.decrypt()[:samples]) for c in cts.reshape(-1)]
    return np.stack(flat, axis=1).reshape((samples, *cts.shape))


def _is_ct(v: Any) -> bool:
    return isinstance(v, np.ndarray) and v.dtype == object


def _plain(node: onnx.NodeProto, args: list) -> list[np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    feeds = {n: a for n, a in zip(node.input, args, strict=True) if n}
    return list(ReferenceEvaluator(node).run(None, feeds))


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _obj(a: np.ndarray) -> np.ndarray:
    """A plaintext array as an object array of Python floats (so ciphertext ops dispatch)."""
    out = np.empty(np.shape(a), dtype=object)
    out.reshape(-1)[:] = [float(x) for x in np.reshape(a, -1)]
    return out


def _mul(a, b):
    if not _is_ct(a):
        a, b = b, a
    if _is_ct(b):
        return a * b
    b = np.asarray(b, dtype=np.float64)
    return a * _obj(b)


def _matmul(a, b):
    a = a if _is_ct(a) else _obj(a)
    b = b if _is_ct(b) else _obj(b)
    return np.matmul(a, b)


def _reduce(node: onnx.NodeProto, x: np.ndarray, axes_in, mean: bool):
    axes = axes_in if axes_in is not None else _attr(node, "axes", None)
    keep = bool(_attr(node, "keepdims", 1))
    axes = tuple(range(x.ndim)) if axes is None or np.size(axes) == 0 else tuple(
        int(a) % x.ndim for a in np.reshape(axes, -1))
    out = np.sum(x, axis=axes, keepdims=keep)
    if mean:
        n = int(np.prod([x.shape[a] for a in axes]))
        out = out * _obj(np.full(out.shape, 1.0 / n))
    return out if isinstance(out, np.ndarray) else np.array(out, dtype=object)


def _ct_node(node: onnx.NodeProto, args: list) -> np.ndarray:
    op, x = node.op_type, args[0]
    if op in ("Identity", "Dropout", "Cast"):
        return x
    if op == "Add":
        return args[0] + (args[1] if _is_ct(args[1]) else _obj(args[1]))
    if op == "Sub":
        a, b = args
        return (a if _is_ct(a) else _obj(a)) - (b if _is_ct(b) else _obj(b))
    if op == "Neg":
        return _obj(np.zeros(x.shape)) - x
    if op == "Mul":
        return _mul(args[0], args[1])
    if op == "Div":
        return _mul(x, 1.0 / np.asarray(args[1], dtype=np.float64))
    if op == "MatMul":
        return _matmul(args[0], args[1])
    if op == "Gemm":
        a, b = args[0], args[1]
        a = a.T if _attr(node, "transA", 0) else a
        b = b.T if _attr(node, "transB", 0) else b
        y = _mul(_matmul(a, b), np.float64(_attr(node, "alpha", 1.0)))
        if len(args) > 2 and args[2] is not None:
            c = _mul(args[2], np.float64(_attr(node, "beta", 1.0)))
            y = y + (c if _is_ct(c) else _obj(c))
        return y
    if op in ("ReduceSum", "ReduceMean"):
        return _reduce(node, x, args[1] if len(args) > 1 else None, op == "ReduceMean")
    if op == "Pow":
        p, y = int(np.reshape(args[1], -1)[0]), None
        base = x
        while p:
            if p & 1:
                y = base if y is None else y * base
            p >>= 1
            base = base * base if p else base
        return y
    if op == "Reshape":
        shape = [int(s) for s in args[1]]
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return x.reshape(shape)
    if op == "Transpose":
        return np.transpose(x, _attr(node, "perm", None))
    if op == "Flatten":
        axis = _attr(node, "axis", 1) % x.ndim if x.ndim else 0
        return x.reshape(int(np.prod(x.shape[:axis])), -1)
    if op == "Squeeze":
        axes = args[1] if len(args) > 1 else _attr(node, "axes", None)
        return np.squeeze(x, None if axes is None else tuple(int(a) for a in axes))
    if op == "Unsqueeze":
        axes = args[1] if len(args) > 1 else _attr(node, "axes", None)
        return np.expand_dims(x, tuple(int(a) % (x.ndim + len(axes)) for a in axes))
    if op == "Concat":
        parts = [a if _is_ct(a) else _obj(a) for a in args]
        return np.concatenate(parts, axis=_attr(node, "axis", 0))
    if op == "Gather":
        return np.take(x, np.asarray(args[1], dtype=np.int64), axis=_attr(node, "axis", 0))
    if op == "Expand":
        shape = np.broadcast_shapes(x.shape, tuple(int(s) for s in args[1]))
        return np.broadcast_to(x, shape).copy()
    if op == "Slice":
        starts, ends = args[1], args[2]
        axes = args[3] if len(args) > 3 and args[3] is not None else range(len(starts))
        steps = args[4] if len(args) > 4 and args[4] is not None else [1] * len(starts)
        index = [slice(None)] * x.ndim
        for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
            index[int(a) % x.ndim] = slice(int(s), int(e), int(st))
        return x[tuple(index)]
    raise EdgekitError(f"the CKKS runner does not evaluate {op} (node {node.name!r})")


def evaluate(model: onnx.ModelProto, feeds: dict[str, Any]) -> list[Any]:
    """Server side: evaluate the graph on ciphertext (object arrays) and plaintext feeds."""
    values: dict[str, Any] = dict(feeds)
    for init in model.graph.initializer:
        values[init.name] = numpy_helper.to_array(init)
    for node in model.graph.node:
        args = [values[i] if i else None for i in node.input]
        if not any(_is_ct(a) for a in args):
            outs = _plain(node, args)
        elif node.op_type == "Shape":
            outs = [np.array(args[0].shape, dtype=np.int64)[_attr(node, "start", 0):
                                                            _attr(node, "end", None)]]
        else:
            outs = [_ct_node(node, args)]
        for name, value in zip(node.output, outs, strict=False):
            values[name] = value
    return [values[o.name] for o in model.graph.output]


@dataclass
class CKKSRun:
    outputs: list[np.ndarray]
    params: Params
    depth: int
    seconds: dict[str, float]


def run(model: onnx.ModelProto, inputs: dict[str, np.ndarray], plain_inputs=(),
        scale_bits: int = 40, batch: bool = False) -> CKKSRun:
    """Check, choose parameters, encrypt ``inputs`` (client), evaluate (server), decrypt.

    With ``batch`` the inputs carry a leading sample axis packed into the slots.
    """
    report = check(model, plain_inputs)
    if not report.he_friendly:
        first = report.offenders[0]
        raise EdgekitError(f"the model is not HE-friendly: {first.node!r} ({first.op}): "
                           f"{first.reason} ({len(report.offenders)} offender(s); see he-check)")
    params = choose_params(max(report.depth, 1), scale_bits)
    ctx = make_context(params)
    seconds = {}
    start = time.perf_counter()
    feeds: dict[str, Any] = {}
    samples = 1
    for name, arr in inputs.items():
        arr = np.asarray(arr)
        if name in report.plain_inputs:
            feeds[name] = arr
            continue
        data = arr if batch else arr[None]
        samples = data.shape[0]
        feeds[name] = encrypt(ctx, data)
    seconds["encrypt"] = time.perf_counter() - start
    start = time.perf_counter()
    outs = evaluate(model, feeds)
    seconds["evaluate"] = time.perf_counter() - start
    start = time.perf_counter()
    result = []
    for out in outs:
        if _is_ct(out):
            dec = decrypt(out, samples)
            result.append(dec if batch else dec[0])
        else:
            result.append(np.asarray(out))
    seconds["decrypt"] = time.perf_counter() - start
    return CKKSRun(result, params, report.depth, seconds)
