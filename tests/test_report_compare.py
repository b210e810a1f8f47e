"""Bootstrap intervals, A/B comparison, the gate and the run schema, on synthetic run files
(latencies drawn from known distributions, so a real regression and mere noise are known)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from click.testing import CliRunner

from edgekit.cli import cli
from edgekit.errors import EdgekitError
from edgekit.report import stats as rstats
from edgekit.report.compare import check_assertion, check_regression, compare_runs
from edgekit.report.record import finalize, parse_duration
from edgekit.report.schema import SCHEMA, load_run, save_run, validate


def latencies(seed: int, n: int = 400, median_ms: float = 10.0, scale: float = 1.0):
    """Skewed, heavy-tailed latencies like a real machine's: lognormal body, 3% outliers."""
    rng = np.random.default_rng(seed)
    t = median_ms * np.exp(rng.normal(0, 0.15, n))
    spikes = rng.random(n) < 0.03
    t[spikes] *= rng.uniform(2, 6, spikes.sum())
    return list(t * scale)


def make_run(times: dict[str, list[float]], passes=(), per_op=None) -> dict:
    base = {"artifact": "synthetic.edgekit", "target": "host", "threads": 2, "load_ms": 3.0,
            "first_run_ms": 12.0, "iterations": len(times["edgekit"]),
            "latency_ms": rstats.latency_stats(times["edgekit"]), "notes": []}
    others = {k: rstats.latency_stats(v) for k, v in times.items() if k != "edgekit"}
    if others:
        base["baselines"] = others
        base["ratios"] = {k: base["latency_ms"]["median"] / v["median"] for k, v in others.items()}
    if per_op is not None:
        base["per_op"] = per_op
    steady = {k: {"iterations": len(v), "seconds": sum(v) / 1e3, "stopped": "repeat"}
              for k, v in times.items()}
    manifest = {"target": {"name": "host"}, "passes": list(passes), "versions": {}}
    return finalize(base, times, steady, manifest, warmup=10)


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_bootstrap_ci_covers_the_true_median_and_narrows():
    covered = 0
    for seed in range(30):
        lo, hi = rstats.bootstrap_median_ci(np.random.default_rng(seed).exponential(1.0, 200))
        covered += lo <= np.log(2) <= hi
    assert covered >= 25  # nominal 95%: 28.5 of 30 expected
    t = latencies(0, n=4000)
    wide, narrow = rstats.bootstrap_median_ci(t[:100]), rstats.bootstrap_median_ci(t)
    assert narrow[1] - narrow[0] < (wide[1] - wide[0]) / 3
    lo, hi = rstats.order_stat_median_ci(t)
    assert narrow[0] == pytest.approx(lo, rel=0.02) and narrow[1] == pytest.approx(hi, rel=0.02)


def test_noise_is_not_flagged_and_a_real_regression_is():
    def bare(t):  # what compare_runs reads from a run
        return {"times_ms": {"edgekit": t}, "latency_ms": {"median": float(np.median(t))}}

    flagged = sum(compare_runs(bare(latencies(2 * s)), bare(latencies(2 * s + 1)))[0].significant
                  for s in range(20))
    assert flagged <= 2  # 95% intervals: about 1 in 20 by chance
    old = make_run({"edgekit": latencies(1), "ort": latencies(2, median_ms=5)})
    new = make_run({"edgekit": latencies(3, scale=1.12), "ort": latencies(4, median_ms=5)})
    by_engine = {c.engine: c for c in compare_runs(old, new)}
    slow = by_engine["edgekit"]
    assert slow.significant and slow.ci[0] > 1 and "slower" in slow.verdict
    assert slow.ratio == pytest.approx(1.12, rel=0.05)
    assert not by_engine["ort"].significant
    assert check_regression(new, old, 0.05)[1].startswith("regression: median")
    assert check_regression(new, old, 0.20)[1] is None  # within the allowance
    assert check_regression(old, new, 0.05)[1] is None  # a speed-up is no regression


def test_compare_and_gate_cli(tmp_path):
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    save_run(make_run({"edgekit": latencies(10)}), a)
    save_run(make_run({"edgekit": latencies(11)}), b)
    save_run(make_run({"edgekit": latencies(12, scale=1.25)}), c)
    r = invoke("compare", a, b, "--max-regress", "5%")  # same distribution: the gate passes
    assert r.exit_code == 0 and "error" not in r.output, r.output
    r = invoke("compare", a, c, "--max-regress", "5%")
    lines = r.output.strip().splitlines()
    assert r.exit_code == 1 and "slower" in lines[0]
    assert lines[-1].startswith("error: regression: median") and len(lines) == 2
    data = json.loads(invoke("compare", a, c, "--json").output)
    assert data["engines"][0]["significant"] and data["engines"][0]["ci"][0] > 1
    other = make_run({"edgekit": latencies(13)})
    other["environment"]["threads"] = 1
    save_run(other, b)
    assert "note: environment differs: threads: 2 -> 1" in invoke("compare", a, b).output
    r = invoke("compare", a, tmp_path / "missing.json")
    assert r.exit_code == 1 and r.output.startswith("error: run file not found")


