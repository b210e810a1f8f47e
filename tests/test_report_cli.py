"""``profile --save/--assert/--baseline/--duration auto`` and ``report`` on a real compiled
artifact (a Conv+BatchNorm model compiled with the fold-bn pass, so its run carries a real
pass ledger), the run it writes checked against the schema, and its memory section."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from edgekit.cli import cli
from edgekit.report.schema import SCHEMA, STAT_KEYS, load_run, save_run, validate


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def bn_artifact(tmp_path_factory):
    """Conv -> BatchNormalization -> Relu, compiled for the host with fold-bn."""
    from edgekit import api

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in [
        ("w", rng.standard_normal((8, 3, 3, 3))), ("scale", rng.uniform(0.5, 2, 8)),
        ("bias", rng.standard_normal(8)), ("mean", rng.standard_normal(8)),
        ("var", rng.uniform(0.5, 2, 8))]]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["b"],
                          name="bn"),
         helper.make_node("Relu", ["b"], ["y"], name="relu")],
        "conv_bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16, 16])], inits)
    d = tmp_path_factory.mktemp("report")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
              d / "convbn.onnx")
    return api.compile(d / "convbn.onnx", "host", d / "convbn.edgekit", passes="fold-bn").path


@pytest.fixture(scope="module")
def saved_run(bn_artifact, tmp_path_factory):
    path = tmp_path_factory.mktemp("runs") / "run.json"
    r = invoke("profile", bn_artifact, "--warmup", "2", "--repeat", "40", "--compare", "ort",
               "--threads", "1", "--json", "--save", path)
    assert r.exit_code == 0, r.output
    return path, json.loads(r.output)


def test_profile_json_follows_the_schema(saved_run, bn_artifact):
    path, printed = saved_run
    run = load_run(path)
    assert run == printed and validate(run) == []
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(run, SCHEMA)
    assert set(run["latency_ms"]) == set(STAT_KEYS) and set(run["baselines"]) == {"ort"}
    for engine in ("edgekit", "ort"):
        t = run["times_ms"][engine]
        lo, hi = run["median_ci_ms"][engine]
        assert len(t) == 40 and lo <= float(np.median(t)) <= hi
        assert run["phases"]["steady"][engine] == {**run["phases"]["steady"][engine],
                                                   "iterations": 40, "stopped": "repeat"}
    env = run["environment"]
    assert env["threads"] == 1 and env["logical_cpus"] >= 1 and env["cpu"]
    assert env["target"]["name"] == "host" and "apache-tvm" in env["versions"]
    (ledger,) = run["passes"]
    assert ledger["pass"] == "fold-bn" and ledger["status"] == "applied"
    assert ledger["ops_before"]["BatchNormalization"] == 1
    assert "BatchNormalization" not in ledger["ops_after"]
    assert run["phases"]["load_ms"] == run["load_ms"] > 0


def test_assert_and_baseline_gate(saved_run, bn_artifact, tmp_path):
    path, run = saved_run
    common = ("profile", bn_artifact, "--warmup", "1", "--repeat", "30", "--threads", "1",
              "--no-memory")
    r = invoke(*common, "--assert", "p99<100s", "--assert", "median>0ms")
    assert r.exit_code == 0, r.output
    out = tmp_path / "again.json"
    r = invoke(*common, "--assert", "p99<0.0001us", "--save", out)
    assert r.exit_code == 1
    assert r.output.strip().splitlines()[-1].startswith("error: assertion 'p99<0.0001us' "
                                                         "failed: p99 ")
    assert load_run(out)["iterations"] == 30  # the run is saved before the gate fails
    assert "memory" not in load_run(out)  # --no-memory
    # baselines derived from the real run: 10x faster before (a regression now), 10x slower
    for factor, code in ((0.1, 1), (10.0, 0)):
        base = json.loads(json.dumps(run))
        base["times_ms"] = {k: [x * factor for x in v] for k, v in run["times_ms"].items()}
        base["latency_ms"] = {k: v * factor for k, v in run["latency_ms"].items()}
        base["latency_ms"]["cv"] = run["latency_ms"]["cv"]
        save_run(base, tmp_path / "base.json")
        r = invoke(*common, "--baseline", tmp_path / "base.json", "--max-regress", "5%")
        assert r.exit_code == code, r.output
        assert "vs baseline" in r.output
        if code:
            assert r.output.strip().splitlines()[-1].startswith("error: regression: median")


def test_gate_usage_errors_fail_before_timing(bn_artifact, tmp_path):
    r = invoke("profile", bn_artifact, "--max-regress", "5%")
    assert r.exit_code == 2 and "--max-regress needs --baseline" in r.output
    r = invoke("profile", bn_artifact, "--assert", "p99 under 3")
    assert r.exit_code == 1 and r.output.startswith("error: --assert 'p99 under 3'")
    r = invoke("profile", bn_artifact, "--duration", "soon")
    assert r.exit_code == 2 and "expected seconds or 'auto'" in r.output
    r = invoke("profile", bn_artifact, "--baseline", tmp_path / "none.json")
    assert r.exit_code == 1 and "run file not found" in r.output


def test_duration_auto(bn_artifact):
    r = invoke("profile", bn_artifact, "--warmup", "2", "--duration", "auto:1", "--threads",
               "1", "--json", "--no-memory")
    assert r.exit_code == 0, r.output
    run = json.loads(r.output)
    steady = run["phases"]["steady"]["edgekit"]
    assert steady["stopped"] in ("ci", "time cap") and steady["seconds"] < 2.5
    assert steady["iterations"] == run["iterations"] == len(run["times_ms"]["edgekit"])
    if steady["stopped"] == "ci":
        lo, hi = run["median_ci_ms"]["edgekit"]
        assert (hi - lo) / 2 < 0.03 * run["latency_ms"]["median"]


def test_report_command_writes_html_and_svg(saved_run, tmp_path):
    path, _ = saved_run
    html, chart = tmp_path / "r.html", tmp_path / "img" / "latency.svg"
    r = invoke("report", path, "-o", html, "--svg", chart)
    assert r.exit_code == 0 and f"wrote {html}" in r.output, r.output
    page = html.read_text()
    assert page.count('class="violin"') == 2 and "fold-bn" in page
    memory = page[page.index('<h2 id="memory">'):page.index('<h2 id="pass-ledger">')]
    assert "<td>edgekit</td>" in memory and "<td>ort</td>" in memory
    assert "VM planned workspace" in memory and " MiB" in memory
    assert "BatchNormalization 1→0" in page and 'id="environment"' in page
    assert chart.read_text().startswith("<svg") and chart.read_text().count("<polygon") == 2
    r = invoke("report", path)
    assert r.exit_code == 2 and "-o REPORT.html" in r.output
    bad = tmp_path / "bad.json"
    bad.write_text('{"latency_ms": {}}')
    r = invoke("report", bad, "-o", tmp_path / "x.html")
    assert r.exit_code == 1 and r.output.startswith("error: ") and len(r.output.splitlines()) == 1
    assert not (tmp_path / "x.html").exists()


def test_profile_measures_memory(saved_run, bn_artifact):
    """Sizes equal the files'; every engine's RSS grows to load the model and stays in a
    plausible range; the VM's plan holds at least the output (1x8x16x16 float32)."""
    _, run = saved_run
    memory = run["memory"]
    files = [p for p in bn_artifact.iterdir() if p.is_file()]
    assert memory["artifact"] == {"library_bytes": (bn_artifact / "model.so").stat().st_size,
                                  "total_bytes": sum(p.stat().st_size for p in files),
                                  "files": len(files)}
    assert set(memory["engines"]) == {"edgekit", "ort"}
    for m in memory["engines"].values():
        assert 0 < m["load_bytes"] <= m["total_bytes"] < 512 * 2**20
        assert m["run_bytes"] <= m["total_bytes"] and m["runs"] == memory["runs"] >= 1
        assert 0 < m["resident_bytes"] <= m["total_bytes"]
        assert 2**20 < m["base_rss_bytes"] < 8 * 2**30  # an interpreter with its libraries
    ws = memory["planned_workspace"]
    assert ws["storages"] >= 1 and 8 * 16 * 16 * 4 <= ws["bytes"] < 64 * 2**20


def test_profile_text_shows_memory(bn_artifact):
    r = invoke("profile", bn_artifact, "--warmup", "1", "--repeat", "5", "--threads", "1",
               "--compare", "ort")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    (head,) = [ln for ln in lines if ln.startswith("memory: artifact ")]
    assert "VM planned workspace" in head and "storage(s)" in head
    (ort,) = [ln for ln in lines if ln.strip().startswith("ort ")]
    assert "peak RSS growth: load " in ort and "edgekit ÷ ort " in ort


def test_version_1_runs_are_still_read(saved_run, tmp_path):
    _, run = saved_run
    old = {k: v for k, v in run.items() if k != "memory"} | {"schema_version": 1}
    save_run(old, tmp_path / "v1.json")
    assert load_run(tmp_path / "v1.json")["schema_version"] == 1
    assert run["schema_version"] == 2
