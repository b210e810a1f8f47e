"""Raw input -> answer for artifacts that carry a task (``edgekit export hf:... --task``).

The manifest's ``app`` entry says what the graph computes (``edgekit.hf``); this module does
the rest with numpy and the ``tokenizers`` package only (no torch, no transformers):

- text tasks: the artifact's ``tokenizer.json`` (hash-checked with the other files; read once,
  its bytes checked again against the manifest before use) encodes each text without padding,
  truncated to the artifact's longest length; each text runs at its own length (batch 1);
- ``embed(texts)``: one row per text (the graph pools and normalises, as exported);
- ``classify(texts or images)``: ``(label, probability)`` per input, softmax over the logits;
- images: ``H x W x 3`` uint8 (or float in 0..1 after the rescale) at the model's size,
  rescaled, normalised with the folder's mean/std, laid out NCHW.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import EdgekitError

TEXT_TASKS = ("feature-extraction", "text-classification", "causal-lm")


def text_tokenizer(tokenizer_json: str, max_length: int) -> Any:
    """A ``tokenizers.Tokenizer`` that truncates to ``max_length`` and does not pad."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise EdgekitError("text artifacts need the tokenizers package: pip install "
                           "tokenizers") from None
    try:
        tok = Tokenizer.from_str(tokenizer_json)
    except Exception as exc:  # noqa: BLE001 - the Rust side raises plain Exceptions
        raise EdgekitError(f"tokenizer.json is not a tokenizers file: {exc}") from None
    tok.no_padding()
    tok.enable_truncation(max_length)
    return tok


class TaskRunner:
    """The ``app`` entry of a loaded artifact, bound to its ``run``."""

    def __init__(self, root: Path, manifest: dict[str, Any], run: Any):
        app = manifest.get("app")
        if not isinstance(app, dict) or "task" not in app:
            raise EdgekitError(f"{root} carries no task (export it with edgekit export hf:PATH "
                               "--task ...)")
        self.app, self.run = app, run
        self.inputs = [i["name"] for i in manifest["inputs"]]
        self._tokenizer = None
        if app["task"] in TEXT_TASKS:
            self._tokenizer = self._load_tokenizer(root, manifest)

    def _load_tokenizer(self, root: Path, manifest: dict[str, Any]) -> Any:
        entry = self.app.get("tokenizer")
        if not isinstance(entry, dict):
            raise EdgekitError(f"{root} has a text task but no tokenizer")
        name = entry.get("file")
        if name not in manifest["files"] or "/" in name or name.startswith("."):
            raise EdgekitError(f"{root}: the tokenizer {name!r} is not one of the artifact's "
                               "files")
        data = (root / name).read_bytes()
        if hashlib.sha256(data).hexdigest() != manifest["files"].get(name):
            raise EdgekitError(f"artifact file {name} does not match its sha256 in the manifest")
        longest = int(entry["max_length"])
        for spec in manifest["inputs"]:  # the artifact's own bound on the sequence length
            dims = manifest.get("dims") or {}
            for d in spec["shape"]:
                if isinstance(d, str) and d in dims:
                    longest = min(longest, int(dims[d][1]))
                elif isinstance(d, int) and spec["name"] == "input_ids" and d > 1:
                    longest = min(longest, d)
        self.static_length = _static_length(manifest)
        return text_tokenizer(data.decode(), longest)

    def _text_inputs(self, text: str) -> dict[str, np.ndarray]:
        if not isinstance(text, str):
            raise EdgekitError(f"expected a str, got {type(text).__name__}")
        enc = self._tokenizer.encode(text)
        ids, mask = list(enc.ids), list(enc.attention_mask)
        if self.static_length is not None:  # a static artifact: pad to its one length
            pad = self.static_length - len(ids)
            ids, mask = ids + [0] * pad, mask + [0] * pad
        arrays = {"input_ids": np.asarray([ids], np.int64),
                  "attention_mask": np.asarray([mask], np.int64)}
        return {n: arrays[n] for n in self.inputs}

    def _image_inputs(self, image: np.ndarray) -> dict[str, np.ndarray]:
        pre = self.app["image"]
        a = np.asarray(image)
        size = pre["size"]
        if a.shape != (size, size, 3):
            raise EdgekitError(f"expected an image of shape {size}x{size}x3, got "
                               f"{'x'.join(map(str, a.shape))} (resize it first)")
        x = a.astype(np.float32) * (pre["rescale"] if a.dtype == np.uint8 else 1.0)
        x = (x - np.asarray(pre["mean"], np.float32)) / np.asarray(pre["std"], np.float32)
        return {self.inputs[0]: np.ascontiguousarray(x.transpose(2, 0, 1)[None])}

    def _output(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return next(iter(self.run(**inputs).values()))

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if self.app["task"] != "feature-extraction":
            raise EdgekitError(f"embed needs a feature-extraction artifact; this one is "
                               f"{self.app['task']}")
        if isinstance(texts, str):
            texts = [texts]
        rows = [self._output(self._text_inputs(t))[0] for t in texts]
        return np.stack(rows) if rows else np.zeros((0, 0), np.float32)

    def classify(self, items: Sequence[Any]) -> list[tuple[str, float]]:
        task = self.app["task"]
        if task not in ("text-classification", "image-classification"):
            raise EdgekitError(f"classify needs a classification artifact; this one is {task}")
        if isinstance(items, str) or (isinstance(items, np.ndarray) and items.ndim == 3):
            items = [items]
        labels = self.app.get("labels")
        out = []
        for item in items:
            inputs = (self._text_inputs(item) if task == "text-classification"
                      else self._image_inputs(item))
            logits = self._output(inputs).reshape(-1).astype(np.float64)
            p = np.exp(logits - logits.max())
            p /= p.sum()
            k = int(p.argmax())
            out.append((labels[k] if labels and k < len(labels) else str(k), float(p[k])))
        return out


def _static_length(manifest: dict[str, Any]) -> int | None:
    for spec in manifest["inputs"]:
        if spec["name"] == "input_ids":
            last = spec["shape"][-1]
            return last if isinstance(last, int) else None
    return None
