"""The passes edgekit knows, as one explicit tuple (no registration by import side effect)."""

from __future__ import annotations

from edgekit.passes import (
    convert_bf16,
    convert_fp16,
    fold_bn,
    fold_constants,
    fold_ln_affine,
    fold_repbn,
    linear_attention_order,
    ln_to_rmsnorm,
    matformer_slice,
    merge_repvgg,
    poly_act,
    poly_gelu,
    poly_layernorm,
    poly_softmax,
    power_softmax,
    quantize_int8,
    rmsnorm_to_crmsnorm,
    token_prune,
)
from edgekit.passes.core import Pass

ALL: tuple[Pass, ...] = (
    fold_constants.PASS,
    fold_bn.PASS,
    merge_repvgg.PASS,
    fold_repbn.PASS,
    linear_attention_order.PASS,
    fold_ln_affine.PASS,
    ln_to_rmsnorm.PASS,
    rmsnorm_to_crmsnorm.PASS,
    token_prune.PASS,
    matformer_slice.PASS,
    poly_layernorm.PASS,
    poly_gelu.PASS,
    poly_act.PASS,
    poly_softmax.PASS,
    power_softmax.PASS,
    quantize_int8.PASS,
    convert_fp16.PASS,
    convert_bf16.PASS,
)


def available() -> dict[str, Pass]:
    return {p.name: p for p in ALL}
