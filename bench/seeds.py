"""Benchmark: the seeds' passes on their trained fixtures (issue 19), measured in one run.

* ``--sla``: ``slab-sla-vit`` (trained on digits) and the same network at 2×2 patches
  (N = 256 tokens, untrained: latency only). Per N: ``linear-attention-order``'s error
  against the qk-first graph, graph FLOPs before/after (the ledger's), and median latency of
  both graphs in TVM (host, untuned) and onnxruntime, timed interleaved, one thread each;
  then the fixture's held-out top-1 (540 images) in onnxruntime before and after
  ``fold-repbn`` + ``linear-attention-order``.
* ``--power``: ``power-causal-lm`` in every mask form, p = 4, fitted on 32 seeded token
  sequences, judged on 64 others: the pass's error, the largest attention probability at a
  masked position (must be exactly 0), Newton iterations, with and without pre-scaling.
* ``--matformer``: ``digits-matformer`` sliced to each trained FFN width: held-out top-1 of
  the sliced ONNX (onnxruntime), graph FLOPs, median latency on the host (TVM untuned and
  onnxruntime, interleaved, one thread) and on a Raspberry Pi 4 target (``rpi4``,
  cortex-a72) through the aarch64 ``edgekit-runner`` under qemu-user (emulation times:
  real aarch64 code, not the board's speed), or on a farm device (``--tracker``/``--key``);
  then the largest sub-model under ``--budget-ms`` on each target.

    python bench/seeds.py                        # all three parts (about 10 min on 2 cores)
    python bench/seeds.py --matformer --budget-ms 0.25 --qemu-budget-ms 60
    python bench/seeds.py --matformer --tracker 127.0.0.1:9190 --key host --qemu-budget-ms 0.25
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from edgekit.graphs import digits_matformer, power_causal_lm, slab_sla_vit
from edgekit.graphs.digits_vit import digits_split
from token_prune_data import latencies  # beside this script

from edgekit import api, flops
from edgekit.export import save_onnx
from edgekit.passes import available
from edgekit.passes.core import load_samples, run_pass, run_pipeline
from edgekit.verify import TensorSpec, ort_session

os.environ.setdefault("TVM_NUM_THREADS", "1")
IMAGE = [TensorSpec("image", (1, 1, 32, 32), "float32")]
PASSES = available()


def _export(module, specs=IMAGE) -> onnx.ModelProto:
    from edgekit.export import export_module

    return export_module(module, specs)


def _top1(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    sess = ort_session(model, threads=1)
    hits = [int(np.argmax(sess.run(None, {"image": x[i:i + 1]})[0]) == y[i])
            for i in range(len(x))]
    return float(np.mean(hits))


def _apply(model: onnx.ModelProto, name: str, **params: str):
    p = PASSES[name]
    new, run = run_pass(model, p, p.parse_params(params), load_samples(model))
    if run.status != "applied":
        raise SystemExit(f"{name} {params}: {run.status}: {run.message}")
    return new, run


def sla(work: Path, repeat: int) -> None:
    _, _, x_te, y_te = digits_split()
    rows, models = [], {}
    for patch in (4, 2):
        module = slab_sla_vit.load() if patch == 4 else slab_sla_vit._model(
            **{**slab_sla_vit.RECIPE, "patch": patch}).eval()
        model = _export(module)
        new, run = _apply(model, "linear-attention-order")
        n = (32 // patch) ** 2
        rows.append((n, run.max_rel, run.flops_before, run.flops_after))
        feed = {"image": x_te[:1]}
        models[f"N={n} qk-first"], models[f"N={n} kv-first"] = (model, feed), (new, feed)
        if patch == 4:
            folded, _ = run_pipeline(model, [(PASSES["fold-repbn"], {}),
                                             (PASSES["linear-attention-order"], {})],
                                     load_samples(model))
            acc = (_top1(model, x_te, y_te), _top1(folded, x_te, y_te))
    times = latencies(models, work, repeat)
    print("\n## SLA: linear-attention-order on slab-sla-vit (2 heads of 16)\n")
    print("| tokens | max rel error | FLOPs qk-first | FLOPs kv-first | TVM qk / kv ms "
          "| ORT qk / kv ms |")
    print("|---|---|---|---|---|---|")
    for n, err, before, after in rows:
        (tq, oq), (tk, ok) = times[f"N={n} qk-first"], times[f"N={n} kv-first"]
        print(f"| {n} | {err:.2g} | {before / 1e6:.2f} M | {after / 1e6:.2f} M "
              f"| {tq:.3f} / {tk:.3f} | {oq:.3f} / {ok:.3f} |")
    print(f"\nheld-out top-1 (540 images, onnxruntime): {acc[0]:.2%} as exported, "
          f"{acc[1]:.2%} after fold-repbn + linear-attention-order")


def power() -> None:
    print("\n## Power-Softmax on power-causal-lm (p = 4, causal)\n")
    print("| form | prescale | status | max rel error (budget 1e-3) | masked max | "
          "mean(u) range | hi/lo | Newton iterations | reciprocal rel error |")
    print("|---|---|---|---|---|---|---|---|---|")
    calib = {"ids": power_causal_lm.token_ids(32, 1)}
    test = power_causal_lm.token_ids(64, 2)
    masked = ~power_causal_lm.CAUSAL
    for form in power_causal_lm.FORMS:
        model = _export(power_causal_lm.make(form), [TensorSpec("ids", (1, 8), "int64")])
        for prescale in (False, True):
            res = api.rewrite(model, f"power-softmax:prescale={prescale}", calibration=calib)
            run = res.ledger[0]
            entry = next(iter(run.report.details.get("replaced", {}).values()), {})
            ref_s, new_s = ort_session(model), ort_session(res.model)
            errs, worst_masked = [], 0.0
            for ids in test:
                (ref, ref_a), (got, got_a) = (s.run(None, {"ids": ids}) for s in (ref_s, new_s))
                errs.append(np.abs(got - ref).max() / np.abs(ref).max())
                worst_masked = max(worst_masked, float(np.abs(got_a[..., masked]).max(initial=0)))
            r = entry["reciprocal"]
            lo, hi = entry["mean_range"]
            shown = f"{worst_masked:g}" if form != "log" else "(unmasked)"
            print(f"| {form} | {prescale} | {run.status} | {max(errs):.2g} | {shown} "
                  f"| {lo:.3g} .. {hi:.3g} | {hi / lo:.3g} | {r['iterations']} "
                  f"| {entry['reciprocal_rel_error']:.2g} |")


def _profile_remote(onnx_path: Path, out: Path, repeat: int, tracker: str | None,
                    key: str | None) -> float:
    """Median ms on the farm device ``key`` (a host artifact) or, without a tracker, of an
    rpi4 artifact run by the aarch64 edgekit-runner under qemu-user, one thread."""
    api.compile(onnx_path, "host" if tracker else "rpi4", out)
    result = api.profile(out, runner=None if tracker else "qemu", tracker=tracker, key=key,
                         repeat=repeat, threads=1)
    return float(result["latency_ms"]["median"])


def matformer(work: Path, repeat: int, budget_ms: float, remote_budget_ms: float,
              tracker: str | None, key: str | None) -> None:
    _, _, x_te, y_te = digits_split()
    full = _export(digits_matformer.build())
    rows, models = [], {}
    for k in digits_matformer.GRANULARITIES:
        sub = _apply(full, "matformer-slice", ffn=str(k))[0] if k < 384 else full
        rows.append((k, _top1(sub, x_te, y_te), flops.count(sub)))
        models[f"ffn={k}"] = (sub, {"image": x_te[:1]})
    host = latencies(models, work, repeat)
    remote = {}
    d = Path(tempfile.mkdtemp(dir=work))
    for k in digits_matformer.GRANULARITIES:
        path = d / f"ffn{k}.onnx"
        save_onnx(models[f"ffn={k}"][0], path)
        print(f"remote profile ffn={k}", file=sys.stderr)
        remote[k] = _profile_remote(path, d / f"ffn{k}.edgekit", max(repeat // 4, 20),
                                  tracker, key)
    where = f"farm {key}" if tracker else "rpi4 (qemu)"
    print("\n## MatFormer: digits-matformer sub-models (FFN width of 384 kept)\n")
    print(f"| FFN width | held-out top-1 | FLOPs | host TVM ms | host ORT ms | {where} ms |")
    print("|---|---|---|---|---|---|")
    for k, acc, count in rows:
        tvm_ms, ort_ms = host[f"ffn={k}"]
        print(f"| {k} | {acc:.2%} | {count / 1e6:.2f} M | {tvm_ms:.3f} | {ort_ms:.3f} "
              f"| {remote[k]:.3f} |")
    host_tvm = {k: host[f"ffn={k}"][0] for k, *_ in rows}
    for label, lat, budget in (("host TVM", host_tvm, budget_ms),
                               (where, remote, remote_budget_ms)):
        fits = [k for k, *_ in rows if lat[k] <= budget]
        pick = f"ffn={max(fits)}" if fits else "none fits"
        print(f"\nlatency budget {budget} ms on {label}: largest sub-model {pick}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sla", action="store_true")
    ap.add_argument("--power", action="store_true")
    ap.add_argument("--matformer", action="store_true")
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--budget-ms", type=float, default=0.25, help="host latency budget")
    ap.add_argument("--qemu-budget-ms", type=float, default=60.0,
                    help="latency budget on the second target (qemu or farm device)")
    ap.add_argument("--tracker", help="HOST:PORT of a device farm (instead of qemu)")
    ap.add_argument("--key", help="the farm device's key")
    args = ap.parse_args()
    every = not (args.sla or args.power or args.matformer)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if every or args.sla:
            sla(work, args.repeat)
        if every or args.power:
            power()
        if every or args.matformer:
            matformer(work, args.repeat, args.budget_ms, args.qemu_budget_ms, args.tracker,
                      args.key)


if __name__ == "__main__":
    main()
