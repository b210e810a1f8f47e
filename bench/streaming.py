"""Streaming vs re-running the parallel model: per-frame cost and memory at T = 16, 128, 1024,
and stepping-vs-parallel equivalence on random weights and on the trained digits fixture.

Run: ``.venv/bin/python bench/streaming.py [--frames 16,128,1024] [--threads 1]``

A stream that must answer after every frame can either step the step artifact once (cost
independent of T) or re-run the parallel model on the window seen so far (cost growing with
T). Both are measured here in the same process and thread count:

- step: the TVM step artifact in a ``StreamSession`` (state carried on the device), timed per
  frame over a T-frame stream; the same step ONNX in onnxruntime (states fed back);
- parallel: the parallel model exported at length T, run once on the T-frame window, in
  onnxruntime and in torch (its per-frame cost when re-run at frame T);
- memory: the bytes of state the step form carries, and the peak-RSS growth of a fresh
  process while onnxruntime loads and runs each form (T steps, or one window of T frames).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _median_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


_CHILD = """
import sys, numpy as np, onnxruntime as ort
def kb(field):
    line = next(x for x in open("/proc/self/status") if x.startswith(field))
    return int(line.split()[1])
path, feeds, steps = sys.argv[1], dict(np.load(sys.argv[2])), int(sys.argv[3])
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
before = kb("VmRSS:")
opts = ort.SessionOptions(); opts.intra_op_num_threads = 1
sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
names = [o.name for o in sess.get_outputs()]
x = feeds.pop("x")
for i in range(steps):  # steps == 1: the parallel model on the whole window
    out = sess.run(None, {"x": x if steps == 1 else x[:, i:i + 1], **feeds})
    feeds = {k: v for k, v in zip(feeds, out[1:])} if steps > 1 else feeds
