"""Benchmark: onnxruntime and TVM latency before and after each rewrite pass, in one run.

For every (model, passes) case: export the model, compile it untuned for the host, time it
with onnxruntime and TVM; apply the passes, compile and time again; print medians and the
after/before ratios (< 1 means the rewrite made it faster).

    python bench/passes.py            # all cases
    python bench/passes.py --quick    # small models only, fewer calls
    python bench/passes.py --models light-resnet50,gpt2-4l   # a subset
    python bench/passes.py --passes fold-constants   # cases using these passes
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import onnx

from edgekit import api
from edgekit.errors import EdgekitError
from edgekit.export import check_against_torch, export_module, save_onnx
from edgekit.intake import Source, set_source
from edgekit.verify import TensorSpec

CASES = [
    ("repvgg-cnn", "merge-repvgg"),
    ("repvgg-cnn", "fold-bn"),
    ("slab-vit", "fold-repbn"),
    ("tiny-gpt", "ln-to-rmsnorm"),
    ("tiny-gpt", "ln-to-rmsnorm,rmsnorm-to-crmsnorm"),
    ("tiny-vit", "ln-to-rmsnorm"),
    ("tiny-vit", "ln-to-rmsnorm,rmsnorm-to-crmsnorm"),
    ("gpt2-4l", "ln-to-rmsnorm"),
    ("gpt2-4l", "ln-to-rmsnorm,rmsnorm-to-crmsnorm"),
    ("vit-4l", "fold-ln-affine"),
    ("vit-4l", "ln-to-rmsnorm"),
    # the light zoo builds every weight with ConstantOfShape: fold-bn alone cannot fold
    ("light-shufflenet", "fold-bn"),
    ("light-shufflenet", "fold-constants"),
    ("light-shufflenet", "fold-constants,fold-bn"),
    ("light-resnet50", "fold-bn"),
    ("light-resnet50", "fold-constants"),
    ("light-resnet50", "fold-constants,fold-bn"),
]
LIGHT_ZOO = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
SLOW = ("gpt2-4l", "vit-4l", "light-resnet50")


def transformers_model(name: str):
    """Architectures from transformers configs with random weights (no hub access)."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    if name == "gpt2-4l":
        cfg = tf.GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=1024, n_positions=128,
                            use_cache=False, bos_token_id=0, eos_token_id=0)
        model = tf.GPT2Model(cfg)
        specs = [TensorSpec("input_ids", (1, 64), "int64")]
    elif name == "vit-4l":
        cfg = tf.ViTConfig(num_hidden_layers=4, hidden_size=192, num_attention_heads=3,
                           intermediate_size=768, image_size=64, patch_size=8)
        model = tf.ViTModel(cfg, add_pooling_layer=False)
        specs = [TensorSpec("pixel_values", (1, 3, 64, 64), "float32")]
    else:
        raise KeyError(name)
    model.config.return_dict = False
    # random init leaves LayerNorm at γ=1, β=0; give it trained-looking affine parameters
    from edgekit.graphs._init_utils import randomize_norm_stats

    return randomize_norm_stats(model, seed=0), specs


def export(name: str, path: Path) -> None:
    if name in ("gpt2-4l", "vit-4l"):
        module, specs = transformers_model(name)
        model = export_module(module, specs)
        bad = [c for c in check_against_torch(module, model, specs, 1e-4, 1e-4) if not c.ok]
        if bad:
            raise SystemExit(f"{name}: export check failed: {bad}")
        set_source(model, Source("onnx", name))
        save_onnx(model, path)
    elif name.startswith("light-"):  # onnx's light model zoo, shipped with the onnx package
        onnx.save(onnx.load(str(LIGHT_ZOO / f"light_{name[6:]}.onnx")), path)
    else:
        api.export(name, path)


def measure(onnx_path: Path, art: Path, repeat: int) -> tuple[float, float]:
    api.compile(onnx_path, "host", art)
    result = api.profile(art, warmup=5, repeat=repeat, compare=["ort"])
    return result["latency_ms"]["median"], result["baselines"]["ort"]["median"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models only, 20 calls")
    parser.add_argument("--repeat", type=int, default=100)
    parser.add_argument("--models", help="comma-separated subset of the case models")
    parser.add_argument("--passes", help="only cases using one of these comma-separated passes")
    args = parser.parse_args()
    from edgekit.passes import available

    cases = [c for c in CASES if not (args.quick and c[0] in SLOW)]
    if args.models:
        cases = [c for c in cases if c[0] in args.models.split(",")]
    if args.passes:
        cases = [c for c in cases if set(c[1].split(",")) & set(args.passes.split(","))]
    repeat = 20 if args.quick else args.repeat
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        baseline: dict[str, tuple[float, float]] = {}
        for model, passes in cases:
            if any(p.split(":")[0] not in available() for p in passes.split(",")):
                print(f"skip {model} {passes}: pass not available", file=sys.stderr)
                continue
            src = d / f"{model}.onnx"
            if model not in baseline:
                print(f"{model}: export and baseline", file=sys.stderr)
                export(model, src)
                baseline[model] = measure(src, d / f"{model}.edgekit", repeat)
            rewritten = api.rewrite(api.intake.load_onnx(src), passes)
            dst = d / f"{model}-{len(rows)}.onnx"
            save_onnx(rewritten.model, dst)
            status = ",".join(r.status for r in rewritten.ledger)
            err = max((r.max_rel or 0.0) for r in rewritten.ledger)
            print(f"{model} + {passes}: {status}", file=sys.stderr)
            try:
                tvm_after, ort_after = measure(dst, d / f"{model}-{len(rows)}.edgekit", repeat)
            except EdgekitError as exc:  # e.g. the compiled model fails verification
                print(f"skip {model} {passes}: {exc}", file=sys.stderr)
                continue
            tvm_before, ort_before = baseline[model]
            rows.append((model, passes, status, err, ort_before, ort_after, tvm_before,
                         tvm_after))
    header = ("model", "passes", "status", "max rel err", "ORT ms before", "after", "ratio",
              "TVM ms before", "after", "ratio")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for model, passes, status, err, ob, oa, tb, ta in rows:
        print(f"{model} | {passes} | {status} | {err:.1e} | {ob:.3f} | {oa:.3f} | {oa / ob:.3f} | "
              f"{tb:.3f} | {ta:.3f} | {ta / tb:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
