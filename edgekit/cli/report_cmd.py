"""``edgekit report | compare``, and the profile command's ``--save``/``--assert``/
``--baseline`` handling (``Gate``) and ``--duration SECONDS|auto`` type."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from edgekit.cli._common import print_json
from edgekit.errors import EdgekitError


class DurationType(click.ParamType):
    """Seconds (> 0), ``auto`` or ``auto:CAP_SECONDS``."""

    name = "SECONDS|auto"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None):
        from edgekit.report.record import parse_duration

        try:
            return parse_duration(value)
        except EdgekitError as exc:
            self.fail(str(exc).split(": ", 1)[-1], param, ctx)


DURATION = DurationType()


def _percent(value: str | None) -> float | None:
    from edgekit.report.compare import parse_percent

    return None if value is None else parse_percent(value)


@dataclass
class Gate:
    """What ``profile`` checks after measuring: ``--save``, ``--assert``, ``--baseline``."""

    save: Path | None = None
    asserts: tuple[str, ...] = ()
    baseline: Path | None = None
    max_regress: str | None = None
    _baseline_run: dict[str, Any] | None = field(default=None, repr=False)

    def check_inputs(self) -> None:
        """Fail before any timing on a malformed assertion or an unreadable baseline."""
        from edgekit.report.compare import parse_assertion
        from edgekit.report.schema import load_run

        for a in self.asserts:
            parse_assertion(a)
        if self.max_regress is not None and self.baseline is None:
            raise click.UsageError("--max-regress needs --baseline")
        _percent(self.max_regress)
        if self.baseline is not None:
            self._baseline_run = load_run(self.baseline)

    def finish(self, result: dict[str, Any], quiet: bool) -> None:
        """Save the run, then evaluate the checks; raise one ``error:`` line on violation."""
        from edgekit.report.compare import check_assertion, check_regression
        from edgekit.report.schema import save_run

        if self.save is not None:
            save_run(result, self.save)
            if not quiet:
                click.echo(f"saved {self.save}")
        failures = [m for a in self.asserts if (m := check_assertion(result, a))]
        if self._baseline_run is not None:
            limit = _percent(self.max_regress)
            comparison, failure = check_regression(result, self._baseline_run,
                                                   0.05 if limit is None else limit)
            if not quiet:
                click.echo(f"vs baseline {self.baseline}: {comparison.line()}")
            if failure:
                failures.append(failure)
        if failures:
            raise EdgekitError("; ".join(failures))


def gate_options(fn):
    opts = [
        click.option("--save", type=click.Path(dir_okay=False, path_type=Path),
                     help="Write the run (schema in docs/profile-schema.md) to this JSON file."),
        click.option("--assert", "asserts", multiple=True, metavar="STAT<VALUE",
                     help="Fail (exit 1) unless it holds, e.g. 'p99<20ms', 'cv<5%', "
                          "'ratio.ort<1.0' (repeatable)."),
        click.option("--baseline", type=click.Path(dir_okay=False, path_type=Path),
                     help="A saved run to compare against (fails on a significant regression)."),
        click.option("--max-regress", metavar="PERCENT",
                     help="Allowed median slowdown against --baseline (default 5%)."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


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
    from edgekit.report.html import write_report

    if output is None and svg_out is None:
        raise click.UsageError("give -o REPORT.html and/or --svg CHART.svg")
    for path in write_report(runs, output, svg_out):
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
    from edgekit.report.compare import check_regression, compare_runs, environment_differences
    from edgekit.report.schema import load_run

    a, b = load_run(old), load_run(new)
    rows = compare_runs(a, b, min_effect=_percent(min_effect) or 0.0)
    diffs = environment_differences(a, b)
    failure = None
    if max_regress is not None:
        _, failure = check_regression(b, a, _percent(max_regress) or 0.0)
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
