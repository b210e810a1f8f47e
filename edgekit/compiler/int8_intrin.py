"""Which int8 dot-product instruction a target has, the weight panel layout it reads, and the
TIR tensor intrinsics that emit it.

A ``Layout`` stores the int8 weight ``W[K, N]`` as ``Wp[ceil(N / c), ceil(K / g), c, g]`` with
``Wp[p, q, j, t] = W[q g + t, p c + j]`` (zero outside ``W``): one panel row ``Wp[p, q]`` is
the ``c x g`` block one instruction multiplies by ``g`` activations broadcast to ``c`` lanes,
``C[j] += sum_{t<g} A[t] * B[j, t]``. Activations are converted to ``a_dtype`` first, as
``a = x + shift`` (exact in that type); the kernel then returns ``sum a w - shift * colsum``
with ``colsum[n] = sum_k W[k, n]`` folded into a constant (``shift`` 0 when ``x`` already has
``a_dtype``'s signedness), so its result is always the exact ``sum_k x w`` in int32.

- ``vnni`` (x86 AVX-512 VNNI): ``vpdpbusd`` zmm, u8 x s8, 4 products per int32 lane, 16 lanes:
  ``c = 16, g = 4``, activations uint8 (int8 ones shifted by +128).
- ``avx2`` (x86 AVX2 without VNNI): ``vpmaddwd``: 16 signed 16-bit products, adjacent pairs
  added into 8 int32 lanes: ``c = 8, g = 2``, activations int16, weights sign-extended from
  int8 on load (``vpmovsxbw``). ``|a w| <= 255 * 128``: a pair sum never saturates (unlike
  u8 x s8 ``vpmaddubsw``, whose int16 pair sum can).
- ``avx2_u8s8`` (AVX2, for weights whose pairs cannot saturate): ``vpmaddubsw`` multiplies 32
  u8 x s8 bytes and adds adjacent pairs into 16 int16 lanes with saturation, ``vpmaddwd`` by
  ones adds those pairs into 8 int32 lanes: ``c = 8, g = 4``, activations uint8, twice the
  products per instruction of ``avx2``. Used per kernel where every pair of consecutive
  weights ``(w[2i], w[2i+1])`` of a column keeps ``255 * (sum of its positive weights) <=
  32767`` and ``255 * (sum of its negative ones) >= -32768`` (``fits_u8s8``; always true for
  7-bit weights, ``|w| <= 64``, what ``quantize-int8:reduce_range=true`` writes), so no pair
  sum saturates for any uint8 activation and the result stays exact.
- ``sdot`` (aarch64 with the dot-product extension): ``sdot`` s8 x s8, 4 lanes of 4 products:
  ``c = 4, g = 4``, activations int8 (uint8 ones shifted by -128).
- ``plain`` (any other CPU): the ``avx2`` layout as a plain loop nest that LLVM vectorizes
  (widening multiply-adds such as NEON ``smlal``).

Preconditions: weights int8; activations int8 or uint8; ``K < 2**16`` (no int32 overflow:
``|sum| <= K * 255 * 128 < 2**31``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Layout:
    """Packing of the weight panels and the instruction that reads them."""

    isa: str  # "vnni" | "avx2" | "sdot" | "plain"
    cols: int  # output columns per panel = int32 lanes of one instruction
    group: int  # consecutive K values multiplied and summed into one lane
    a_dtype: str  # activations are converted to this (shifted by +-128 across signedness)
    accumulators: int  # int32 vector accumulators a register tile may hold
    intrin: str | None  # registered TensorIntrin name (None: plain loops)

    def shift(self, x_dtype: str) -> int:
        """What the conversion of ``x_dtype`` activations to ``a_dtype`` adds."""
        if self.a_dtype == "uint8" and x_dtype == "int8":
            return 128
        if self.a_dtype == "int8" and x_dtype == "uint8":
            return -128
        return 0


# Accumulators: registers minus the weight vectors, the broadcast activations and a product
# (16 ymm on AVX2: 12 accumulators spilled one to the stack; 32 zmm / 32 NEON q registers).
VNNI = Layout("vnni", 16, 4, "uint8", 24, "edgekit_avx512_vpdpbusd_16x4")
AVX2 = Layout("avx2", 8, 2, "int16", 10, "edgekit_avx2_pmaddwd_8x2")
AVX2_U8S8 = Layout("avx2_u8s8", 8, 4, "uint8", 10, "edgekit_avx2_pmaddubsw_8x4")
SDOT = Layout("sdot", 4, 4, "int8", 24, "edgekit_neon_sdot_4x4")
PLAIN = Layout("plain", 8, 2, "int16", 10, None)
LAYOUTS = (VNNI, AVX2, AVX2_U8S8, SDOT, PLAIN)
# a faster layout a target may use for the kernels whose weights fit it (``for_weights``)
_NARROWER = {AVX2: AVX2_U8S8}


def cpu_features(tvm_target) -> frozenset[str]:
    """LLVM's feature names (``avx2``, ``avx512vnni``, ``dotprod``...) enabled on a target."""
    from tvm.target import codegen

    if tvm_target is None or tvm_target.kind.name != "llvm":
        return frozenset()
    return frozenset(str(f) for f in codegen.llvm_get_cpu_features(tvm_target))


