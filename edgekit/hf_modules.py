"""The torch modules ``edgekit.hf`` exports: a transformers model plus its task's head.

Each wraps a ``from_pretrained(local_files_only=True)`` model and returns one tensor, so the
exported graph has one named output and positional inputs in the order of ``specs``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgekit.errors import EdgekitError
from edgekit.verify import TensorSpec

_TEXT = [TensorSpec("input_ids", (1, "seq"), "int64"),
         TensorSpec("attention_mask", (1, "seq"), "int64")]


class Embedding(nn.Module):
    """Last hidden state pooled over tokens: masked mean (sum of unmasked states / their
    count) or the first token; then L2-normalised if asked."""

    def __init__(self, model: nn.Module, pooling: str, normalize: bool):
        super().__init__()
        self.model, self.pooling, self.normalize = model, pooling, normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        if self.normalize:
            pooled = nn.functional.normalize(pooled, p=2.0, dim=-1)
        return pooled


class TextLogits(nn.Module):
    """``logits`` of a text model (classification) from token ids and their mask."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


class CausalLogits(nn.Module):
    """Next-token ``logits`` at every position, without a KV cache."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


class ImageLogits(nn.Module):
    """``logits`` of an image classifier."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def _labels(config: Any) -> list[str] | None:
    id2label = getattr(config, "id2label", None) or {}
    if not id2label:
        return None
    return [str(id2label.get(i, id2label.get(str(i), i))) for i in range(len(id2label))]


def build(folder: Path, config: Any, task: str, pooling: str, normalize: bool
          ) -> tuple[nn.Module, list[TensorSpec], dict[str, Any]]:
    """(module, input specs, app entry) for ``task``."""
    import transformers as tf

    load = {"local_files_only": True}
    if task == "feature-extraction":
        model = tf.AutoModel.from_pretrained(folder, **load)
        app = {"task": task, "pooling": pooling, "normalize": normalize, "output": "embeddings"}
        return Embedding(model, pooling, normalize), list(_TEXT), app
    if task == "text-classification":
        model = tf.AutoModelForSequenceClassification.from_pretrained(folder, **load)
        app = {"task": task, "labels": _labels(model.config), "output": "logits"}
        return TextLogits(model), list(_TEXT), app
    if task == "causal-lm":
        model = tf.AutoModelForCausalLM.from_pretrained(folder, **load)
        specs = [TensorSpec("input_ids", (1, "seq"), "int64")]
        return CausalLogits(model), specs, {"task": task, "output": "logits"}
    if task == "image-classification":
        model = tf.AutoModelForImageClassification.from_pretrained(folder, **load)
        size = _image_size(folder, config)
        specs = [TensorSpec("pixel_values", (1, 3, size, size), "float32")]
        app = {"task": task, "labels": _labels(model.config), "output": "logits"}
        return ImageLogits(model), specs, app
    raise EdgekitError(f"unknown task {task!r}")


def _image_size(folder: Path, config: Any) -> int:
    size = getattr(config, "image_size", None)
    if isinstance(size, (list, tuple)):
        size = size[0]
    if not isinstance(size, int):
        pre = image_preprocessing(folder, config)
        size = pre["image"]["size"]
    return int(size)


def image_preprocessing(folder: Path, config: Any) -> dict[str, Any]:
    """Resize and normalisation an app applies before ``pixel_values`` (from
    ``preprocessor_config.json``; ImageNet's mean/std when the folder has none)."""
    import json

    path = folder / "preprocessor_config.json"
    pre = json.loads(path.read_text()) if path.is_file() else {}
    size = pre.get("size", getattr(config, "image_size", 224))
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge") or 224
    if isinstance(size, (list, tuple)):
        size = size[0]
    return {"image": {"size": int(size),
                      "mean": list(pre.get("image_mean", [0.485, 0.456, 0.406])),
                      "std": list(pre.get("image_std", [0.229, 0.224, 0.225])),
                      "rescale": float(pre.get("rescale_factor", 1 / 255)),
                      "layout": "NCHW"}}
