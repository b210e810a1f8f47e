"""Per-op profiling: every kernel and VM builtin timed, rows in the documented contract,
kernels mapped back to the ONNX nodes they compute."""

from __future__ import annotations

import json

import onnx
import pytest
from click.testing import CliRunner

from edgekit import per_op
from edgekit.cli import cli

ROW_KEYS = {"kernel": str, "onnx_nodes": list, "calls": int, "total_ms": float,
            "mean_ms": float, "share": float, "int8": bool}


@pytest.fixture(scope="module")
def profiled(compiled_default):
    return per_op.profile_artifact_per_op(compiled_default.path, threads=1, warmup=2, repeat=10)


def test_rows_follow_the_contract(profiled):
    rows = profiled["per_op"]
    assert rows, "no kernel was timed"
    for row in rows:
        assert set(row) == set(ROW_KEYS)
        for key, kind in ROW_KEYS.items():
            assert isinstance(row[key], kind), (key, row)
        assert row["calls"] >= 1 and row["total_ms"] > 0
        assert row["mean_ms"] == pytest.approx(row["total_ms"] / row["calls"])
    totals = [r["total_ms"] for r in rows]
    assert totals == sorted(totals, reverse=True)
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    assert any(r["kernel"].startswith("vm.builtin.") for r in rows)


def test_rows_add_up_to_the_run(profiled):
    info = profiled["per_op_info"]
    total = sum(r["total_ms"] for r in profiled["per_op"])
    # Calls are timed inside each run; the rest is the VM dispatch and the timing callback,
    # whose share depends on the machine's load: only the upper bound is a fact.
    assert 0 < total <= 1.05 * info["instrumented_run_ms"]


def test_every_conv_and_gemm_is_named(profiled, compiled_default):
    model = onnx.load(str(compiled_default.path / "model.onnx"))
    wanted = {n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")}
    named = {n for r in profiled["per_op"] for n in r["onnx_nodes"]}
    assert wanted and wanted <= named
    # A node belongs to one kernel only.
    listed = [n for r in profiled["per_op"] for n in r["onnx_nodes"]]
    assert len(listed) == len(set(listed))


def test_kernel_names_split_into_relax_ops():
    assert per_op.kernel_ops("fused_conv2d3_add2_maximum2_minimum2") == [
        "conv2d", "add", "maximum", "minimum"]
    assert per_op.kernel_ops("fused_layer_norm1_permute_dims2_matmul") == [
        "layer_norm", "permute_dims", "matmul"]


def test_mapping_by_signature():
    nodes = [("c1", "Conv"), ("clip1", "Clip"), ("c2", "Conv"), ("res", "Add"),
             ("relu", "Relu"), ("fc", "Gemm")]
    calls = ["fused_conv2d_add_maximum_minimum", "vm.builtin.alloc_tensor",
             "fused_conv2d1_add1", "maximum", "fused_matmul_add2"]
    got = per_op.map_kernels(calls, nodes)
    assert got == {"fused_conv2d_add_maximum_minimum": ["c1", "clip1"],
                   "fused_conv2d1_add1": ["c2", "res"], "maximum": ["relu"],
                   "fused_matmul_add2": ["fc"]}


def test_cli_per_op_json_and_table(compiled_default):
    runner = CliRunner()
    art = str(compiled_default.path)
    out = runner.invoke(cli, ["profile", art, "--per-op", "--json", "--repeat", "5",
                              "--warmup", "1", "--threads", "1"], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["per_op"] and set(data["per_op"][0]) == set(ROW_KEYS)
    table = runner.invoke(cli, ["profile", art, "--per-op", "--repeat", "5", "--warmup", "1",
                                "--threads", "1"], catch_exceptions=False)
    assert table.exit_code == 0 and "fused_conv2d" in table.output
