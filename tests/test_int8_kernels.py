"""Int8Kernels: int8 x int8 -> int32 matmuls / 1x1 convs over packed weights, exact against an
int64 NumPy reference with a fused float epilogue; structure (packed constant, fusable op
pattern, tensorized ``vpmaddwd``); the aarch64 kernel under qemu-user."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import relax as R

from edgekit.compiler import int8_intrin, int8_schedule, pipeline
from edgekit.compiler.build import build, export_library
from edgekit.compiler.int8_kernels import Int8Kernels, pack_weights
from edgekit.errors import EdgekitError
from edgekit.targets import load_target

HALF = np.float32(0.5)  # a power of two: the float epilogue stays exact (|acc| < 2^24)


def _weights(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-128, 128, shape).astype(np.int8)


def _inputs(shape, dtype, seed=1) -> np.ndarray:
    lo, hi = (-128, 128) if dtype == "int8" else (0, 256)
    return np.random.default_rng(seed).integers(lo, hi, shape).astype(dtype)


def _module(x_shape, x_dtype, w, conv: dict | None = None, epilogue: bool = True):
    """``main(x) = op(x, w, out int32)`` [``-> astype(float32) * 0.5 + bias``], and the bias."""
    n = w.shape[0] if conv and conv.get("kernel_layout", "OIHW") == "OIHW" else w.shape[-1]
    bias = np.arange(n, dtype=np.float32) - 7
    bb = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor(x_shape, x_dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            if conv is None:
                y = relax.op.matmul(x, relax.const(w), out_dtype="int32")
            else:
                y = relax.op.nn.conv2d(x, relax.const(w), out_dtype="int32", **conv)
            if epilogue:
                y = bb.emit(relax.op.astype(bb.emit(y), "float32"))
                y = bb.emit(relax.op.multiply(y, relax.const(HALF)))
                y = relax.op.add(y, relax.const(bias.reshape(_bias_shape(conv))))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get(), bias


def _bias_shape(conv: dict | None) -> list[int]:
    return [1, -1, 1, 1] if conv is not None and conv.get("data_layout", "NCHW") == "NCHW" \
        else [-1]


def _reference(x, w, conv, bias, epilogue=True) -> np.ndarray:
    x64, w64 = x.astype(np.int64), w.astype(np.int64)
    acc = x64 @ w64 if conv is None else _conv_reference(x64, w64, conv)
    if not epilogue:
        return acc.astype(np.int32)
    return (acc.astype(np.float64) * 0.5 + bias.reshape(_bias_shape(conv))).astype(np.float32)


def _conv_reference(x, w, conv) -> np.ndarray:
    """Direct NHWC/HWIO convolution in int64 (zero padding), in the data layout given."""
    nchw = conv.get("data_layout", "NCHW") == "NCHW"
    x = x.transpose(0, 2, 3, 1) if nchw else x
    w = w.transpose(2, 3, 1, 0) if conv.get("kernel_layout", "OIHW") == "OIHW" else w
    top, left, bottom, right = conv.get("padding", (0, 0, 0, 0))
    (sh, sw), (dh, dw) = conv.get("strides", (1, 1)), conv.get("dilation", (1, 1))
    xp = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    kh, kw = w.shape[:2]
    oh = (xp.shape[1] - dh * (kh - 1) - 1) // sh + 1
    ow = (xp.shape[2] - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((x.shape[0], oh, ow, w.shape[3]), np.int64)
    for i in range(kh):
        for j in range(kw):
            rows = slice(i * dh, i * dh + sh * (oh - 1) + 1, sh)
            patch = xp[:, rows, j * dw:j * dw + sw * (ow - 1) + 1:sw]
            out += np.einsum("nhwc,co->nhwo", patch, w[i, j])
    return out.transpose(0, 3, 1, 2) if nchw else out


def _run(mod, target, x) -> np.ndarray:
    vm = relax.VirtualMachine(build(Int8Kernels(target.tvm_target())(mod), target), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


CASES = {  # name: (x shape, x dtype, w shape, conv attributes)
    "minilm-64x384x384": ((1, 64, 384), "int8", (384, 384), None),
    "m1": ((1, 1, 40), "int8", (40, 24), None),
    "m7-odd-k-n21": ((7, 37), "int8", (37, 21), None),
    "uint8-batched-k6": ((2, 7, 6), "uint8", (6, 40), None),
    "conv1x1-nchw": ((1, 64, 7, 7), "int8", (48, 64, 1, 1), {}),
    "conv1x1-nhwc-s2-uint8": ((1, 8, 8, 36), "uint8", (1, 1, 36, 20),
                              {"strides": (2, 2), "data_layout": "NHWC",
                               "kernel_layout": "HWIO", "out_layout": "NHWC"}),
    "conv3x3-nchw-pad1": ((1, 16, 14, 14), "int8", (32, 16, 3, 3), {"padding": (1, 1, 1, 1)}),
    "conv3x3-c3-s2-nhwc-uint8": ((1, 15, 15, 3), "uint8", (3, 3, 3, 24),  # C=3: padded to 4
                                 {"strides": (2, 2), "padding": (1, 0, 2, 1),
                                  "data_layout": "NHWC", "kernel_layout": "HWIO",
                                  "out_layout": "NHWC"}),
    "conv3x3-dilated-n10": ((1, 8, 9, 9), "int8", (10, 8, 3, 3),
                            {"padding": (2, 2, 2, 2), "dilation": (2, 2)}),
}


@pytest.fixture(scope="module")
def host():
    return load_target("host")


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_is_exact_with_fused_epilogue(case, host):
    x_shape, dtype, w_shape, conv = CASES[case]
    w = _weights(w_shape)
    mod, bias = _module(x_shape, dtype, w, conv)
    x = _inputs(x_shape, dtype)
    np.testing.assert_array_equal(_run(mod, host, x), _reference(x, w, conv, bias))


@pytest.mark.parametrize("case", ["m7-odd-k-n21", "conv1x1-nhwc-s2-uint8",
                                  "conv3x3-c3-s2-nhwc-uint8"])
def test_plain_path_without_avx2_is_exact(case):
    """A CPU without AVX2 (generic x86-64): the same layout, a plain vectorized loop nest."""
    target = load_target('{"kind": "llvm", "mcpu": "x86-64", "num-cores": 2}')
    assert int8_intrin.choose(target.tvm_target()) == int8_intrin.PLAIN
    x_shape, dtype, w_shape, conv = CASES[case]
    w = _weights(w_shape, seed=5)
    mod, bias = _module(x_shape, dtype, w, conv, epilogue=False)
    x = _inputs(x_shape, dtype, seed=6)
    np.testing.assert_array_equal(_run(mod, target, x), _reference(x, w, conv, bias, False))


def test_grouped_int8_conv_is_left_to_the_plain_path_and_exact(host):
    w = _weights((16, 4, 3, 3))
    conv = {"padding": (1, 1, 1, 1), "groups": 2}
    mod, bias = _module((1, 8, 10, 10), "int8", w, conv, epilogue=False)
    text = Int8Kernels(host.tvm_target())(mod).script()
    assert "R.nn.conv2d" in text and "call_tir" not in text
    x = _inputs((1, 8, 10, 10), "int8")
    want = np.concatenate([_conv_reference(x[:, 4 * g:4 * g + 4].astype(np.int64),
                                           w[8 * g:8 * g + 8].astype(np.int64), conv)
                           for g in range(2)], axis=1)
    np.testing.assert_array_equal(_run(mod, host, x), want.astype(np.int32))


def test_pack_weights_layout():
    w = _weights((37, 21))
    wp = pack_weights(w, int8_intrin.AVX2)
    assert wp.shape == (3, 19, 8, 2) and wp.dtype == np.int8
    for k, n in ((0, 0), (36, 20), (5, 9), (17, 16)):
        assert wp[n // 8, k // 2, n % 8, k % 2] == w[k, n]
    assert not wp[2, :, 5:, :].any() and not wp[:, 18, :, 1].any()  # zero padding


def test_constant_is_packed_and_kernel_fuses_its_epilogue():
    target = load_target("x86-64-v3").tvm_target()
    w = _weights((384, 96))
    mod, _ = _module((1, 64, 384), "int8", w)
    out = Int8Kernels(target)(mod)
    text = out.script()
    assert "R.matmul" not in text and "R.call_tir" in text
    consts = [c.value.numpy() for c in _constants(out["main"])]
    assert any(c.shape == (12, 192, 8, 2) and np.array_equal(
        c, pack_weights(w, int8_intrin.AVX2)) for c in consts)
    legal = relax.transform.AnnotateTIROpPattern()(relax.transform.LegalizeOps()(out))
    assert int(legal[int8_schedule.GEMM].attrs["op_pattern"]) == 4  # kOutEWiseFusable
    lowered = pipeline.lower(out, target)
    kernels = [gv.name_hint for gv, f in lowered.functions.items()
               if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(kernels) == 1 and "gemm" in kernels[0] and "add" in kernels[0], kernels


def _constants(func) -> list:
    found = []
    relax.analysis.post_order_visit(
        func, lambda e: found.append(e) if isinstance(e, tvm.ir.expr.GenericConst) else None)
    return found


@pytest.mark.parametrize("case", ["m7-odd-k-n21", "conv3x3-nchw-pad1"])
def test_avx2_kernel_is_tensorized_to_vpmaddwd(case):
    """Compiled for x86-64-v3 (AVX2), whatever this machine is: only the assembly is read."""
    target = load_target("x86-64-v3")
    x_shape, dtype, w_shape, conv = CASES[case]
    mod, _ = _module(x_shape, dtype, _weights(w_shape), conv)
    scheduled, info = pipeline.prepare(Int8Kernels(target.tvm_target())(mod), target)
    # one kernel: the column slice, NCHW transpose and float epilogue fused into the product
    assert info["default_schedules"] == info["kernels"] == 1
    assert "llvm.x86.avx2.pmadd.wd" in scheduled.script()
    asm = tvm.compile(scheduled, target=target.tvm_target()).mod.imports[0].inspect_source(
        "asm")
    assert "vpmaddwd" in asm


def _seven_bit(shape, conv: dict | None = None, seed=0) -> np.ndarray:
    """Weights in [-64, 64] (``reduce_range``'s 7 bits and the pair bound's edge), with the
    worst pairs of input channels in output 0: both +64, and -64 next."""
    w = np.random.default_rng(seed).integers(-64, 65, shape).astype(np.int8)
    if conv is None:
        w[:2, 0], w[2:4, 0] = 64, -64
    elif conv.get("kernel_layout", "OIHW") == "OIHW":
        w[0, :2, 0, 0], w[0, 2:4, 0, 0] = 64, -64
    else:  # HWIO
        w[0, 0, :2, 0], w[0, 0, 2:4, 0] = 64, -64
    return w


def test_fits_u8s8_is_the_int16_pair_bound():
    fits = int8_intrin.fits_u8s8
    assert fits(np.array([[64], [64]], np.int8)) and fits(np.array([[-64], [-64]], np.int8))
    assert fits(np.array([[127], [-127]], np.int8))  # opposite signs never saturate
    assert fits(np.array([[127], [1]], np.int8))  # 255 * 128 = 32640
    assert not fits(np.array([[127], [2]], np.int8))  # 255 * 129 = 32895
    assert not fits(np.array([[-100], [-29]], np.int8))  # 255 * -129 < -32768
    assert fits(np.array([[0], [127], [1]], np.int8))  # pairs are rows (0, 1), (2, pad)
    assert not fits(_weights((64, 8)))  # full-range weights keep vpmaddwd
    host = load_target("x86-64-v3").tvm_target()
    assert int8_intrin.runs_on(int8_intrin.AVX2_U8S8, host)
    assert not int8_intrin.runs_on(int8_intrin.AVX2_U8S8, load_target(CASCADELAKE).tvm_target())


@pytest.mark.parametrize("case", ["minilm-64x384x384", "m7-odd-k-n21", "uint8-batched-k6",
                                  "conv1x1-nchw", "conv3x3-c3-s2-nhwc-uint8"])
def test_seven_bit_weights_take_vpmaddubsw_and_stay_exact(case, host):
    """Weights that fit the int16 pair sums: the u8 x s8 layout, exact at the saturation edge
    (activations 255 / -128 against pairs of +-64)."""
    x_shape, dtype, w_shape, conv = CASES[case]
    w = _seven_bit(w_shape, conv)
    mod, bias = _module(x_shape, dtype, w, conv)
    v3 = load_target("x86-64-v3").tvm_target()
    consts = [c.value.numpy() for c in _constants(Int8Kernels(v3)(mod)["main"])]
    assert any(c.dtype == np.int8 and c.ndim == 4 and c.shape[2:] == (8, 4) for c in consts)
    for x in (_inputs(x_shape, dtype, seed=3),
              np.full(x_shape, 255 if dtype == "uint8" else -128, dtype)):
        np.testing.assert_array_equal(_run(mod, host, x), _reference(x, w, conv, bias))


def test_u8s8_kernel_is_tensorized_to_vpmaddubsw():
    target = load_target("x86-64-v3")
    x_shape, dtype, w_shape, conv = CASES["conv3x3-nchw-pad1"]
    mod, _ = _module(x_shape, dtype, _seven_bit(w_shape, conv), conv)
    scheduled, info = pipeline.prepare(Int8Kernels(target.tvm_target())(mod), target)
    assert info["default_schedules"] == info["kernels"] == 1
    asm = tvm.compile(scheduled, target=target.tvm_target()).mod.imports[0].inspect_source(
        "asm")
    assert "vpmaddubsw" in asm and "vpmaddwd" in asm


CASCADELAKE = '{"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "cascadelake"}'


def test_layout_follows_target_features():
    def layout(name):
        return int8_intrin.choose(load_target(name).tvm_target())

    assert layout("x86-64-v3") == layout("x86-64-v4") == int8_intrin.AVX2
    assert layout(CASCADELAKE) == int8_intrin.VNNI  # AVX-512 VNNI
    assert layout("aarch64-linux") == layout("rpi4") == int8_intrin.PLAIN  # Cortex-A72
    assert layout("rpi5") == int8_intrin.SDOT  # Cortex-A76: dot-product extension


@pytest.mark.parametrize("case", ["minilm-64x384x384", "conv3x3-nchw-pad1"])
def test_vnni_kernel_shifts_int8_and_emits_vpdpbusd(case):
    """No VNNI CPU here: the codegen is checked (assembly), the numerics run under qemu for
    the same shift-and-compensate scheme (sdot with uint8 activations)."""
    target = load_target(CASCADELAKE)
    x_shape, dtype, w_shape, conv = CASES[case]
    w = _weights(w_shape)
    mod = Int8Kernels(target.tvm_target())(_module(x_shape, dtype, w, conv)[0])
    assert "R.subtract" in mod.script()  # - 128 * colsum(W), int8 activations made uint8
    colsum = w.astype(np.int64).sum(0) if conv is None else w.astype(np.int64).sum((1, 2, 3))
    consts = [c.value.numpy().ravel() for c in _constants(mod["main"])]
    assert any(np.array_equal(c, 128 * colsum) for c in consts)
    scheduled, info = pipeline.prepare(mod, target)
    assert info["default_schedules"] == info["kernels"] == 1
    asm = tvm.compile(scheduled, target=target.tvm_target()).mod.imports[0].inspect_source(
        "asm")
    assert "vpdpbusd" in asm


def test_other_ops_are_left_alone(host):
    bb = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor((4, 8), "int8"))
    wv = relax.Var("w", R.Tensor((8, 8), "int8"))
    xf = relax.Var("xf", R.Tensor((4, 8), "float32"))
    with bb.function("main", [x, wv, xf]):
        with bb.dataflow():
            a = bb.emit(relax.op.matmul(x, wv, out_dtype="int32"))  # weights not constant
            b = bb.emit(relax.op.matmul(xf, relax.const(np.ones((8, 8), np.float32))))
            c = bb.emit(relax.op.matmul(x, relax.const(_weights((8, 8)).view(np.uint8)),
                                        out_dtype="int32"))  # uint8 weights
            out = bb.emit_output(relax.Tuple([a, b, c]))
        bb.emit_func_output(out)
    mod = bb.get()
    tvm.ir.assert_structural_equal(Int8Kernels(host.tvm_target())(mod), mod)


@pytest.mark.parametrize("target_name,case", [("rpi4", "m7-odd-k-n21"),
                                              ("rpi5", "m7-odd-k-n21"),
                                              ("rpi5", "uint8-batched-k6"),
                                              ("rpi5", "conv3x3-c3-s2-nhwc-uint8")])
def test_aarch64_kernel_under_qemu(target_name, case, tmp_path):
    """rpi4 (Cortex-A72): plain NEON loops; rpi5 (Cortex-A76): ``sdot``, uint8 activations
    shifted by -128 and compensated."""
    from edgekit.devices import toolchain

    if not (shutil.which("aarch64-linux-gnu-g++") and shutil.which("qemu-aarch64")):
        pytest.skip("needs g++-aarch64-linux-gnu and qemu-user")
    try:
        binary, rt = toolchain.build_runner("aarch64")
    except EdgekitError as exc:  # no cached aarch64 runtime wheels and no network
        pytest.skip(str(exc))
    target = load_target(target_name)
    x_shape, dtype, w_shape, conv = CASES[case]
    w = _weights(w_shape, seed=9)
    mod, bias = _module(x_shape, dtype, w, conv)
    x = _inputs(x_shape, dtype, seed=10)
    lib_dir = tmp_path
    executable = build(Int8Kernels(target.tvm_target())(mod), target)
    if target_name == "rpi5":
        assert "sdot" in executable.mod.imports[0].inspect_source("asm")
    export_library(executable, target, lib_dir / "m.so")
    np.save(lib_dir / "x.npy", x)
    out = lib_dir / "out"
    out.mkdir()
    proc = subprocess.run([*toolchain.launcher("aarch64", rt), str(binary),
                           str(lib_dir / "m.so"), "--warmup", "0", "--repeat", "1",
                           "--out", str(out), str(lib_dir / "x.npy")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = np.load(json.loads(proc.stdout)["outputs"][0]["file"])
    np.testing.assert_array_equal(got, _reference(x, w, conv, bias))

