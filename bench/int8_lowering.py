"""Benchmark: a QDQ graph through LowerQDQ's plain integer form against the same graph in
float, and the compile check on a real QDQ model.

Engines, each the same QDQ ONNX graph compiled for ``host`` (default schedules, untuned) and
timed interleaved in one process (``--rounds`` rounds of ``--number`` runs each; medians):

* ``float``: imported as is (dequantize -> float matmul -> quantize), no LowerQDQ;
* ``int``: LowerQDQ + ExactQuantize, LegalizeOps and the default schedules (no Int8Kernels);
* ``edgekit``: what ``edgekit compile`` builds (frontend's full pass list, so Int8Kernels too
  when present);
* ``ort-qdq``: onnxruntime on the QDQ graph (its default optimizations: int8 kernels).

Before timing, each engine's output on the input is compared with onnxruntime without QDQ
fusions (max abs, cosine), and so is onnxruntime's own run with every QuantizeLinear input
nudged by 1 +- 1e-7 and 1 +- 1e-6 (the compile check's sensitivity, docs/int8.md).

Models: ``stack``, MiniLM-sized matmuls on a 64-token uint8 activation (384x384, 384x1536,
1536x384, each requantized; tests/_qdq_graphs.stack), and with ``--minilm``
all-MiniLM-L6-v2 at 64 tokens quantized by onnxruntime's ``quantize_static`` (QDQ,
per-channel int8 weights, uint8 activations, 16 calibration windows), which also goes
through ``api.compile`` and its check (the manifest's quantization record is printed).

    python bench/int8_lowering.py              # stack only (~1 min)
    python bench/int8_lowering.py --minilm     # + MiniLM (several minutes)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]


def engines(model: onnx.ModelProto, specs, tmp: Path) -> dict:
    """name -> callable(inputs) for the four engines (module docstring)."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend import onnx as relax_onnx

    from edgekit import api
    from edgekit.compiler import frontend
    from edgekit.compiler.build import build
    from edgekit.compiler.qdq import ExactQuantize, LowerQDQ
    from edgekit.targets import load_target
    from edgekit.verify import ort_session

    target = load_target("host")
    tidy = frontend.tidy_onnx(model)
    shapes = {s.name: list(s.shape) for s in specs}
    dtypes = {s.name: s.dtype for s in specs}
    base = relax_onnx.from_onnx(tidy, shape_dict=shapes, dtype_dict=dtypes)

    def vm_of(ex_or_lib):
        vm = relax.VirtualMachine(ex_or_lib, tvm.cpu())
        return lambda args: vm["main"](*args)

    out = {
        "float": vm_of(build(base, target)),
        "int": vm_of(build(tvm.transform.Sequential([LowerQDQ(), ExactQuantize()])(base),
                           target)),
    }
    path = tmp / "model.onnx"
    onnx.save(model, path)
    result = api.compile(path, "host", tmp / "model.edgekit")
    print("  compile check:", json.dumps(result.manifest["verification"].get("quantization")))
    out["edgekit"] = vm_of(tvm.runtime.load_module(str(tmp / "model.edgekit" / "model.so")))
    sess = ort_session(model, threads=1)
    out["ort-qdq"] = lambda args, names=[s.name for s in specs]: sess.run(
        None, {n: a.numpy() for n, a in zip(names, args, strict=True)})
    return out


def time_interleaved(runners: dict, args, rounds: int, number: int) -> dict[str, float]:
    """Median ms per run of each engine, rounds interleaved."""
    import time

    times: dict[str, list[float]] = {k: [] for k in runners}
    for run in runners.values():
        run(args)  # warm-up
    for _ in range(rounds):
        for name, run in runners.items():
            t0 = time.perf_counter()
            for _ in range(number):
                run(args)
            times[name].append((time.perf_counter() - t0) * 1e3 / number)
    return {k: float(np.median(v)) for k, v in times.items()}


def _distance(y, ref) -> str:
    y, ref = np.asarray(y, np.float64).ravel(), np.asarray(ref, np.float64).ravel()
    cos = float(y @ ref / (np.linalg.norm(y) * np.linalg.norm(ref) or 1.0))
    return f"max abs {np.max(np.abs(y - ref)):.3g}, cosine {cos:.4f}"


def sensitivity(model: onnx.ModelProto, inputs: dict) -> None:
    """onnxruntime unfused against itself with QuantizeLinear inputs nudged (qdq_check)."""
    from edgekit.compiler.qdq_check import nudged, reference_session

    ref = reference_session(model).run(None, inputs)[0]
    for eps in (1e-7, -1e-7, 1e-6, -1e-6):
        y = reference_session(nudged(model, 1 + eps)).run(None, inputs)[0]
        print(f"  ort-unfused, QuantizeLinear inputs x (1{eps:+g}): {_distance(y, ref)}")


def bench(name: str, model: onnx.ModelProto, inputs: dict, rounds: int, number: int) -> None:
    import tvm

    from edgekit.compiler.qdq_check import reference_session
    from edgekit.verify import onnx_input_specs

    specs = onnx_input_specs(model, [])
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{name}:")
        runners = engines(model, specs, Path(tmp))
        args = [tvm.runtime.tensor(inputs[s.name]) for s in specs]
        ref = reference_session(model).run(None, inputs)[0]
        print("  against onnxruntime without QDQ fusions, this input:")
        for k, run in runners.items():
            y = run(args)
            y = y[0] if isinstance(y, list) else y.numpy()
            print(f"  {k:8s} {_distance(y, ref)}")
        sensitivity(model, inputs)
        medians = time_interleaved(runners, args, rounds, number)
    base = medians["float"]
    for k, v in medians.items():
        print(f"  {k:8s} {v:8.3f} ms  ({base / v:.2f}x float)")


def minilm_qdq(seq: int, calib: int) -> tuple[onnx.ModelProto, dict]:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from token_prune import minilm_model, minilm_windows

    model, tok = minilm_model(seq)
    windows = minilm_windows(tok, seq, calib + 1)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(windows[:calib])

        def get_next(self):
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "f.onnx", Path(tmp) / "q.onnx"
        onnx.save(model, src)
        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8)
        return onnx.load(dst), windows[calib]


def main() -> None:
    import _qdq_graphs as graphs

    from edgekit import runtime

    ap = argparse.ArgumentParser()
    ap.add_argument("--minilm", action="store_true")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--number", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    runtime.set_threads(a.threads)
    x = np.random.default_rng(0).standard_normal((1, 64, 384)).astype(np.float32)
    bench("stack 64x384 -> 384 -> 1536 -> 384 (uint8 x int8)", graphs.stack(), {"x": x},
          a.rounds, a.number)
    if a.minilm:
        model, window = minilm_qdq(64, 16)
        bench("all-MiniLM-L6-v2, 64 tokens, quantize_static QDQ", model, window, a.rounds,
              max(1, a.number // 5))


if __name__ == "__main__":
    main()
