"""Built-in reference models: ``edgekit graphs`` lists them, ``edgekit export NAME`` uses them.

Each module here defines ``SUMMARY`` (one line), ``INPUTS`` (name, shape, dtype) and
``build(seed=0) -> torch.nn.Module`` returning an eval-mode model with deterministic random
weights (BatchNorm running statistics randomised too, so folds are tested for real).
The registry is this explicit tuple, not an import side effect.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

DEFAULT = "mobile-cnn"

_MODULES = (
    "mobile_cnn",
    "repvgg_cnn",
    "slab_vit",
    "lmu",
    "lmuformer",
    "spiking_lmuformer",
    "tiny_gpt",
    "tiny_vit",
    "digits_vit",
    "digits_cnn",
    "slab_sla_vit",
    "digits_matformer",
    "power_causal_lm",
    "digits_sigmoid_vit",
)


@dataclass(frozen=True)
class GraphInfo:
    name: str
    summary: str
    inputs: tuple[tuple[str, tuple[int, ...], str], ...]
    module: ModuleType

    def build(self, seed: int = 0):
        return self.module.build(seed=seed)


def available() -> dict[str, GraphInfo]:
    """All built-in graphs by name (module name with ``_`` written ``-``)."""
    out = {}
    for mod_name in _MODULES:
        mod = importlib.import_module(f"{__name__}.{mod_name}")
        name = mod_name.replace("_", "-")
        out[name] = GraphInfo(name, mod.SUMMARY, tuple(mod.INPUTS), mod)
    return out