def test_assertions():
    run = make_run({"edgekit": latencies(5), "ort": latencies(6, median_ms=20)})
    assert check_assertion(run, "p99<1s") is None
    assert check_assertion(run, "median <= 20000us") is None
    assert check_assertion(run, "ratio.ort<1") is None and check_assertion(run, "ratio<1x") is None
    assert check_assertion(run, "ort.median>15ms") is None
    msg = check_assertion(run, "p99<5ms")
    assert msg.startswith("assertion 'p99<5ms' failed: p99 ") and "required < 5 ms" in msg
    assert "cv" in check_assertion(run, "cv<1%")
    for bad, why in [("p99", "expected STAT<VALUE"), ("p42<3ms", "unknown statistic"),
                     ("cv<3ms", "does not take unit"), ("torch.p99<1ms", "not measured"),
                     ("ratio.torch<1", "add --compare torch")]:
        with pytest.raises(EdgekitError, match=why):
            check_assertion(run, bad)


def test_schema_accepts_runs_and_names_what_is_wrong(tmp_path):
    run = make_run({"edgekit": latencies(7)}, per_op=[
        {"kernel": "fused_conv2d_add_relu", "onnx_nodes": ["conv0", "relu0"], "calls": 400,
         "total_ms": 120.0, "mean_ms": 0.3, "share": 0.6}])
    assert validate(run) == []
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    jsonschema.validate(run, SCHEMA)
    broken = json.loads(json.dumps(run))
    del broken["latency_ms"]["p99"]
    broken["times_ms"]["edgekit"][3] = "fast"
    errs = validate(broken)
    assert "run.latency_ms: missing 'p99'" in errs
    assert "run.times_ms.edgekit[3]: expected number, got str" in errs
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMA)
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken))
    with pytest.raises(EdgekitError, match="does not match the profile schema"):
        load_run(path)
    path.write_text(json.dumps({**run, "schema_version": 99}))
    with pytest.raises(EdgekitError, match="schema version 99 is not supported"):
        load_run(path)
    path.write_text(json.dumps({"model": "m", "profile": run}))  # the demo's report.json
    assert load_run(path)["times_ms"] == run["times_ms"]
    path.write_text("{not json")
    with pytest.raises(EdgekitError, match="cannot read .* as JSON"):
        load_run(path)


def test_noisy_runs_are_flagged():
    calm = make_run({"edgekit": list(np.full(100, 5.0) + np.linspace(0, 0.1, 100))})
    noisy = make_run({"edgekit": latencies(8) + [200.0] * 20})
    assert calm["warnings"] == []
    assert any(w.startswith("noisy measurement: edgekit") for w in noisy["warnings"])


def test_duration_auto_stops_on_a_tight_ci_or_the_cap():
    x = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    times, why = rstats.time_until_stable(lambda: x @ x, warmup=5, max_seconds=5.0,
                                          rel_half_width=0.05)
    assert why == "ci" and len(times) >= 30
    rng = np.random.default_rng(1)  # uniform 0-4 ms: the median's CI stays ~±5%, not ±0.1%
    t0 = time.perf_counter()
    times, why = rstats.time_until_stable(lambda: time.sleep(0.004 * rng.random()), warmup=0,
                                          max_seconds=0.6, rel_half_width=0.001)
    assert why == "time cap" and 0.6 <= time.perf_counter() - t0 < 1.5
    assert parse_duration("auto") == "auto" and parse_duration("auto:3") == "auto:3"
    assert parse_duration("0.5") == 0.5
    for bad in ("auto:0", "soon", "-1"):
        with pytest.raises(EdgekitError):
            parse_duration(bad)


def test_html_escapes_names_and_loads_nothing():
    from edgekit.report.html import render

    evil = "<script>alert(1)</script>"
    run = make_run({"edgekit": latencies(9), "ort": latencies(10, median_ms=4)},
                   passes=[{"pass": evil, "status": "applied", "changed": {"r": 1},
                            "ops_before": {"A": 2}, "ops_after": {"A": 1},
                            "max_rel_error": 1e-7}],
                   per_op=[{"kernel": evil, "onnx_nodes": [evil], "calls": 1, "total_ms": 1.0,
                            "mean_ms": 1.0, "share": 1.0}])
    page = render([("a", run), ("b", run)])
    assert "<script" not in page and "&lt;script&gt;" in page
    assert page.count('class="violin"') == 4 and 'id="per-op-chart-0"' in page
    for attr in ("src=", "href=", "url(", "@import", "<link"):
        assert attr not in page


@pytest.mark.parametrize("command", ["report", "compare"])
def test_help_has_an_example(command):
    r = invoke(command, "--help")
    assert r.exit_code == 0 and "Example:" in r.output


def test_schema_checks_the_memory_object():
    run = make_run({"edgekit": latencies(11)})
    run["memory"] = {"artifact": {"library_bytes": 300_000, "total_bytes": 420_000, "files": 3},
                     "runs": 3, "planned_workspace": {"bytes": 262_696, "storages": 4},
                     "engines": {"edgekit": {"base_rss_bytes": 61_000_000, "load_bytes": 900_000,
                                             "run_bytes": 190_000, "total_bytes": 1_090_000,
                                             "resident_bytes": 1_000_000, "runs": 3}}}
    assert validate(run) == []
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(run, SCHEMA)
    broken = json.loads(json.dumps(run))
    del broken["memory"]["engines"]["edgekit"]["load_bytes"]
    broken["memory"]["artifact"]["total_bytes"] = -1
    broken["memory"]["planned_workspace"] = "big"
    errs = validate(broken)
    assert "run.memory.engines.edgekit: missing 'load_bytes'" in errs
    assert "run.memory.artifact.total_bytes: -1 is below 0" in errs
    assert "run.memory.planned_workspace: expected object or null, got str" in errs
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMA)