print((kb("VmHWM:") - before) / 1024)
"""


def _rss_growth_mb(onnx_path: Path, feeds: dict[str, np.ndarray], steps: int) -> float:
    """Peak-RSS growth (Linux VmHWM, reset after the imports) of a fresh process while
    onnxruntime loads and runs the model."""
    import subprocess

    npz = onnx_path.with_suffix(f".{steps}.npz")
    np.savez(npz, **feeds)
    out = subprocess.run([sys.executable, "-c", _CHILD, str(onnx_path), str(npz), str(steps)],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", default="16,128,1024")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--graph", default="lmuformer")
    args = parser.parse_args()
    lengths = [int(t) for t in args.frames.split(",")]

    import torch

    from edgekit import api, graphs, runtime, verify
    from edgekit.runtime import set_threads
    from edgekit.streaming import digits, equivalence
    from edgekit.streaming.convert import run_steps, to_step

    set_threads(args.threads)
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="edgekit-stream-bench-"))
    g = graphs.available()[args.graph]
    features = g.inputs[0][1][2]
    model = g.build()

    print(f"# {args.graph}: exporting and compiling the step artifact", file=sys.stderr)
    exported = api.export_streaming(args.graph, work / "step.onnx")
    api.compile(work / "step.onnx", "host", work / "step.edgekit")
    session = runtime.load(work / "step.edgekit").stream()
    state_bytes = sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize
                      for s in exported.form.states)
    ort_step = verify.ort_session(str(work / "step.onnx"), threads=args.threads)

    rows = []
    for t in lengths:
        x = np.random.default_rng(t).standard_normal((1, t, features)).astype(np.float32)
        session.reset()
        per_frame = []
        for i in range(t):  # the real stream: one call per arriving frame
            t0 = time.perf_counter()
            session.step(x[:, i:i + 1])
            per_frame.append((time.perf_counter() - t0) * 1e3)
        step_tvm = float(np.median(per_frame))
        state = {s.input: s.initial() for s in exported.form.states}

        def ort_one_step(state=state, x=x):
            ort_step.run(None, {"x": x[:, :1], **state})

        step_ort = _median_ms(ort_one_step, 50)
        step_peak = _rss_growth_mb(work / "step.onnx", {"x": x, **state}, t)

        print(f"# T={t}: exporting the parallel model", file=sys.stderr)
        spec = verify.TensorSpec("x", (1, t, features), "float32")
        par = api.export(args.graph, work / f"par{t}.onnx", inputs=[spec])
        sess = verify.ort_session(par.model, threads=args.threads)
        par_ort = _median_ms(lambda sess=sess, x=x: sess.run(None, {"x": x}), 10)
        xt = torch.from_numpy(x)
        with torch.inference_mode():
            par_torch = _median_ms(lambda xt=xt: model(xt), 10)
        par_peak = _rss_growth_mb(work / f"par{t}.onnx", {"x": x}, 1)
        rows.append((t, step_tvm, step_ort, par_ort, par_torch, step_peak, par_peak))

    print(f"\nper-frame cost, {args.graph}, {args.threads} thread(s); state {state_bytes} bytes")
    print("| T | step TVM ms/frame | step ORT ms/frame | parallel ORT ms (window T) | parallel "
          "torch ms | parallel ORT ÷ step TVM | RSS growth step (T steps) / parallel MB |")
    print("|---|---|---|---|---|---|---|")
    for t, st, so, po, pt, sp, pp in rows:
        print(f"| {t} | {st:.4f} | {so:.4f} | {po:.3f} | {pt:.3f} | {po / st:.1f} | "
              f"{sp:.1f} / {pp:.1f} |")

    print("\nequivalence: stepping T frames vs the parallel model (torch)")
    for name in ("lmuformer", "spiking-lmuformer"):
        gg = graphs.available()[name]
        shape = gg.inputs[0][1]
        for dtype in ("float64", "float32"):
            m = gg.build().to(getattr(torch, dtype))
            x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
            form = to_step(m, shape, dtype=dtype)
            with torch.no_grad():
                ref = m(torch.from_numpy(x)).numpy()
            rep = equivalence.compare_outputs(run_steps(form, x), ref, 0, 0, 0)
            line = f"  {name} {dtype}: rel {rep['rel']:.2e}, top-1 {rep['top1_agreement']:.3f}"
            if getattr(m, "spiking", False):
                fl = equivalence.spike_flips(m, x, lambda s, form=form: run_steps(form, s))
                line += f", spike flips {fl['flips']}/{fl['decisions']}"
            print(line)

    print("\ntrained digits fixture (rows as frames): parallel torch vs streamed TVM artifact")
    split = digits.load()
    trained = digits.train(split)
    torch.save(trained.state_dict(), work / "digits.pt")
    (work / "digits_net.py").write_text(
        "from edgekit.streaming.digits import make_model\n"
        f"INPUTS = [('x', ({len(split.x_test)}, 8, 8), 'float32')]\n"
        "def make():\n    return make_model()\n")
    api.export_streaming(f"{work / 'digits_net.py'}:make", work / "digits.onnx",
                         weights=work / "digits.pt")
    api.compile(work / "digits.onnx", "host", work / "digits.edgekit")
    streamed = runtime.load(work / "digits.edgekit").stream().run(split.x_test)
    with torch.no_grad():
        parallel = trained(torch.from_numpy(split.x_test)).numpy()
    rep = equivalence.compare_outputs(streamed, parallel, 0, 0, 0)
    print(f"  accuracy parallel {digits.accuracy(parallel, split.y_test):.4f}, streamed "
          f"{digits.accuracy(streamed, split.y_test):.4f}; rel {rep['rel']:.2e}, top-1 "
          f"agreement {rep['top1_agreement']:.4f} over all frames")
    spiking = digits.train(split, spiking=True)
    form = to_step(spiking, split.x_test.shape)
    with torch.no_grad():
        parallel = spiking(torch.from_numpy(split.x_test)).numpy()
    stepped = run_steps(form, split.x_test)
    fl = equivalence.spike_flips(spiking, split.x_test, lambda s: run_steps(form, s))
    print(f"  spiking (fp32, torch step form): accuracy parallel "
          f"{digits.accuracy(parallel, split.y_test):.4f}, stepped "
          f"{digits.accuracy(stepped, split.y_test):.4f}; spike flips {fl['flips']}/"
          f"{fl['decisions']} ({fl['flip_rate']:.2e})")
    print(f"(artifacts in {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