def choose(tvm_target) -> Layout:
    """The layout for a target, from its LLVM features (never from this machine's CPU)."""
    features = cpu_features(tvm_target)
    triple = str(tvm_target.attrs.get("mtriple", "")) if tvm_target is not None else ""
    arm = triple.startswith(("aarch64", "arm64")) or "neon" in features
    if arm:
        return SDOT if "dotprod" in features else PLAIN
    if {"avx512vnni", "avx512bw", "avx512f"} <= features:
        return VNNI
    return AVX2 if "avx2" in features else PLAIN


def fits_u8s8(matrix: np.ndarray) -> bool:
    """Whether ``vpmaddubsw`` is exact on ``W[K, N]`` for all uint8 activations: no int16 sum
    of a pair ``(W[2i, n], W[2i+1, n])`` times values in [0, 255] leaves [-32768, 32767]."""
    w = matrix.astype(np.int32)
    if w.shape[0] % 2:
        w = np.concatenate([w, np.zeros((1, w.shape[1]), np.int32)])
    pairs = w.reshape(-1, 2, w.shape[1])
    high = np.clip(pairs, 0, None).sum(axis=1).max(initial=0) * 255
    low = np.clip(pairs, None, 0).sum(axis=1).min(initial=0) * 255
    return bool(high <= 32767 and low >= -32768)


def for_weights(layout: Layout, matrix: np.ndarray) -> Layout:
    """The target's ``layout``, or the faster one it also runs where ``matrix`` (``W[K, N]``,
    rows in the order the kernel reads them) fits that one exactly."""
    narrow = _NARROWER.get(layout)
    return narrow if narrow is not None and fits_u8s8(matrix) else layout


def runs_on(layout: Layout, tvm_target) -> bool:
    """Whether ``tvm_target`` has ``layout``'s instruction (else: plain loops, still exact)."""
    if layout.intrin is None:
        return False
    native = choose(tvm_target)
    return layout is native or layout is _NARROWER.get(native)


def register(layout: Layout) -> None:
    """Register ``layout``'s tensor intrinsic (idempotent)."""
    from tvm.s_tir import TensorIntrin

    if layout.intrin and TensorIntrin.get(layout.intrin, allow_missing=True) is None:
        TensorIntrin.register(layout.intrin, *_funcs(layout))


def _funcs(layout: Layout) -> tuple[Any, Any]:
    """(description, implementation) of ``c[j] += sum_t a[t] * b[j, t]``; ``c`` is the local
    accumulator tile of the schedule (``cache_write``)."""
    from tvm.script import tirx as T

    c_, g_, adt = layout.cols, layout.group, layout.a_dtype
    lanes = c_ * g_  # activation bytes broadcast = weight elements per instruction

    @T.prim_func(s_tir=True)
    def desc(a: T.Buffer((g_,), adt, offset_factor=1),
             b: T.Buffer((c_, g_), "int8", offset_factor=1),
             c: T.Buffer((c_,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(c[0:c_], a[0:g_], b[0:c_, 0:g_])
            T.writes(c[0:c_])
            for i, t in T.grid(c_, g_):
                with T.sblock("update"):
                    vi, vt = T.axis.remap("SR", [i, t])
                    c[vi] = c[vi] + T.cast(a[vt], "int32") * T.cast(b[vi, vt], "int32")

    if layout.isa == "avx2_u8s8":
        def compute(a, b, acc):
            quad = T.reinterpret(a.vload([0], "uint8x4"), dtype="int32")  # vpbroadcastd
            a8 = T.reinterpret(T.broadcast(quad, 8), dtype="uint8x32")
            pairs = T.call_llvm_pure_intrin(  # u8 x s8, adjacent pairs summed into int16
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"), a8,
                b.vload([0, 0], "int8x32"), dtype="int16x16")
            return acc + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), pairs,
                T.broadcast(T.int16(1), 16), dtype="int32x8")
    elif layout.isa == "avx2":
        def compute(a, b, acc):
            pair = T.reinterpret(a.vload([0], "int16x2"), dtype="int32")  # vpbroadcastd
            a16 = T.reinterpret(T.broadcast(pair, 8), dtype="int16x16")
            b16 = T.Cast("int16x16", b.vload([0, 0], "int8x16"))  # vpmovsxbw
            return acc + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), a16, b16,
                dtype="int32x8")
    else:
        # LLVM 22 types both multiplicands as bytes (<64 x i8> / <16 x i8>); TVM 0.27's own
        # dot_16x4_vnni passes <16 x i32> and fails LLVM's verifier.
        name = {"vnni": "llvm.x86.avx512.vpdpbusd.512",
                "sdot": "llvm.aarch64.neon.sdot.v4i32.v16i8"}[layout.isa]

        def compute(a, b, acc):
            quad = T.reinterpret(a.vload([0], f"{adt}x4"), dtype="int32")
            a_vec = T.reinterpret(T.broadcast(quad, c_), dtype=f"int8x{lanes}")
            b_vec = b.vload([0, 0], f"int8x{lanes}")
            return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(name), acc, a_vec, b_vec,
                                           dtype=f"int32x{c_}")

    @T.prim_func(s_tir=True)
    def impl(a: T.Buffer((g_,), adt, offset_factor=1),
             b: T.Buffer((c_, g_), "int8", offset_factor=1),
             c: T.Buffer((c_,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(c[0:c_], a[0:g_], b[0:c_, 0:g_])
            T.writes(c[0:c_])
            c[T.ramp(T.int32(0), 1, c_)] = compute(a, b, c.vload([0], f"int32x{c_}"))

    return desc, impl
