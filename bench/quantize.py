"""Benchmark: edgekit's quantize-int8 settings against fp32 and onnxruntime's quantizers, one run.

Per model (``quantize_data``: the digits ViT and CNN, all-MiniLM-L6-v2 at ``--seq`` tokens,
the light zoo ResNet-50) and per setting of the ``quantize-int8`` pass (naive per-tensor,
per-channel, +reparam (RepQ-ViT LayerNorm scales), +smooth (SmoothQuant α), +mixed precision
(``min_cosine``)), on held-out data the calibration never saw:

* accuracy (top-1, or embedding/output cosine against fp32) of onnxruntime running the QDQ
  graph and of the edgekit int8 artifact (``api.compile`` of that graph: whatever the TVM
  lowering makes of it, checked against onnxruntime on the way);
* size: the ONNX file and the artifact's ``.so``, each against its fp32 counterpart;
* latency medians, every engine of one model interleaved in blocks (``perf.interleaved_medians``:
  load changes on the machine hit all alike, spinning pools of the engine before do not),
  ``--threads`` threads each: edgekit
  int8 and fp32 artifacts, onnxruntime on the same QDQ graph and on fp32, and onnxruntime's own
  quantizers as peers: ``quantize_dynamic`` (defaults; per-channel QUInt8 weights) and
  ``quantize_static`` (defaults, QDQ, MinMax, after ``quant_pre_process``).

A setting the pass refuses or rolls back, or an artifact that fails to compile, is one loud row,
not the end of the run.

    python bench/quantize.py --quick              # digits models, 20 timed rounds (~3 min)
    python bench/quantize.py                      # everything (the lead's run; long)
    python bench/quantize.py --models minilm --seq 64 --accuracy-only
    python bench/quantize.py --settings per-channel,mse=quantize-int8:method=mse --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import quantize_data as data  # noqa: E402 - beside this script
from perf import interleaved_medians  # noqa: E402

from edgekit import api, runtime  # noqa: E402
from edgekit.artifact import LIBRARY  # noqa: E402
from edgekit.export import save_onnx  # noqa: E402
from edgekit.verify import ort_session  # noqa: E402

MODELS = ("digits-vit", "digits-cnn", "minilm", "resnet50")


def settings(min_cosine: float) -> dict[str, str]:
    """Setting name -> pass list: naive per-tensor, per-channel, each outlier switch on its
    own (smooth=0.5 is the pass's default), then mixed precision on the default."""
    return {
        "per-tensor": "quantize-int8:per_channel=false:smooth=0",
        "per-channel": "quantize-int8:smooth=0",
        "+reparam": "quantize-int8:smooth=0:reparam=true",
        "+smooth": "quantize-int8:smooth=0.5",
        "+mixed": f"quantize-int8:smooth=0.5:min_cosine={min_cosine}",
        "float-embeddings": "quantize-int8:smooth=0.5:embeddings=false",
    }


class Engine:
    """One way to run a model: ``run(inputs) -> first output`` and a prepared timed call."""

    def __init__(self, run, timed) -> None:
        self.run, self.timed = run, timed

    @classmethod
    def ort(cls, model: onnx.ModelProto, sample: dict, threads: int) -> Engine:
        sess = ort_session(model, threads=threads)
        return cls(lambda x: sess.run(None, x)[0], lambda: sess.run(None, sample))

    @classmethod
    def edgekit(cls, model: onnx.ModelProto, sample: dict, work: Path) -> tuple[Engine, int]:
        """Compiled for the host (unique paths: a process dlopens each library once)."""
        d = Path(tempfile.mkdtemp(dir=work))
        save_onnx(model, d / "model.onnx")
        api.compile(d / "model.onnx", "host", d / "model.edgekit")
        compiled = runtime.load(d / "model.edgekit")
        first = compiled.manifest["outputs"][0]["name"]
        return (cls(lambda x: compiled.run(**x)[first], compiled.prepare(**sample)),
                (d / "model.edgekit" / LIBRARY).stat().st_size)


def one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:300]


