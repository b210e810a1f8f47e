"""Benchmark: edgekit's int8 GEMM kernels (``Int8Kernels``) against edgekit's float32 kernel and
onnxruntime (MatMulInteger, QDQ MatMul, float MatMul) on the same shapes, one process.

Per shape ``x[M, K] @ W[K, N]`` (MiniLM projections at 64 and 128 tokens, ResNet-50's 1x1
convolutions as GEMMs over pixels) and ResNet-50's 3x3 convs, GOP/s = 2 M K N (2 H W 9 C O)
/ median time of:

- ``edgekit int8``: ``matmul(int8, int8 const, out int32) -> astype -> * scale + bias`` through
  ``Int8Kernels`` and the default schedules (epilogue fused), for this machine's CPU;
- ``edgekit fp32``: ``matmul(float32) + bias`` with edgekit's default schedule;
- ``ort MatMulInteger`` (int8 x int8 -> int32; ConvInteger u8 x s8 for the convs),
  ``ort QDQ`` (Q/DQ around MatMul / Conv, as onnxruntime's quantizer writes it, uint8
  activations), ``ort fp32`` (MatMul + Add / Conv).

ResNet-50's 3x3 convolutions run as convs, in the layouts the compile pipeline gives them
(edgekit int8: NCHW, as ``LowerQDQ`` leaves them for ``Int8Kernels``; edgekit fp32: NHWC,
after ``ChannelsLast``; onnxruntime: NCHW, its own layout choices).

Engines are timed interleaved (round-robin, ``--rounds`` rounds of ``--calls`` calls each), with
the same thread count (``--threads``, default 2). The int8 result is checked exactly against
NumPy before timing.

    python bench/int8_kernels.py            # every shape
    python bench/int8_kernels.py --quick    # MiniLM at 64 tokens only
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgekit.runtime import set_threads

MINILM = [(f"minilm{t} {k}x{n}", t, k, n) for t in (64, 128)
          for k, n in ((384, 384), (384, 1536), (1536, 384))]
RESNET = [(f"resnet50 1x1 {hw}px {k}->{n}", hw, k, n) for hw, k, n in (
    (3136, 64, 256), (3136, 256, 64), (784, 128, 512), (784, 512, 128),
    (196, 256, 1024), (196, 1024, 256), (49, 512, 2048), (49, 2048, 512))]
# ResNet-50's 3x3 convolutions (stride 1, padding 1) as convs: (H = W, C = O); M K N of the
# same GEMM size is (H W, 9 C, O)
RESNET3X3 = [(f"resnet50 3x3 {h}x{h}x{c}", h, c) for h, c in ((56, 64), (28, 128), (14, 256),
                                                           (7, 512))]


def _tvm_fn(m: int, k: int, n: int, w: np.ndarray, quantized: bool, conv: int = 0):
    """(callable running the compiled kernel, its input) for this machine's CPU; ``conv``: a
    3x3 NHWC conv over a ``conv x conv x k`` input (``w``: HWIO) instead of a matmul."""
    import tvm
    from tvm import relax
    from tvm.script import relax as R

    from edgekit.compiler.build import build
    from edgekit.compiler.int8_kernels import Int8Kernels
    from edgekit.targets import load_target

    target = load_target("host")
    rng = np.random.default_rng(1)
    dtype = "int8" if quantized else "float32"
    bb = relax.BlockBuilder()
    # convs as the compile pipeline gives them: int8 NCHW (LowerQDQ, before ChannelsLast),
    # float NHWC (ChannelsLast)
    nchw = bool(conv) and quantized
    x_shape = ((1, k, conv, conv) if nchw else (1, conv, conv, k)) if conv else (1, m, k)
    x = relax.Var("x", R.Tensor(x_shape, dtype))
    bias = relax.const(rng.standard_normal((n, 1, 1) if nchw else n).astype(np.float32))

    def product(weights, **kw):
        if nchw:
            return relax.op.nn.conv2d(x, relax.const(weights.transpose(3, 2, 0, 1).copy()),
                                      padding=(1, 1, 1, 1), **kw)
        if conv:
            return relax.op.nn.conv2d(x, relax.const(weights), padding=(1, 1, 1, 1),
                                      data_layout="NHWC", kernel_layout="HWIO", **kw)
        return relax.op.matmul(x, relax.const(weights), **kw)

    with bb.function("main", [x]):
        with bb.dataflow():
            if quantized:
                y = bb.emit(product(w, out_dtype="int32"))
                scale = rng.uniform(1e-4, 1e-3, n).astype(np.float32)
                y = bb.emit(relax.op.multiply(relax.op.astype(y, "float32"), relax.const(
                    scale.reshape(n, 1, 1) if nchw else scale)))
            else:
                y = bb.emit(product(w.astype(np.float32)))
            out = bb.emit_output(relax.op.add(y, bias))
        bb.emit_func_output(out)
    mod = bb.get()
    if quantized:
        mod = Int8Kernels(target.tvm_target())(mod)
    vm = relax.VirtualMachine(build(mod, target), tvm.cpu())
    xa = (rng.integers(-128, 128, x_shape).astype(np.int8) if quantized
          else rng.standard_normal(x_shape).astype(np.float32))
    arg = tvm.runtime.tensor(xa)
    return (lambda: vm["main"](arg)), xa


def _ort_session(nodes, inputs, inits, threads: int, out_type=TensorProto.FLOAT):
    graph = helper.make_graph(nodes, "g", inputs,
                              [helper.make_tensor_value_info("y", out_type, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def _ort_fns(m: int, k: int, n: int, w: np.ndarray, threads: int) -> dict:
    rng = np.random.default_rng(2)
    xf = rng.standard_normal((1, m, k)).astype(np.float32)
    xq = rng.integers(-128, 128, (1, m, k)).astype(np.int8)
    vi = helper.make_tensor_value_info
    wq = numpy_helper.from_array(w, "w")
    scale = numpy_helper.from_array(np.float32(0.02), "s")
    zp = numpy_helper.from_array(np.uint8(128), "z")  # QUInt8 activations
    wscale = numpy_helper.from_array(np.full(n, 0.01, np.float32), "ws")
    bias = numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b")
    wf = numpy_helper.from_array(w.astype(np.float32) * 0.01, "wf")
    integer = _ort_session([helper.make_node("MatMulInteger", ["x", "w"], ["y"])],
                           [vi("x", TensorProto.INT8, [1, m, k])], [wq], threads,
                           TensorProto.INT32)
    qdq = _ort_session([
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "ws"], ["wd"], axis=1),
        helper.make_node("MatMul", ["xd", "wd"], ["mm"]),
        helper.make_node("Add", ["mm", "b"], ["y"])],
        [vi("x", TensorProto.FLOAT, [1, m, k])], [wq, scale, zp, wscale, bias], threads)
    fp32 = _ort_session([helper.make_node("MatMul", ["x", "wf"], ["mm"]),
                         helper.make_node("Add", ["mm", "b"], ["y"])],
                        [vi("x", TensorProto.FLOAT, [1, m, k])], [wf, bias], threads)
    return {"ort MatMulInteger": lambda: integer.run(None, {"x": xq}),
            "ort QDQ": lambda: qdq.run(None, {"x": xf}),
            "ort fp32": lambda: fp32.run(None, {"x": xf})}


def _ort_conv_fns(h: int, c: int, w_hwio: np.ndarray, threads: int) -> dict:
    """ConvInteger, QDQ Conv and float Conv (NCHW, 3x3, padding 1) on onnxruntime."""
    rng = np.random.default_rng(2)
    o = w_hwio.shape[3]
    w = np.ascontiguousarray(w_hwio.transpose(3, 2, 0, 1))  # OIHW
    xf = rng.standard_normal((1, c, h, h)).astype(np.float32)
    xq = rng.integers(0, 256, (1, c, h, h)).astype(np.uint8)
    vi = helper.make_tensor_value_info
    pads = {"pads": [1, 1, 1, 1]}
    wq = numpy_helper.from_array(w, "w")
    init = [numpy_helper.from_array(np.float32(0.02), "s"),
            numpy_helper.from_array(np.uint8(128), "z"),
            numpy_helper.from_array(np.full(o, 0.01, np.float32), "ws"),
            numpy_helper.from_array(rng.standard_normal(o).astype(np.float32), "b")]
    integer = _ort_session([helper.make_node("ConvInteger", ["x", "w"], ["y"], **pads)],
                           [vi("x", TensorProto.UINT8, [1, c, h, h])], [wq], threads,
                           TensorProto.INT32)
    qdq = _ort_session([
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "ws"], ["wd"], axis=0),
        helper.make_node("Conv", ["xd", "wd", "b"], ["y"], **pads)],
        [vi("x", TensorProto.FLOAT, [1, c, h, h])], [wq, *init], threads)
    fp32 = _ort_session([helper.make_node("Conv", ["x", "wf", "b"], ["y"], **pads)],
                        [vi("x", TensorProto.FLOAT, [1, c, h, h])],
                        [numpy_helper.from_array(w.astype(np.float32) * 0.01, "wf"), init[3]],
                        threads)
    return {"ort MatMulInteger": lambda: integer.run(None, {"x": xq}),
            "ort QDQ": lambda: qdq.run(None, {"x": xf}),
            "ort fp32": lambda: fp32.run(None, {"x": xf})}


def _check_int8(m: int, k: int, n: int, w: np.ndarray) -> None:
    """The int8 kernel without epilogue equals the int64 NumPy product."""
    import tvm
    from tvm import relax
    from tvm.script import relax as R

    from edgekit.compiler.build import build
    from edgekit.compiler.int8_kernels import Int8Kernels
    from edgekit.targets import load_target

    target = load_target("host")
    bb = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor((1, m, k), "int8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(x, relax.const(w), out_dtype="int32"))
        bb.emit_func_output(out)
    vm = relax.VirtualMachine(build(Int8Kernels(target.tvm_target())(bb.get()), target),
                              tvm.cpu())
    xa = np.random.default_rng(3).integers(-128, 128, (1, m, k)).astype(np.int8)
    if not np.array_equal(vm["main"](tvm.runtime.tensor(xa)).numpy(),
                          xa.astype(np.int64) @ w.astype(np.int64)):
        raise SystemExit(f"int8 kernel {m}x{k}x{n} differs from NumPy")


def bench_shape(m: int, k: int, n: int, threads: int, rounds: int, calls: int) -> dict:
    w = np.random.default_rng(0).integers(-128, 128, (k, n)).astype(np.int8)
    _check_int8(m, k, n, w)
    fns = {"edgekit int8": _tvm_fn(m, k, n, w, True)[0],
           "edgekit fp32": _tvm_fn(m, k, n, w, False)[0], **_ort_fns(m, k, n, w, threads)}
    return _rates(fns, 2 * m * k * n, rounds, calls)


def bench_conv(h: int, c: int, threads: int, rounds: int, calls: int) -> dict:
    """A 3x3 conv (padding 1, C -> C channels); the int8 kernel's exactness is covered by
    tests/test_int8_kernels.py."""
    w = np.random.default_rng(0).integers(-128, 128, (3, 3, c, c)).astype(np.int8)
    fns = {"edgekit int8": _tvm_fn(0, c, c, w, True, conv=h)[0],
           "edgekit fp32": _tvm_fn(0, c, c, w, False, conv=h)[0],
           **_ort_conv_fns(h, c, w, threads)}
    return _rates(fns, 2 * h * h * 9 * c * c, rounds, calls)


def _rates(fns: dict, ops: int, rounds: int, calls: int) -> dict:
    """GOP/s per engine: medians of ``rounds`` interleaved rounds of ``calls`` calls."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():  # warm-up
        for _ in range(3):
            fn()
    for _ in range(rounds):  # round-robin: load from other processes hits every engine alike
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - start) / calls)
    return {name: ops / statistics.median(t) / 1e9 for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="MiniLM at 64 tokens only")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=10)
    args = ap.parse_args()
    set_threads(args.threads)
    shapes = MINILM[:3] if args.quick else MINILM + RESNET + RESNET3X3
    header = None
    for label, *dims in shapes:
        if len(dims) == 2:
            rates = bench_conv(*dims, args.threads, args.rounds, args.calls)
        else:
            rates = bench_shape(*dims, args.threads, args.rounds, args.calls)
        if header is None:
            header = list(rates)
            print(f"{'shape (GOP/s, median)':34}" + "".join(f"{h:>18}" for h in header)
                  + f"{'int8/fp32':>11}")
        print(f"{label:34}" + "".join(f"{rates[h]:18.1f}" for h in header)
              + f"{rates['edgekit int8'] / rates['edgekit fp32']:10.2f}x", flush=True)
    print(f"threads {args.threads}; onnx {onnx.__version__}, onnxruntime {ort.__version__}")


if __name__ == "__main__":
    main()
