"""Benchmark: matmul and GEMV kernels (``edgekit.compiler.cache_blocking``, ``gemv``) against the
fixed-tile schedule and onnxruntime, with the memory bandwidth the GEMVs could reach.

For each shape ``MxKxN`` (``A[M, K] @ B[K, N]``, fp32) one kernel is compiled for the host
target three ways: the default schedules as they are now (cache-blocked matmul, GEMV rule),
the fixed register tile (``schedules.schedule_func`` without a ``machine.Machine``: the
schedule before cache blocking), and onnxruntime running a one-MatMul ONNX model with ``B`` a
constant. At each thread count all three are timed with their calls interleaved (so a change
in machine load hits all alike); printed: median ms and GFLOP/s (2 M K N / time) per engine.

Memory bandwidth: a STREAM triad ``a = b + s * c`` over three 32 MiB arrays, compiled with
edgekit's default schedule at the same thread count and timed in the same rounds, counted as
3 x 32 MiB per call (STREAM's convention). For ``M == 1`` the kernel reads ``K N`` weights
once: its "share" is ``4 K N / time`` over that triad bandwidth (the issue's goal: >= 80%).

    python bench/gemv.py                         # BERT FFN / projection, GPT-2 LM head shapes
    python bench/gemv.py --shapes 1x768x50257 --threads 1,2 --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgekit.runtime import set_threads  # noqa: E402

SHAPES = ("128x768x768", "128x768x3072", "128x3072x768", "32x768x50257", "1x768x50257",
          "1x768x3072", "1x3072x768")
TRIAD_FLOATS = 8 << 20  # 32 MiB per array: far past any L3 share


def _matmul_module(m: int, k: int, n: int):
    import tvm  # noqa: F401
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((m, k), "float32"))
    w = relax.Var("w", relax.TensorType((k, n), "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(x, w))
        bb.emit_func_output(out)
    return bb.get()


def _triad_module(size: int):
    from tvm import relax

    bb = relax.BlockBuilder()
    b = relax.Var("b", relax.TensorType((size,), "float32"))
    c = relax.Var("c", relax.TensorType((size,), "float32"))
    with bb.function("main", [b, c]):
        with bb.dataflow():
            scaled = bb.emit(relax.op.multiply(c, relax.const(3.0, "float32")))
            out = bb.emit_output(relax.op.add(b, scaled))
        bb.emit_func_output(out)
    return bb.get()


def compile_vm(mod, fixed_tiles: bool = False):
    """A VirtualMachine for ``mod`` on the host target, default schedules; ``fixed_tiles``:
    every kernel through ``schedule_func`` without the machine model (the earlier tiles)."""
    import tvm
    from tvm import relax

    from edgekit.compiler import pipeline, schedules
    from edgekit.targets import load_target

    target = load_target("host").tvm_target()
    mod = pipeline.lower(mod, target)
    if fixed_tiles:
        cores = int(target.attrs.get("num-cores", 0) or 0) or 2
        for gv, func in list(mod.functions.items()):
            if isinstance(func, tvm.tirx.PrimFunc):
                new = schedules.schedule_func(func, cores, 8)
                if new is not None:
                    mod.update_func(gv, new.with_attr(schedules.SCHEDULED, True))
    else:
        mod, _ = schedules.apply_default(mod, target)
    return relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())


def ort_matmul(k: int, n: int, w: np.ndarray, threads: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def interleaved(calls: dict, rounds: int, repeat: int) -> dict[str, float]:
    """Median seconds per call, ``rounds`` interleaved blocks of ``repeat`` calls each (two
    untimed calls first: the engine before may still have threads spinning)."""
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for key, fn in calls.items():
            fn()
            fn()
            for _ in range(repeat):
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> int:
    import tvm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help="MxKxN,...")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]
    threads = [int(t) for t in args.threads.split(",")]
    rng = np.random.default_rng(0)
    triad = compile_vm(_triad_module(TRIAD_FLOATS))
    tb, tc = (tvm.runtime.tensor(rng.standard_normal(TRIAD_FLOATS, "float32")) for _ in "bc")
    print(f"{'shape':>14} {'thr':>3} {'engine':>12} {'ms':>9} {'GFLOP/s':>8} {'GB/s':>6} "
          f"{'share':>6}")
    for m, k, n in shapes:
        a = rng.standard_normal((m, k), "float32")
        w = rng.standard_normal((k, n), "float32")
        ta, tw = tvm.runtime.tensor(a), tvm.runtime.tensor(w)
        vms = {"blocked": compile_vm(_matmul_module(m, k, n))}
        try:
            vms["fixed-tile"] = compile_vm(_matmul_module(m, k, n), fixed_tiles=True)
        except Exception as exc:  # noqa: BLE001 - the old schedule fails on some shapes
            print(f"{f'{m}x{k}x{n}':>14} fixed-tile does not compile: "
                  f"{str(exc).strip().splitlines()[-1][:80]}", flush=True)
        ref = a.astype(np.float64) @ w
        for name, vm in vms.items():
            got = vm["main"](ta, tw).numpy()
            err = float(np.abs(got - ref).max() / np.abs(ref).max())
            if err > 1e-5:
                raise SystemExit(f"{m}x{k}x{n} {name}: relative error {err:.1e}")
        for t in threads:
            set_threads(t)
            sess = ort_matmul(k, n, w, t)
            calls = {name: (lambda vm=vm, ta=ta, tw=tw: vm["main"](ta, tw))
                     for name, vm in vms.items()}
            calls["onnxruntime"] = lambda s=sess, a=a: s.run(None, {"x": a})
            calls["triad"] = lambda: triad["main"](tb, tc)
            med = interleaved(calls, args.rounds, args.repeat)
            bandwidth = 3 * TRIAD_FLOATS * 4 / med.pop("triad") / 1e9
            for name, sec in med.items():
                gbs = 4 * k * n / sec / 1e9
                share = f"{gbs / bandwidth:6.0%}" if m == 1 else f"{'-':>6}"
                print(f"{f'{m}x{k}x{n}':>14} {t:>3} {name:>12} {sec * 1e3:9.3f} "
                      f"{2 * m * k * n / sec / 1e9:8.1f} {gbs:6.1f} {share}", flush=True)
            print(f"{f'{m}x{k}x{n}':>14} {t:>3} {'triad':>12} {'':>9} {'':>8} "
                  f"{bandwidth:6.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