def ort_peers(case: data.Case, work: Path) -> dict[str, onnx.ModelProto]:
    """onnxruntime's quantizers on the fp32 model: name -> model, or -> error string."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantType,
        quant_pre_process,
        quantize_dynamic,
        quantize_static,
    )

    src = work / f"{case.name}-fp32.onnx"
    save_onnx(case.model, src)
    names = list(case.calibration)
    count = len(case.calibration[names[0]])

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{k: case.calibration[k][i] for k in names} for i in range(count)])

        def get_next(self):
            return next(self.items, None)

    def static(out: Path) -> None:
        pre = work / f"{case.name}-pre.onnx"
        try:
            quant_pre_process(src, pre)
        except Exception as exc:  # noqa: BLE001 - ORT's own tool; say so and go on without it
            print(f"!! {case.name} ort static: quant_pre_process failed ({one_line(exc)}); "
                  "quantizing without it", file=sys.stderr)
            pre = src
        quantize_static(pre, out, Reader())

    makers = {
        "ort dynamic": lambda out: quantize_dynamic(src, out),
        "ort dynamic per-channel": lambda out: quantize_dynamic(
            src, out, per_channel=True, weight_type=QuantType.QUInt8),
        "ort static": static,
    }
    peers: dict = {}
    for tag, make in makers.items():
        out = work / f"{case.name}-{tag.replace(' ', '-')}.onnx"
        try:
            make(out)
            peers[tag] = onnx.load(str(out))
        except Exception as exc:  # noqa: BLE001 - one loud row, not the end of the run
            peers[tag] = one_line(exc)
    return peers


def accuracy(case: data.Case, engine: Engine) -> dict[str, float]:
    return case.score(np.concatenate([engine.run(x) for x in case.held_out]))


def interleaved(engines: dict[str, Engine], repeat: int) -> dict[str, float]:
    """Median ms per engine: ``perf.interleaved_medians``, blocks of calls with two untimed
    ones after each switch (onnxruntime's pool keeps spinning after a call and, with 2
    threads on 2 cores, slowed whatever ran next: call-by-call interleaving measured the
    edgekit fp32 MiniLM at 68 ms with 2 threads against 25 ms with 1)."""
    return interleaved_medians({k: e.timed for k, e in engines.items()}, repeat,
                               rounds=min(5, repeat))


def bench_model(case: data.Case, plans: dict[str, str], args, work: Path) -> list[dict]:
    sample = case.held_out[0]
    compile_ = not args.accuracy_only
    fp32 = {"model": case.name, "setting": "fp32", "passes": case.prep, "status": "-",
            "onnx_bytes": case.model.ByteSize()}
    engines = {"ort fp32": Engine.ort(case.model, sample, args.threads)}
    fp32["acc_ort"] = accuracy(case, engines["ort fp32"])
    if compile_:
        print(f"{case.name}: compile fp32", file=sys.stderr, flush=True)
        engines["edgekit fp32"], fp32["so_bytes"] = Engine.edgekit(case.model, sample, work)
        fp32["acc_edgekit"] = accuracy(case, engines["edgekit fp32"])
    rows = [fp32]
    for setting, passes in plans.items():
        print(f"{case.name}: {setting} ({passes})", file=sys.stderr, flush=True)
        row = {"model": case.name, "setting": setting, "passes": passes}
        rows.append(row)
        try:
            result = api.rewrite(case.model, passes, calibration=case.calibration)
        except Exception as exc:  # noqa: BLE001 - e.g. bad parameters: one loud row
            row["status"], row["error"] = "error", one_line(exc)
            continue
        run = result.ledger[-1]
        row["status"], row["qdq_nodes"] = run.status, result.ops_after.get("QuantizeLinear", 0)
        if run.status != "applied":
            row["error"] = f"quantize-int8 {run.status}: {run.message}"
            continue
        qdq = result.model
        row["onnx_bytes"] = qdq.ByteSize()
        engines[f"ort {setting}"] = Engine.ort(qdq, sample, args.threads)
        row["acc_ort"] = accuracy(case, engines[f"ort {setting}"])
        if not compile_:
            continue
        try:
            engines[f"edgekit {setting}"], row["so_bytes"] = Engine.edgekit(qdq, sample, work)
            row["acc_edgekit"] = accuracy(case, engines[f"edgekit {setting}"])
        except Exception as exc:  # noqa: BLE001 - the TVM lowering may not take it (yet)
            row["error"] = f"edgekit compile: {one_line(exc)}"
    for tag, peer in ort_peers(case, work).items():
        row = {"model": case.name, "setting": tag, "passes": "onnxruntime.quantization"}
        rows.append(row)
        if isinstance(peer, str):
            row["status"], row["error"] = "error", peer
            continue
        row["status"], row["onnx_bytes"] = "-", peer.ByteSize()
        try:
            engines[tag] = Engine.ort(peer, sample, args.threads)
            row["acc_ort"] = accuracy(case, engines[tag])
        except Exception as exc:  # noqa: BLE001
            row["status"], row["error"] = "error", f"onnxruntime: {one_line(exc)}"
            engines.pop(tag, None)
    if not args.accuracy_only:
        print(f"{case.name}: timing {len(engines)} engines, {args.repeat} rounds",
              file=sys.stderr, flush=True)
        ms = interleaved(engines, args.repeat)
        for row in rows:
            s = row["setting"]
            row["ort_ms"] = ms.get("ort fp32" if s == "fp32" else s if s.startswith("ort ")
                                   else f"ort {s}")
            row["edgekit_ms"] = ms.get(f"edgekit {s}")
    return rows


def ratio(a, b) -> str:
    return f"{a / b:.2f}×" if a and b else "-"


def show(case: data.Case, rows: list[dict]) -> None:
    fp32 = rows[0]
    print(f"\n### {case.name} ({case.data}; prep: {case.prep or 'none'})\n")
    print("| setting | status | Q nodes | acc ORT | acc edgekit | ONNX KB | .so KB | "
          "edgekit ms | ORT ms | ORT/ORT fp32 | ek/ek fp32 | ek/ORT same | ek/ORT fp32 |")
    print("|" + "---|" * 13)
    for r in rows:
        def acc(key: str, r=r) -> str:
            got = r.get(key)
            return " / ".join(f"{v:.2f}" if "%" in k else f"{v:.4f}" for k, v in got.items()) \
                if got else "-"

        size = {k: f"{r[k] / 1024:.0f} ({ratio(r[k], fp32.get(k))})" if r.get(k) else "-"
                for k in ("onnx_bytes", "so_bytes")}
        ek, ort = r.get("edgekit_ms"), r.get("ort_ms")
        cells = [r["setting"], r["status"], str(r.get("qdq_nodes", "-")), acc("acc_ort"),
                 acc("acc_edgekit"), size["onnx_bytes"], size["so_bytes"],
                 f"{ek:.3f}" if ek else "-", f"{ort:.3f}" if ort else "-",
                 ratio(ort, fp32.get("ort_ms")) if r is not fp32 else "-",
                 ratio(ek, fp32.get("edgekit_ms")) if r is not fp32 else "-",
                 ratio(ek, ort), ratio(ek, fp32.get("ort_ms"))]
        print("| " + " | ".join(cells) + " |")
    keys = next((list(r["acc_ort"]) for r in rows if r.get("acc_ort")), [])
    print(f"\naccuracy: {', '.join(keys)}; settings: " + "; ".join(
        f"{r['setting']} = {r['passes']}" for r in rows[1:] if not r["setting"].startswith("ort")))
    for r in rows:
        if "error" in r:
            print(f"!! {case.name} {r['setting']}: {r['error']}")


def cases(args):
    """Yield each asked model's Case (or the error building it) in turn."""
    for name in args.models:
        if name == "minilm":
            for seq in args.seq:
                yield lambda seq=seq: data.minilm(seq, args.calib, args.windows, args.threads)
        elif name == "resnet50":
            yield lambda: data.resnet50(16, args.images, args.threads)
        else:
            yield lambda name=name: data.digits(name, args.calib)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="digits models only, 20 timed rounds")
    parser.add_argument("--models", help=f"comma-separated subset of {', '.join(MODELS)}")
    parser.add_argument("--settings", help="comma-separated subset of the settings, or "
                        "name=quantize-int8:key=value entries of your own")
    parser.add_argument("--seq", default="64,128", help="MiniLM token counts")
    parser.add_argument("--min-cosine", type=float, default=0.99,
                        help="the +mixed setting's budget")
    parser.add_argument("--accuracy-only", action="store_true",
                        help="onnxruntime accuracy and sizes; no compiles, no timing")
    parser.add_argument("--calib", type=int, default=32, help="calibration samples")
    parser.add_argument("--windows", type=int, default=100, help="held-out MiniLM windows")
    parser.add_argument("--images", type=int, default=32, help="held-out ResNet-50 images")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=100, help="timed rounds")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    args.models = (list(data.DIGITS) if args.quick and not args.models else
                   [m.strip() for m in (args.models or ",".join(MODELS)).split(",") if m])
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        raise SystemExit(f"unknown model {unknown[0]!r} (models: {', '.join(MODELS)})")
    if args.quick:
        args.repeat = min(args.repeat, 20)
    args.seq = [int(s) for s in args.seq.split(",")]
    known = settings(args.min_cosine)
    plans = known
    if args.settings:
        plans = {}
        for item in filter(None, (s.strip() for s in args.settings.split(","))):
            name, sep, passes = item.partition("=")
            if not sep and name not in known:
                raise SystemExit(f"unknown setting {name!r} (settings: {', '.join(known)})")
            plans[name] = passes if sep else known[name]
    runtime.set_threads(args.threads)  # TVM's pool; each onnxruntime session gets the same
    print(f"{args.threads} threads; medians of {args.repeat} calls per engine, interleaved",
          flush=True)
    everything: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="edgekit-quantize-") as tmp:
        for make in cases(args):
            try:
                case = make()
            except Exception as exc:  # noqa: BLE001 - report and go on with the next model
                print(f"\n!! model error: {one_line(exc)}", flush=True)
                continue
            rows = bench_model(case, plans, args, Path(tmp))
            show(case, rows)
            everything += rows
            sys.stdout.flush()
    if args.json:
        args.json.write_text(json.dumps(everything, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
