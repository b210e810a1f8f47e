"""Run an HE-friendly ONNX graph under CKKS: encrypt, evaluate, decrypt.

Two packings. Per element (the default): one ciphertext per tensor element, the slots holding
independent samples (the batch); every ONNX op maps onto element-wise ciphertext arithmetic
over numpy object arrays: layout ops move ciphertexts around for free, MatMul/Gemm with
plaintext weights are sums of ciphertext × scalar products (one rescale per sum), ct×ct MatMul
sums ciphertext products. Simple and general, and slow: one ciphertext operation per scalar
multiply-add, so it suits small models. Token-packed (``packed=True``, edgekit.he.packed):
the sequence axis of a transformer block lives in the slots, for attention blocks.
Plaintext-only nodes (weights, shapes) run in the clear with onnx's reference evaluator.

Parameters come from the checker's depth: ``depth`` rescaling primes of ``scale_bits`` bits
(40, or fewer — down to 30 — when 40 does not fit) between a first prime ``HEADROOM`` bits
above the scale (at most 60) and a 60-bit key-switching prime, and the smallest
ring degree whose modulus budget (128-bit security, SEAL's table) holds them. Ciphertexts
keep exact scales (edgekit.he.seal). The client (``encrypt``/``decrypt``) and the server
(``evaluate``) share only the public keys.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from edgekit.errors import EdgekitError
from edgekit.he import packed as pk
from edgekit.he.check import check
from edgekit.he.graph_walk import evaluate_graph
from edgekit.he.seal import Engine
from edgekit.onnx_nodes import attr as _attr

MAX_BITS = {4096: 109, 8192: 218, 16384: 438, 32768: 881}  # 128-bit security (SEAL)


@dataclass
class Params:
    ring_degree: int
    coeff_mod_bit_sizes: list[int]
    scale_bits: int

    def to_dict(self) -> dict:
        return {"ring_degree": self.ring_degree, "coeff_mod_bit_sizes": self.coeff_mod_bit_sizes,
                "scale_bits": self.scale_bits, "levels": len(self.coeff_mod_bit_sizes) - 2}


MIN_SCALE_BITS = 30  # below this the rescaling noise reaches the 1e-4 range
# bits of the first prime above the scale: decrypted values must stay below 2^HEADROOM / 2.
# Not 60 regardless: a rotation's key-switching noise grows with first prime / special prime
# (measured at 30-bit scale, ring 32768: 2e-3 absolute per rotation with a 60-bit first prime)
HEADROOM = 20


def choose_params(depth: int, scale_bits: int | None = None) -> Params:
    """The smallest ring with ``depth`` levels of ``scale_bits`` bits at 128-bit security.

    Without ``scale_bits``: 40 bits, or the most bits (≥ 30) that fit ring 32768.
    """
    choices = [scale_bits] if scale_bits else [40, *range(39, MIN_SCALE_BITS - 1, -1)]
    for bits_each in choices:
        bits = [min(60, bits_each + HEADROOM)] + [bits_each] * depth + [60]
        for n, limit in MAX_BITS.items():
            if sum(bits) <= limit and n >= 8192:
                return Params(n, bits, bits_each)
    least = scale_bits or MIN_SCALE_BITS
    most = (MAX_BITS[32768] - 60 - min(60, least + HEADROOM)) // least
    raise EdgekitError(f"multiplicative depth {depth} needs more than the {most} levels of "
                       f"{least} bits that CKKS holds at ring degree 32768 without "
                       "bootstrapping (TenSEAL has none): reduce degrees / iterations")


def make_engine(params: Params, rotations=()) -> Engine:
    return Engine(params.ring_degree, params.coeff_mod_bit_sizes, params.scale_bits, rotations)


def encrypt(engine: Engine, batch: np.ndarray) -> np.ndarray:
    """(samples, *shape) floats -> object array of shape ``shape`` of ciphertexts."""
    flat = np.asarray(batch, dtype=np.float64).reshape(batch.shape[0], -1)
    cts = np.empty(flat.shape[1], dtype=object)
    for i in range(flat.shape[1]):
        cts[i] = engine.encrypt(flat[:, i])
    return cts.reshape(batch.shape[1:])


def decrypt(cts: np.ndarray, samples: int) -> np.ndarray:
    flat = [c.e.decrypt(c)[:samples] for c in cts.reshape(-1)]
    return np.stack(flat, axis=1).reshape((samples, *cts.shape))


def _is_ct(v: Any) -> bool:
    return isinstance(v, np.ndarray) and v.dtype == object


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
    if _is_ct(a) and not _is_ct(b) and np.ndim(b) == 2 and a.ndim >= 1:
        w = np.asarray(b, dtype=np.float64)  # Σ wᵢ·xᵢ with one rescale per output
        out = np.empty((*a.shape[:-1], w.shape[1]), dtype=object)
        for o in np.ndindex(*a.shape[:-1]):
            row = list(a[o])
            for j in range(w.shape[1]):
                out[(*o, j)] = row[0].e.lincomb(row, list(w[:, j]))
        return out
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


def evaluate(model: onnx.ModelProto, feeds: dict[str, Any], trace=None) -> list[Any]:
    """Server side: evaluate the graph on ciphertext (object arrays) and plaintext feeds.

    ``trace(node, value)`` is called with every ciphertext result (debugging: it decrypts).
    """
    hook = None if trace is None else (lambda node, value: trace(node, {"element": value}))
    return evaluate_graph(model, feeds, _is_ct, lambda v: v.shape, _ct_node, hook)


@dataclass
class CKKSRun:
    outputs: list[np.ndarray]
    params: Params
    depth: int
    seconds: dict[str, float]
    packing: str = "element"
    trace: list | None = None  # edgekit.he.trace.TraceRow per ciphertext result


def run(model: onnx.ModelProto, inputs: dict[str, np.ndarray], plain_inputs=(),
        scale_bits: int | None = None, batch: bool = False, packed: bool = False,
        trace: bool = False) -> CKKSRun:
    """Check, choose parameters, encrypt ``inputs`` (client), evaluate (server), decrypt.

    With ``batch`` the inputs carry a leading sample axis packed into the slots (per-element
    packing). With ``packed`` the token axis (-2) of the encrypted inputs goes into the slots.
    ``trace`` decrypts every intermediate ciphertext and compares it with onnxruntime.
    """
    report = check(model, plain_inputs)
    if not report.he_friendly:
        first = report.offenders[0]
        raise EdgekitError(f"the model is not HE-friendly: {first.node!r} ({first.op}): "
                           f"{first.reason} ({len(report.offenders)} offender(s); see he-check)")
    if packed and batch:
        raise EdgekitError("--packed puts the tokens in the slots: no batch packing with it")
    encrypted = {k: np.asarray(v) for k, v in inputs.items() if k not in report.plain_inputs}
    seq = 0
    if packed:
        seqs = {int(v.shape[-2]) for v in encrypted.values() if v.ndim >= 2}
        if len(seqs) != 1:
            raise EdgekitError("--packed needs encrypted inputs of shape (..., seq, width) "
                               "sharing one seq")
        seq = seqs.pop()
        if seq & (seq - 1):
            raise EdgekitError(f"--packed needs a power-of-two sequence length (got {seq}): "
                               "the key-axis sums are rotate-and-add over log2(seq) steps")
    params = choose_params(max(report.depth, 1), scale_bits)
    if seq * seq > params.ring_degree // 2:
        raise EdgekitError(f"--packed needs seq² ≤ {params.ring_degree // 2} slots (got {seq})")
    seconds = {}
    start = time.perf_counter()
    engine = make_engine(params, pk.rotations(seq) if packed else ())
    seconds["keys"] = time.perf_counter() - start
    recorder = None
    if trace:
        from edgekit.he.trace import Recorder

        first = {k: np.asarray(v)[0] if batch else np.asarray(v) for k, v in inputs.items()}
        recorder = Recorder(model, first, (lambda v: pk.decrypt(engine, v, seq)) if packed
                            else (lambda v: decrypt(v, 1)[0]))
    hook = recorder.record if recorder else None
    start = time.perf_counter()
    feeds: dict[str, Any] = {}
    samples = 1
    need = pk.needed_layouts(model, set(encrypted)) if packed else {}
    for name, arr in inputs.items():
        arr = np.asarray(arr)
        if name not in encrypted:
            feeds[name] = arr
        elif packed:
            feeds[name] = {k: pk.encrypt(engine, arr, k, seq) for k in need.get(name, set())}
        else:
            data = arr if batch else arr[None]
            samples = data.shape[0]
            feeds[name] = encrypt(engine, data)
    seconds["encrypt"] = time.perf_counter() - start
    start = time.perf_counter()
    if packed:
        outs = pk.evaluate(engine, model, feeds, seq, need, trace=hook)
    else:
        outs = evaluate(model, feeds, trace=hook)
    seconds["evaluate"] = time.perf_counter() - start
    start = time.perf_counter()
    result = []
    for out in outs:
        if packed and isinstance(out, dict):
            result.append(pk.decrypt(engine, out[pk.ROW], seq))
        elif _is_ct(out):
            dec = decrypt(out, samples)
            result.append(dec if batch else dec[0])
        else:
            result.append(np.asarray(out))
    seconds["decrypt"] = time.perf_counter() - start
    if trace:
        seconds.pop("evaluate")  # decrypting every node makes it meaningless
    return CKKSRun(result, params, report.depth, seconds, "tokens" if packed else "element",
                   recorder.rows if recorder else None)
