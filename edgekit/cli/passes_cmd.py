"""``edgekit passes | rewrite``."""

from __future__ import annotations

from pathlib import Path

import click

from edgekit import api
from edgekit.cli._common import input_option, input_specs, print_json, progress
from edgekit.errors import EdgekitError


@click.command("passes")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def passes_cmd(as_json: bool) -> None:
    """List the rewrite passes, exact or approximate, with their parameters.

    \b
    Example:
      edgekit passes
    """
    items = api.list_passes().values()
    if as_json:
        print_json([{"name": p.name, "summary": p.summary, "exact": p.exact,
                     "budget": None if p.exact else p.budget, "params": dict(p.params)}
                    for p in items])
        return
    for p in items:
        kind = "exact" if p.exact else f"approximate (budget {p.budget:g})"
        params = ", ".join(f"{k}={v}" for k, v in p.params.items())
        click.echo(f"{p.name:<22} {kind:<28} {p.summary}" + (f" [{params}]" if params else ""))


def _print_ledger(ledger: list[dict], explain: bool) -> None:
    for run in ledger:
        changed = ", ".join(f"{k}×{v}" for k, v in run["changed"].items()) or "no change"
        err = "" if run["max_rel_error"] is None else f", max rel error {run['max_rel_error']:.2g}"
        fitted = {"seeded": ", fitted on seeded inputs (widened ranges)",
                  "samples": ", fitted on the calibration samples"}.get(run["calibration"], "")
        click.echo(f"{run['pass']}: {run['status']} ({changed}{err}{fitted})")
        before, after = run.get("flops_before"), run.get("flops_after")
        if before and after is not None and after != before:
            click.echo(f"    FLOPs {before:,} -> {after:,} ({after / before:.1%})")
        if run["message"]:
            click.echo(f"    {run['message']}")
        skipped = run["skipped"]
        if skipped and not explain:
            click.echo(f"    {len(skipped)} candidate(s) skipped; --explain shows why")
        if explain:
            for s in skipped:
                click.echo(f"    skipped {s['node']}: {s['reason']}")
            _print_locator(run["details"])


def _num(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _print_locator(details: dict) -> None:
    """quantize-int8's accuracy locator: one row per node, largest error share first."""
    rows = details.get("locator")
    if not rows:
        return
    cos = details.get("cosine", {})
    if cos:
        click.echo(f"    cosine vs float on {cos['samples']} calibration samples: "
                   f"mean {cos['mean']:.5f}, min {cos['min']:.5f}")
    click.echo(f"    {'node':<36} {'op':<7} {'prec':<5} {'share':>6} {'act scale':>10} "
               f"{'zp':>4} {'act dB':>7} {'w scale min..max':>19} {'w dB':>6}")
    for r in rows:
        w = (f"{r['weight_scale_min']:.2e}..{r['weight_scale_max']:.2e}"
             if r.get("weight_scale_min") is not None else "-")
        click.echo(f"    {r['node'][-36:]:<36} {r['op']:<7} {r['precision']:<5} "
                   f"{r['error_share']:>6.1%} {_num(r['act_scale'], '.3g'):>10} "
                   f"{_num(r['act_zero_point'], 'd'):>4} {_num(r['act_sqnr_db'], '.1f'):>7} "
                   f"{w:>19} {_num(r.get('weight_sqnr_db'), '.1f'):>6}")
    for node, why in details.get("float_nodes", {}).items():
        click.echo(f"    float {node}: {why}")


@click.command("rewrite")
@click.argument("onnx_file", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--passes", required=True, help="Comma-separated passes, e.g. fold-bn,"
              "poly-softmax:degree=64 (see edgekit passes).")
@click.option("--calibration", type=click.Path(dir_okay=False, path_type=Path),
              help=".npz of model inputs (optionally with a leading sample axis); the "
              "polynomial passes fit their ranges to it and are refused without it.")
@click.option("--seeded-calibration", is_flag=True, help="Let the polynomial passes fit seeded "
              "inputs instead (ranges widened; only for models whose real inputs are N(0, 1)).")
@input_option
@click.option("--explain", is_flag=True, help="Print every skipped candidate with its reason.")
@click.option("--strict", is_flag=True, help="Exit 1, writing nothing, when a pass is refused "
              "or rolled back.")
@click.option("--json", "as_json", is_flag=True, help="Print the report and ledger as JSON.")
def rewrite_cmd(onnx_file: Path, output: Path, passes: str, calibration: Path | None,
                seeded_calibration: bool, inputs: tuple[str, ...], explain: bool, strict: bool,
                as_json: bool) -> None:
    """Apply rewrite passes to an ONNX model, each checked with onnxruntime.

    A pass whose result differs from its input beyond its budget (1e-5 relative for exact
    passes) is rolled back and reported; with --strict that is an error. The polynomial
    passes need --calibration real inputs (or --seeded-calibration).

    \b
    Example:
      edgekit rewrite gpt.onnx -o gpt-rms.onnx --passes ln-to-rmsnorm --explain
    """
    if calibration and seeded_calibration:
        raise EdgekitError("give --calibration or --seeded-calibration, not both")
    calib = "seeded" if seeded_calibration else calibration
    with progress(not as_json) as step:
        result = api.rewrite(onnx_file, passes, input_specs(inputs), calib, step, output,
                             strict)
    ledger = result.ledger_dicts()
    if as_json:
        print_json({"input": str(onnx_file), "output": str(output),
                    "ops_before": result.ops_before, "ops_after": result.ops_after,
                    "flops_before": result.flops_before, "flops_after": result.flops_after,
                    "ledger": ledger})
        return
    _print_ledger(ledger, explain)
    click.echo(f"wrote {output}")


COMMANDS = (passes_cmd, rewrite_cmd)
