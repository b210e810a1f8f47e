"""The passes edgekit knows, as one explicit tuple (no registration by import side effect)."""

from __future__ import annotations

from edgekit.passes import (
    fold_bn,
    fold_ln_affine,
    fold_repbn,
    ln_to_rmsnorm,
    merge_repvgg,
    rmsnorm_to_crmsnorm,
)
from edgekit.passes.core import Pass

ALL: tuple[Pass, ...] = (
    fold_bn.PASS,
    merge_repvgg.PASS,
    fold_repbn.PASS,
    fold_ln_affine.PASS,
    ln_to_rmsnorm.PASS,
    rmsnorm_to_crmsnorm.PASS,
)


def available() -> dict[str, Pass]:
    return {p.name: p for p in ALL}
