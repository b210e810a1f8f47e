"""Benchmark: one model's int8 artifact against its fp32 artifact and onnxruntime, end to end.

Four engines, timed interleaved in one process (``--rounds`` rounds of ``--number`` calls
each, medians), for each thread count: the edgekit int8 artifact, the edgekit fp32 artifact,
onnxruntime on the same QDQ graph (its default optimizations, i.e. its int8 kernels) and
onnxruntime on the float graph. Inputs: ``--inputs x.npz`` (e.g. a real text window for a
token model), else seeded. ``bench/quantize.py`` builds the artifacts from scratch; this
script times artifacts you already have:

    edgekit rewrite m.onnx -o q.onnx --passes quantize-int8 --calibration calib.npz
    edgekit compile q.onnx --target host -o q.edgekit
    edgekit compile m.onnx --target host -o f.edgekit
    python bench/int8_e2e.py q.edgekit f.edgekit q.onnx m.onnx --threads 1,2
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx

from edgekit import runtime
from edgekit.arrays import load_npz
from edgekit.verify import onnx_input_specs, ort_session, seeded_inputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("int8_artifact")
    ap.add_argument("fp32_artifact")
    ap.add_argument("qdq_onnx")
    ap.add_argument("fp32_onnx")
    ap.add_argument("--inputs", help=".npz of the model's inputs (default: seeded)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--number", type=int, default=3)
    args = ap.parse_args()
    q, f = runtime.load(args.int8_artifact), runtime.load(args.fp32_artifact)
    qdq, fp32 = onnx.load(args.qdq_onnx), onnx.load(args.fp32_onnx)
    x = seeded_inputs(onnx_input_specs(fp32, []), 0)
    if args.inputs:
        given = load_npz(args.inputs)
        x = {k: given[k] for k in x}
    for threads in (int(t) for t in args.threads.split(",")):
        runtime.set_threads(threads)
        oq, of = ort_session(qdq, threads=threads), ort_session(fp32, threads=threads)
        engines = {"edgekit-int8": lambda: q.run(x), "edgekit-fp32": lambda: f.run(x),
                   "ort-qdq": lambda oq=oq: oq.run(None, x),
                   "ort-fp32": lambda of=of: of.run(None, x)}
        times: dict[str, list[float]] = {k: [] for k in engines}
        for call in engines.values():
            call()
        for _ in range(args.rounds):
            for name, call in engines.items():
                start = time.perf_counter()
                for _ in range(args.number):
                    call()
                times[name].append((time.perf_counter() - start) / args.number * 1e3)
        med = {k: float(np.median(v)) for k, v in times.items()}
        print(f"threads {threads}: " + "  ".join(f"{k} {v:.2f} ms" for k, v in med.items()))
        i8 = med["edgekit-int8"]
        print(f"  int8 / edgekit fp32 {i8 / med['edgekit-fp32']:.2f}x, / ort-qdq "
              f"{i8 / med['ort-qdq']:.2f}x, / ort-fp32 {i8 / med['ort-fp32']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
