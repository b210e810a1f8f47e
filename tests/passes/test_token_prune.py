"""token-prune: token selection against a NumPy reference, static shapes, CLS, padding masks."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from _exports import export, tiny_bert_export

from edgekit.passes._ir import Builder
from edgekit.passes._wpr import emit_select
from edgekit.passes.core import run_pass
from edgekit.passes.token_prune import PASS, prune
from edgekit.verify import run_ort


def reference(attn, kt, k, r, cls, iters, vmin, vmax, method, eir=True):
    """Zero-TPrune selection in plain NumPy (float64), written from techniques.md §5."""
    b, h, n, _ = attn.shape
    s = np.full((b, h, n), 1.0 / n)
    for _ in range(1 if method == "colmean" else iters):
        s = np.einsum("bhi,bhij->bhj", s, attn)  # s_j = sum_i A_ij s_i
    if method == "wpr":
        var = ((n * s - 1) ** 2).mean(-1)
        w = ((var >= vmin) & (var <= vmax)).astype(float)
        w[w.sum(1) == 0] = 1.0
        w = w[:, :, None]
        # EIR: root mean square over the kept heads; else their mean
        score = np.sqrt((w * s**2).sum(1) / w.sum(1)) if eir else (w * s).sum(1) / w.sum(1)
    else:
        score = s.sum(1)
    kept = []
    for i in range(b):
        sc = score[i].copy()
        sc[:cls] = np.inf
        order = np.argsort(-sc, kind="stable")[:k + r]
        if r:
            k_i = k + r
            n_a = min(k_i - cls, max(r, k_i - k_i // 2))
            n_b = k_i - n_a
            keys = kt[i].mean(0).T
            keys = keys / (np.linalg.norm(keys, axis=-1, keepdims=True) + 1e-6)
            src, dst = order[n_b:], order[:n_b]
            prio = (keys[src] @ keys[dst].T).max(-1) + 3.0 * (score[i][src] <= 0)
            order = np.concatenate([dst, src[np.argsort(prio, kind="stable")[:n_a - r]]])
        kept.append(np.sort(order))
    return np.stack(kept)


def selection_model(shape, d, k, r, cls, iters, vmin, vmax, method,
                    eir=True) -> onnx.ModelProto:
    b, h, n, _ = shape
    attn = ir.val("attn", ir.DataType.FLOAT, ir.Shape(shape))
    kt = ir.val("kt", ir.DataType.FLOAT, ir.Shape([b, h, d, n]))
    graph = ir.Graph([attn, kt], [], nodes=[], opset_imports={"": 18}, name="select")
    idx = emit_select(Builder(graph), attn, shape, k, r, cls, iters, vmin, vmax, method, 0,
                      (kt, "bhdn", (b, h, d, n)) if r else None, eir)
    idx.dtype, idx.shape = ir.DataType.INT64, ir.Shape([b, k])
    graph.outputs.append(idx)
    model = ir.to_proto(ir.Model(graph, ir_version=10))
    onnx.checker.check_model(model, full_check=True)
    return model


def prune_model(model: onnx.ModelProto, *args) -> tuple[onnx.ModelProto, list[dict]]:
    """``token_prune.prune`` on a copy of ``model``, without the checks of ``run_pass``."""
    work = ir.from_proto(model)
    done = prune(work, *args)
    return ir.to_proto(work), done


def attention_maps(b, h, n, d, seed, sharp=2.0):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((b, h, n, n)) * sharp
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    return attn.astype(np.float32), rng.standard_normal((b, h, d, n)).astype(np.float32)


@pytest.mark.parametrize("method,k,r,vmin,vmax,eir", [
    ("wpr", 9, 0, 0.01, 1e9, True),
    ("wpr", 9, 0, 0.01, 1e9, False),
    ("wpr", 9, 3, 0.01, 1e9, True),
    ("wpr", 6, 4, 0.5, 2.0, True),  # head filter drops some heads
    ("wpr", 6, 4, 0.5, 2.0, False),
    ("wpr", 6, 4, 1e8, 1e9, True),  # no head passes: all heads count
    ("colmean", 9, 3, 0.0, 0.0, True),
])
def test_selection_matches_numpy_reference(method, k, r, vmin, vmax, eir):
    b, h, n, d = 2, 3, 17, 8
    model = selection_model((b, h, n, n), d, k, r, 1, 30, vmin, vmax, method, eir)
    for seed in range(3):
        attn, kt = attention_maps(b, h, n, d, seed)
        got = run_ort(model, {"attn": attn, "kt": kt})[0]
        want = reference(attn.astype(np.float64), kt.astype(np.float64), k, r, 1, 30, vmin,
                         vmax, method, eir)
        assert got.shape == (b, k)
        np.testing.assert_array_equal(got, want)


def test_cls_kept_even_when_ignored():
    b, h, n, d = 1, 2, 12, 4
    attn, kt = attention_maps(b, h, n, d, 0)
    attn[..., 0] = 0.0  # nobody attends to CLS: its importance is zero
    attn /= attn.sum(-1, keepdims=True)
    for method in ("wpr", "colmean", "random"):
        got = run_ort(selection_model((b, h, n, n), d, 4, 2, 1, 30, 0.0, 1e9, method),
                      {"attn": attn, "kt": kt})[0]
        assert got[0, 0] == 0 and np.all(np.diff(got[0]) > 0)


@pytest.fixture(scope="module")
def tiny_vit() -> onnx.ModelProto:
    """A 3-block, 17-token ViT (16 patches + CLS) exported from torch, random weights."""
    import torch
    from edgekit.graphs.digits_vit import _model

    torch.manual_seed(0)
    net = _model(dim=32, depth=3, heads=2, mlp=64).eval()
    net.patch = torch.nn.Conv2d(1, 32, 8, 8)  # 32x32 image -> 16 patches
    net.pos = torch.nn.Parameter(torch.randn(1, 17, 32) * 0.02)
    return export(net, (torch.zeros(1, 1, 32, 32),), ["image"])


def test_pass_static_shapes_and_flops(tiny_vit):
    from edgekit.passes.core import load_samples

    samples = load_samples(tiny_vit)
    params = PASS.parse_params({"keep": "0.5", "layers": "0/1"})
    new, run = run_pass(tiny_vit, PASS, params, samples)
    assert run.status == "applied", run.message
    assert [x["kept"] for x in run.report.details["layers"]] == [8, 4]
    assert run.flops_after < 0.8 * run.flops_before
    def dynamic(model):
        g = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True).graph
        return {vi.name for vi in [*g.value_info, *g.output]
                if not all(d.HasField("dim_value") for d in vi.type.tensor_type.shape.dim)}

    assert not dynamic(new)
    assert run_ort(new, samples[0])[0].shape == (1, 10)


def test_eir_parameter_reaches_the_graph(tiny_vit):
    """eir=1 combines heads by root mean square (one Sqrt per layer without the S-stage)."""
    def sqrts(eir: str) -> int:
        params = PASS.parse_params({"keep": "0.5", "layers": "0/1", "s_ratio": "0", "eir": eir})
        new, run = run_pass(tiny_vit, PASS, params, [])
        assert run.status == "applied", run.message
        return sum(n.op_type == "Sqrt" for n in new.graph.node) - sum(
            n.op_type == "Sqrt" for n in tiny_vit.graph.node)

    assert (sqrts("1"), sqrts("0")) == (2, 0)


def test_flops_target_schedule(tiny_vit):
    from edgekit import flops

    params = PASS.parse_params({"flops_target": "0.3", "layers": "0/1/2"})
    new, run = run_pass(tiny_vit, PASS, params, [])
    assert run.status == "applied", run.message
    assert 1 - flops.count(new) / flops.count(tiny_vit) >= 0.3


def test_pruning_twice(tiny_vit):
    once, run1 = run_pass(tiny_vit, PASS, PASS.parse_params({"layers": "0"}), [])
    twice, run2 = run_pass(once, PASS, PASS.parse_params({"layers": "1"}), [])
    assert (run1.status, run2.status) == ("applied", "applied")
    assert run2.flops_before == run1.flops_after > run2.flops_after
    assert run2.report.details["layers"][0]["tokens_before"] == 12  # 17 * 0.7 kept by run 1


def test_keep_all_is_unchanged_and_refusals(tiny_vit, add_relu_onnx):
    _, run = run_pass(tiny_vit, PASS, PASS.parse_params({"keep": "1.0"}), [])
    assert run.status == "unchanged"
    assert "layer 1: keep=1 keeps all 17 tokens" in {r for _, r in run.report.skipped}
    _, run = run_pass(onnx.load(add_relu_onnx), PASS, PASS.parse_params({}), [])
    assert run.status == "refused" and "Softmax" in run.message
    # a Softmax that is not over (B, H, N, N) attention is named with the reason
    classifier = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Softmax", ["x"], ["y"], name="probs")], "head",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 10])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 10])]))
    _, run = run_pass(classifier, PASS, PASS.parse_params({}), [])
    assert run.status == "refused" and run.report.skipped[0] == (
        "probs", "not self-attention: its output is (1, 10), not (B, H, N, N)")
    _, run = run_pass(tiny_vit, PASS, PASS.parse_params({"layers": "7"}), [])
    assert run.status == "refused" and "layer 7" in run.message


@pytest.fixture(scope="module")
def tiny_bert() -> onnx.ModelProto:
    return tiny_bert_export()


def test_unfolded_shape_chains_refuse_and_name_the_fix():
    """The raw TorchScript export computes shapes at run time: no static attention shape."""
    raw = tiny_bert_export(fold=False)
    new, run = run_pass(raw, PASS, PASS.parse_params({"keep": "0.5"}), [])
    assert run.status == "refused" and "run fold-constants before token-prune" in run.message
    assert new is raw


def test_a_dynamic_export_prunes_after_input_shapes_and_fold_constants(tmp_path):
    """How a user's BERT export arrives: dynamic batch and sequence, Shape chains everywhere.
    ``--input`` fixes the dims, fold-constants removes the chains, then token-prune applies."""
    from edgekit import api, intake
    from edgekit.verify import parse_input_spec

    axes = {0: "batch", 1: "seq"}
    path = tmp_path / "dyn.onnx"
    onnx.save(tiny_bert_export(fold=False, dynamic={"input_ids": axes, "attention_mask": axes}),
              path)
    specs = [parse_input_spec("input_ids:1x16"), parse_input_spec("attention_mask:1x16")]
    model = intake.load_onnx(path, specs)
    result = api.rewrite(model, "fold-constants,token-prune:keep=0.5:layers=1", specs)
    assert [r.status for r in result.ledger] == ["applied", "applied"], result.ledger[-1].message
    assert result.ledger[1].report.details["layers"][0]["kept"] == 8


def test_padding_is_pruned_first_and_stays_masked(tiny_bert):
    ids = np.random.default_rng(0).integers(1, 100, (1, 16)).astype(np.int64)
    mask = np.zeros((1, 16), np.int64)
    mask[0, :9] = 1  # 9 real tokens (CLS first), 7 padding
    sample = {"input_ids": ids, "attention_mask": mask}
    ref = run_ort(tiny_bert, sample)[0]
    # keeping 10 of 16 after layer 0 keeps every real token: the embedding must not change
    new, done = prune_model(tiny_bert, [0], 10 / 16, 0.5, 1, 30, 0.0, 1e9, "wpr", 0)
    assert done[0]["kept"] == 10
    np.testing.assert_allclose(run_ort(new, sample)[0], ref, rtol=1e-5, atol=1e-6)
    # pruning below the real count still never lets padding into the pooled embedding
    new, _ = prune_model(tiny_bert, [0], 6 / 16, 0.5, 1, 30, 0.0, 1e9, "wpr", 0)
    out = run_ort(new, sample)[0]
    cos = float(out.ravel() @ ref.ravel() / (np.linalg.norm(out) * np.linalg.norm(ref)))
    assert np.isfinite(out).all() and cos > 0.5


def test_rewrite_cli_reports_flops(tiny_vit, tmp_path):
    import json

    from click.testing import CliRunner

    from edgekit.cli import cli

    onnx.save(tiny_vit, tmp_path / "vit.onnx")
    result = CliRunner().invoke(cli, ["rewrite", str(tmp_path / "vit.onnx"), "-o",
                                      str(tmp_path / "out.onnx"), "--passes",
                                      "token-prune:keep=0.5:layers=0", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    run = report["ledger"][0]
    assert run["status"] == "applied" and run["flops_after"] < run["flops_before"]
    assert (report["flops_before"], report["flops_after"]) == (run["flops_before"],
                                                                run["flops_after"])
    bad = CliRunner().invoke(cli, ["rewrite", str(tmp_path / "vit.onnx"), "-o",
                                   str(tmp_path / "bad.onnx"), "--passes",
                                   "token-prune:importance=magic"])
    assert "importance='magic'" in bad.output


def test_pruned_graph_compiles_with_tvm(tiny_vit, tmp_path):
    """Static keep counts: TVM compiles the pruned graph and matches onnxruntime on it."""
    from edgekit import api

    new, _ = prune_model(tiny_vit, [0, 1], 0.5, 0.25, 1, 10, 0.01, 1e9, "wpr", 0)
    onnx.save(new, tmp_path / "pruned.onnx")
    result = api.compile(tmp_path / "pruned.onnx", "host", tmp_path / "pruned.edgekit")
    assert all(c["ok"] for c in result.manifest["verification"]["outputs"])
