"""``edgekit report | compare``: saved profile runs as an HTML page, or A/B."""

from __future__ import annotations

from pathlib import Path

import click

from edgekit import api
from edgekit.cli._common import print_json
from edgekit.cli._gate import percent
from edgekit.errors import EdgekitError


@click.command("report")
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="The HTML report to write.")
@click.option("--svg", "svg_out", type=click.Path(dir_okay=False, path_type=Path),
              help="Also (or only) write the latency chart as a standalone .svg.")
def report_cmd(runs: tuple[Path, ...], output: Path | None, svg_out: Path | None) -> None:
    """Write a self-contained HTML report of one or more saved profile runs.

    Latency violins per engine with the median's 95% CI, per-op bars (when the run has
    per-op rows), the pass ledger, the environment; with several runs, each one compared
    with the first. The page loads nothing from the network.

    \b
    Example:
      edgekit profile m.edgekit --compare ort,torch --save run.json
      edgekit report run.json -o report.html
      edgekit report before.json after.json -o ab.html --svg ab.svg
    """
    if output is None and svg_out is None:
        raise click.UsageError("give -o REPORT.html and/or --svg CHART.svg")
    for path in api.write_report(runs, output, svg_out):
        click.echo(f"wrote {path}")


@click.command("compare")
@click.argument("old", type=click.Path(path_type=Path))
@click.argument("new", type=click.Path(path_type=Path))
@click.option("--min-effect", default="1%", show_default=True, metavar="PERCENT",
              help="Smallest change reported as significant.")
@click.option("--max-regress", metavar="PERCENT",
              help="Exit 1 when NEW's edgekit median is significantly more than this slower.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def compare_cmd(old: Path, new: Path, min_effect: str, max_regress: str | None,
                as_json: bool) -> None:
    """Compare two saved runs: median ratio NEW/OLD per engine with a bootstrap 95% CI.

    A difference is significant when the CI excludes 1 and it is at least --min-effect.

    \b
    Example:
      edgekit compare before.json after.json
      edgekit compare main.json branch.json --max-regress 5%
    """
    a, b = api.load_run(old), api.load_run(new)
    rows = api.compare_runs(a, b, min_effect=percent(min_effect) or 0.0)
    diffs = api.environment_differences(a, b)
    failure = None
    if max_regress is not None:
        _, failure = api.check_regression(b, a, percent(max_regress) or 0.0)
    if as_json:
        print_json({"old": str(old), "new": str(new), "engines": [c.to_dict() for c in rows],
                    "environment_differences": diffs, "regression": failure})
    else:
        for c in rows:
            click.echo(c.line())
        for d in diffs:
            click.echo(f"note: environment differs: {d}")
    if failure:
        raise EdgekitError(failure)


COMMANDS = (report_cmd, compare_cmd)
