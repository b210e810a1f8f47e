"""One self-contained HTML page for one or more profile runs: latency violins per engine, a
statistics table with the median's confidence interval, memory (artifact size, RSS growth to
load and run per engine, the VM's planned workspace; when the run has it), per-op bars (when
the run has per-op rows), the pass ledger, the environment, and with several runs a
comparison of each run against the first. Styles and charts are inline; the page loads nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import Any

from edgekit.errors import EdgekitError
from edgekit.report import svg
from edgekit.report.compare import compare_runs, environment_differences
from edgekit.report.memory import mib
from edgekit.report.schema import STAT_KEYS, load_run

_CSS = """
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1000px;color:#111827;
padding:0 1rem}
h1{font-size:1.5rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #e5e7eb}
table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem}
td,th{border:1px solid #e5e7eb;padding:.25rem .5rem;text-align:right;vertical-align:top}
th:first-child,td:first-child{text-align:left}
.ok{color:#15803d}.bad{color:#b91c1c}.warn{background:#fef3c7;padding:.5rem;margin:.25rem 0}
.muted{color:#6b7280}svg.chart{max-width:100%;height:auto}
"""


def _engines(run: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [("edgekit", run["latency_ms"]), *run.get("baselines", {}).items()]


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]], table_id: str = "") -> str:
    id_attr = f' id="{table_id}"' if table_id else ""
    out = [f"<table{id_attr}><tr>", *(f"<th>{escape(str(h))}</th>" for h in head), "</tr>"]
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return escape(str(v)) if v is not None else '<span class="muted">-</span>'


def latency_rows(runs: Sequence[tuple[str, dict[str, Any]]]) -> list:
    """(label, engine, times, CI) rows for ``svg.latency_violins``, grouped by engine."""
    many = len(runs) > 1
    engines = list(dict.fromkeys(e for _, r in runs for e in r["times_ms"]))
    return [(f"{label} · {e}" if many else e, e, run["times_ms"][e], run["median_ci_ms"][e])
            for e in engines for label, run in runs if e in run["times_ms"]]


def _stats_section(label: str, run: dict[str, Any]) -> str:
    engines = _engines(run)
    rows = []
    for key in STAT_KEYS:
        rows.append([key, *(f"{s[key]:.1%}" if key == "cv" else f"{s[key]:.4g}"
                            for _, s in engines)])
    rows.append(["median 95% CI", *(
        "{:.4g} – {:.4g}".format(*run["median_ci_ms"][e]) if e in run["median_ci_ms"] else "-"
        for e, _ in engines)])
    rows.append(["timed calls", *(str(len(run["times_ms"].get(e, []))) for e, _ in engines)])
    rows.append(["edgekit ÷ engine", "1.00",
                 *(f"{run['ratios'][e]:.2f}" for e, _ in engines[1:] if e in run["ratios"])])
    phases = run["phases"]
    return (f"<h3>{escape(label)}: latency in ms</h3>"
            + _table(["statistic", *(e for e, _ in engines)], rows)
            + f'<p>load {phases["load_ms"]:.1f} ms · first run {phases["first_run_ms"]:.3g} ms'
              f' · {phases["warmup_calls"]} warm-up calls · {run["threads"]} threads</p>'
            + "".join(f'<p class="warn">{escape(w)}</p>' for w in run.get("warnings", []))
            + "".join(f'<p class="muted">{escape(n)}</p>' for n in run.get("notes", [])))


def _memory_section(label: str, run: dict[str, Any]) -> str:
    memory = run["memory"]
    engines = memory["engines"]
    base = engines.get("edgekit", {}).get("total_bytes")
    rows = [[escape(e), mib(m["load_bytes"]), mib(m["run_bytes"]), mib(m["total_bytes"]),
             mib(m["resident_bytes"]),
             f"{base / m['total_bytes']:.2f}" if base is not None and m["total_bytes"] > 0
             else "-"] for e, m in engines.items()]
    art, ws = memory["artifact"], memory["planned_workspace"]
    planned = ("not measured" if ws is None
               else f"{mib(ws['bytes'])} in {ws['storages']} storage(s)")
    return (f"<h3>{escape(label)}: memory</h3>"
            + _table(["engine", "load", f"first {memory['runs']} runs", "load + run",
                      "resident after", "edgekit ÷ engine (load + run)"], rows)
            + f"<p>artifact {mib(art['total_bytes'])} ({art['files']} files; library "
              f"{mib(art['library_bytes'])}) · VM planned workspace {planned}</p>")


def _op_table(run: dict[str, Any], top: int = 15) -> str:
    rows = sorted(run["per_op"], key=lambda r: -float(r["total_ms"]))[:top]
    return _table(["kernel", "ONNX nodes", "calls", "total ms", "mean ms", "share"], [
        [escape(r["kernel"]), escape(", ".join(r.get("onnx_nodes") or [])) or "-",
         str(r["calls"]), f"{r['total_ms']:.4g}", _fmt(r.get("mean_ms")),
         "-" if r.get("share") is None else f"{r['share']:.1%}"] for r in rows])


def _ops_total(counts: dict[str, int] | None) -> str:
    return str(sum(counts.values())) if counts else "-"


def _ledger(label: str, run: dict[str, Any]) -> str:
    passes = run.get("passes", [])
    if not passes:
        return f"<h3>{escape(label)}</h3><p class=\"muted\">no rewrite passes were applied</p>"
    rows = []
    for p in passes:
        before, after = p.get("ops_before") or {}, p.get("ops_after") or {}
        delta = ", ".join(f"{op} {before.get(op, 0)}→{after.get(op, 0)}"
                          for op in sorted(set(before) | set(after))
                          if before.get(op, 0) != after.get(op, 0)) or "none"
        changed = ", ".join(f"{k}: {v}" for k, v in (p.get("changed") or {}).items()) or "-"
        cls = "ok" if p.get("status") == "applied" else "bad" \
            if p.get("status") in ("refused", "rolled-back") else "muted"
        err = p.get("max_rel_error")
        rows.append([escape(p["pass"]), f'<span class="{cls}">{escape(str(p["status"]))}</span>',
                     escape(changed), f"{_ops_total(before)} → {_ops_total(after)}",
                     escape(delta), "-" if err is None else f"{err:.2e}"])
    return f"<h3>{escape(label)}</h3>" + _table(
        ["pass", "status", "changed", "ops", "op counts", "max rel. error"], rows)


def _environment(runs: Sequence[tuple[str, dict[str, Any]]]) -> str:
    keys = ["cpu", "physical_cores", "logical_cpus", "threads", "os", "machine", "python",
            "hostname", "device_key"]
    envs = [r["environment"] for _, r in runs]
    rows = [[k, *(_fmt(e.get(k)) for e in envs)] for k in keys]
    rows.append(["target", *(_fmt(e["target"].get("name")) for e in envs)])
    rows.append(["artifact", *(_fmt(r["artifact"]) for _, r in runs)])
    rows.append(["created", *(_fmt(r["created"]) for _, r in runs)])
    names = sorted({k for e in envs for k in e.get("versions", {})})
    rows += [[f"version: {n}", *(_fmt(e.get("versions", {}).get(n)) for e in envs)]
             for n in names]
    return _table(["", *(label for label, _ in runs)], rows, "environment")


def _comparison(runs: Sequence[tuple[str, dict[str, Any]]]) -> str:
    base_label, base = runs[0]
    rows = []
    for label, run in runs[1:]:
        for c in compare_runs(base, run):
            cls = "muted" if not c.significant else "bad" if c.ratio > 1 else "ok"
            rows.append([f"{escape(label)} vs {escape(base_label)}", escape(c.engine),
                         f"{c.old_median_ms:.4g}", f"{c.new_median_ms:.4g}", f"{c.ratio:.3f}",
                         f"{c.ci[0]:.3f} – {c.ci[1]:.3f}",
                         f'<span class="{cls}">{escape(c.verdict)}</span>'])
    diffs = [f"{label}: {d}" for label, run in runs[1:]
             for d in environment_differences(base, run)]
    return _table(["runs", "engine", "median before (ms)", "median after (ms)", "ratio",
                   "95% CI", "verdict"], rows, "comparison") + "".join(
        f'<p class="warn">environment differs from {escape(base_label)}: {escape(d)}</p>'
        for d in diffs)


def render(runs: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """The HTML page for ``runs`` (label, run) in order; the first is the comparison base."""
    if not runs:
        raise EdgekitError("no run to report")
    title = "edgekit profile report"
    body = [f"<h1>{title}</h1>", '<p class="muted">',
            escape(" · ".join(f"{label}: {r['artifact']} on {r['target']}" for label, r in runs)),
            "</p>", "<h2>Latency</h2>", svg.latency_violins(latency_rows(runs)),
            '<p class="muted">Violin: distribution of per-call latency; box: interquartile '
            "range; black line and band: median and its 95% bootstrap CI; coloured tick: p99."
            "</p>"]
    if len(runs) > 1:
        body += ["<h2>Comparison</h2>", _comparison(runs),
                 '<p class="muted">ratio = median of the later run ÷ median of the first; '
                 "significant when the bootstrap CI excludes 1 and the change is at least 1%."
                 "</p>"]
    body += [_stats_section(label, r) for label, r in runs]
    with_memory = [(label, r) for label, r in runs if r.get("memory")]
    if with_memory:
        body += ['<h2 id="memory">Memory</h2>', *(_memory_section(lb, r) for lb, r in with_memory),
                 '<p class="muted">Peak RSS growth, each engine in a fresh process: load = '
                 "while loading the model, run = over its first calls beyond the loaded size, "
                 "load + run = the peak over both above the process before loading, resident "
                 "after = what stays once the runs are done. Planned workspace: the storages "
                 "the VM's static memory plan allocates per call.</p>"]
    with_ops = [(label, r) for label, r in runs if r.get("per_op")]
    if with_ops:
        body.append("<h2>Per-op time</h2>")
        for i, (label, r) in enumerate(with_ops):
            body += [f"<h3>{escape(label)}</h3>",
                     svg.op_bars(r["per_op"], chart_id=f"per-op-chart-{i}"), _op_table(r)]
    body += ['<h2 id="pass-ledger">Pass ledger</h2>', *(_ledger(lb, r) for lb, r in runs)]
    body += ["<h2>Environment</h2>", _environment(runs)]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width\"><title>{title}</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>\n")


def run_labels(paths: Sequence[Path]) -> list[str]:
    """Short labels for run files: their stems, or their paths when stems repeat."""
    stems = [p.stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    return [str(p) for p in paths]


def write_report(paths: Sequence[str | Path], out: str | Path | None,
                 svg_out: str | Path | None = None) -> list[Path]:
    """Read and check the run files, then write the HTML page and/or the latency chart alone
    (an ``.svg`` file, e.g. for a README). Returns the files written."""
    from edgekit.report.schema import save_text

    paths = [Path(p) for p in paths]
    runs = list(zip(run_labels(paths), (load_run(p) for p in paths), strict=True))
    written = []
    if out is not None:
        written.append(save_text(render(runs), out))
    if svg_out is not None:
        chart = svg.latency_violins(latency_rows(runs))
        written.append(save_text(chart + "\n", svg_out))
    return written
