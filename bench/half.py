"""Benchmark: convert-fp16 and convert-bf16 on the real fixtures, accuracy and size, one run.

Per model (``quantize_data``: digits-vit and the merged digits-cnn on the 540 held-out digit
images; all-MiniLM-L6-v2 on held-out windows of real text at ``--seq`` tokens) and per format:

* the pass's ledger: status, fp32 islands (rule / measured), max error on the calibration
  samples, the op with the largest per-op error (the locator's first row);
* accuracy on held-out data the calibration never saw, in onnxruntime: top-1 (digits) or the
  embedding cosine against the fp32 model (mean, min); bfloat16 runs as the pass check runs it
  (``_half.ort_form``: fp32 arithmetic rounded to bfloat16 at every op output), float16 as
  onnxruntime's CPU provider runs the float16 graph;
* size: float weight bytes and the ONNX file, against fp32;
* ``--qemu N``: the float16 graph compiled for ``rpi5`` (Cortex-A76, +fullfp16) and run on
  the first N held-out inputs under qemu-aarch64 through the C++ runner, against fp32
  onnxruntime (max norm-wise relative error, cosine / top-1 agreement). Emulation: no timing;
* latency: only where this machine computes the format natively (``compiler.half``); the
  16-bit and fp32 artifacts interleaved call by call, medians. Elsewhere the table says why.

    python bench/half.py --quick                    # digits models (~2 min)
    python bench/half.py --models minilm --seq 128 --calib 16 --held-out 48
    python bench/half.py --qemu 3                    # + rpi5 fp16 under qemu (slow: MiniLM
                                                     #   ~2.5 min per call under emulation)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import quantize_data as data  # noqa: E402 - beside this script

from edgekit import api, runtime  # noqa: E402
from edgekit.compiler import half as native  # noqa: E402
from edgekit.passes._half import ort_form, weight_bytes  # noqa: E402
from edgekit.targets import load_target  # noqa: E402
from edgekit.verify import ort_session  # noqa: E402

FORMATS = {"fp16": "float16", "bf16": "bfloat16"}


def outputs(model: onnx.ModelProto, inputs: list[dict]) -> np.ndarray:
    sess = ort_session(ort_form(model))
    return np.concatenate([sess.run(None, x)[0] for x in inputs])


def qemu_check(case: data.Case, model: onnx.ModelProto, count: int, work: Path) -> str:
    from edgekit.devices import runner, toolchain

    src, art = work / f"{case.name}-fp16.onnx", work / f"{case.name}-fp16-rpi5.edgekit"
    onnx.save(model, src)
    api.compile(src, "rpi5", art)
    toolchain.build_runner("aarch64")
    ref = ort_session(case.model)
    errs, agree = [], []
    for x in case.held_out[:count]:
        got = next(iter(runner.invoke(art, x, "qemu", warmup=0, repeat=1)[0].values()))
        want = ref.run(None, x)[0]
        errs.append(float(np.max(np.abs(got - want)) / np.max(np.abs(want))))
        agree.append(float(got.ravel() @ want.ravel() / np.linalg.norm(got)
                           / np.linalg.norm(want)) if case.name.startswith("minilm")
                     else float(got.argmax() == want.argmax()))
    what = "cos min" if case.name.startswith("minilm") else "top-1 agree"
    return f"rpi5 qemu: max rel err {max(errs):.2g}, {what} {min(agree):.6f} on {count}"


def latency(case: data.Case, model: onnx.ModelProto, fmt: str, rounds: int, work: Path) -> str:
    why = native.native_problem(FORMATS[fmt], load_target("host"))
    if why:
        return f"no latency: this machine's host target {why.split(', so')[0]}"
    engines = {}
    for name, m in (("fp32", case.model), (fmt, model)):
        src, art = work / f"{case.name}-{name}.onnx", work / f"{case.name}-{name}-host.edgekit"
        onnx.save(m, src)
        api.compile(src, "host", art)
        engines[name] = runtime.load(art)
    x = case.held_out[0]
    times: dict[str, list[float]] = {k: [] for k in engines}
    for _ in range(rounds):  # interleaved: load changes hit both alike
        for name, eng in engines.items():
            start = time.perf_counter()
            eng.run(x)
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return (f"latency host: fp32 {med['fp32']:.3f} ms, {fmt} {med[fmt]:.3f} ms "
            f"({med['fp32'] / med[fmt]:.2f}x), medians of {rounds}")


def run_case(case: data.Case, args: argparse.Namespace, work: Path) -> None:
    ref = outputs(case.model, case.held_out)
    base = case.score(ref)
    fp32_file = len(case.model.SerializeToString())
    print(f"\n## {case.name}: {case.data}")
    print(f"fp32: {base}, weights {weight_bytes(case.model) / 1e6:.2f} MB")
    for fmt in args.formats:
        start = time.perf_counter()
        result = api.rewrite(case.model, f"convert-{fmt}", calibration=case.calibration)
        run = result.ledger_dicts()[0]
        secs = time.perf_counter() - start
        if run["status"] != "applied":
            print(f"{fmt}: {run['status']}: {run['message']}")
            continue
        details = run["details"]
        measured = sum(why.startswith("measured") for why in details["islands"].values())
        top = details["locator"][0]
        model = result.model
        score = case.score(outputs(model, case.held_out))
        print(f"{fmt}: {score}; weights {weight_bytes(model) / weight_bytes(case.model):.3f}x, "
              f"file {len(model.SerializeToString()) / fp32_file:.3f}x; "
              f"{len(details['islands'])} fp32 islands ({measured} measured); "
              f"check max rel err {run['max_rel_error']:.2g} (budget {run['budget']:g}); "
              f"largest per-op error {top['rel_error']:.2g} at {top['node']} ({top['op']}, "
              f"{top['precision']}); pass {secs:.0f} s")
        if fmt == "fp16" and args.qemu:
            print("   ", qemu_check(case, model, args.qemu, work))
        print("   ", latency(case, model, fmt, args.rounds, work))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="digits-vit,digits-cnn,minilm")
    ap.add_argument("--formats", default="fp16,bf16")
    ap.add_argument("--quick", action="store_true", help="digits models only")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--calib", type=int, default=16, help="calibration samples")
    ap.add_argument("--held-out", type=int, default=48, help="MiniLM held-out windows")
    ap.add_argument("--qemu", type=int, default=0, help="rpi5 fp16 runs under qemu")
    ap.add_argument("--rounds", type=int, default=50, help="timed rounds (native only)")
    args = ap.parse_args()
    args.formats = args.formats.split(",")
    models = list(data.DIGITS) if args.quick else args.models.split(",")
    with tempfile.TemporaryDirectory(prefix="edgekit-half-bench-") as tmp:
        for name in models:
            case = (data.minilm(args.seq, args.calib, args.held_out, 1) if name == "minilm"
                    else data.digits(name, args.calib))
            run_case(case, args, Path(tmp))
            sys.stdout.flush()


if __name__ == "__main__":
    main()
