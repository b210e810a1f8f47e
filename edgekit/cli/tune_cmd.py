"""``edgekit tune`` and the tuning options ``edgekit compile`` shares."""

from __future__ import annotations

from pathlib import Path

import click

from edgekit import api
from edgekit.cli._common import input_option, input_specs, print_json, progress

budget_options = [
    click.option("--trials", type=click.IntRange(1), default=None,
                 help="Tuning budget: measured candidates in all (default 64 per kernel)."),
    click.option("--tune-minutes", type=click.FloatRange(0, min_open=True), default=None,
                 help="Tuning budget in wall-clock minutes (with --trials: whichever ends "
                      "first)."),
    click.option("--tuning-db", type=click.Path(file_okay=False, path_type=Path), default=None,
                 help="Tuning database directory (default: ~/.cache/edgekit/tuning/"
                      "<target hash>/, or $EDGEKIT_TUNING_DB/<target hash>/)."),
]


def with_budget(fn):
    for opt in reversed(budget_options):
        fn = opt(fn)
    return fn


def with_tuning(fn):
    """``--tune`` plus the budget options (for ``edgekit compile``)."""
    fn = with_budget(fn)
    return click.option("--tune", is_flag=True,
                        help="Tune the kernels with MetaSchedule on this machine first "
                             "(records are kept and reused by later compiles).")(fn)


@click.command("tune")
@click.argument("onnx_file", type=click.Path(path_type=Path), required=False)
@click.option("-t", "--target", default="host", show_default=True,
              help="Target name, .toml file or inline JSON (must run on this machine).")
@input_option
@with_budget
@click.option("--repair", is_flag=True,
              help="Rewrite the tuning database without its torn or foreign lines (no "
                   "tuning, no ONNX_FILE).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def tune_cmd(onnx_file: Path | None, target: str, inputs: tuple[str, ...], trials: int | None,
             tune_minutes: float | None, tuning_db: Path | None, repair: bool,
             as_json: bool) -> None:
    """Tune an ONNX model's kernels into the tuning database; write no artifact.

    Later `edgekit compile` runs for the same target apply the records to every model that
    shares a kernel (same op, shapes and dtypes), with or without --tune.

    \b
    Example:
      edgekit tune cnn.onnx --target host --trials 200
      edgekit tune cnn.onnx --tune-minutes 10 --tuning-db ./tuning
      edgekit tune --repair --tuning-db ./tuning
    """
    if repair:
        if onnx_file is not None:
            raise click.UsageError("--repair takes no ONNX_FILE")
        fixed = api.repair_tuning_db(target, tuning_db)
        if as_json:
            print_json(fixed)
            return
        click.echo(f"removed {len(fixed['removed'])} bad line(s) from {fixed['db']}; "
                   f"{fixed['records']} record(s) of {fixed['workloads']} kernel(s) kept")
        for line in fixed["removed"]:
            click.echo(f"  {line}")
        return
    if onnx_file is None:
        raise click.UsageError("missing ONNX_FILE (or --repair)")
    with progress(not as_json) as step:
        result = api.tune(onnx_file, target, input_specs(inputs), trials, tune_minutes,
                          tuning_db, step)
    if as_json:
        print_json(result)
        return
    click.echo(f"  {result['tasks_tuned']} of {result['tasks']} kernel(s) got measured "
               f"candidates, {result['trials']} trials in {result['seconds']:.0f} s "
               f"({result['cost_model']} cost model)")
    if result["tasks_tuned"] < result["tasks"]:
        click.echo("  the others keep edgekit's default schedules (a larger --trials or "
                   "--tune-minutes reaches them)")
    click.echo(f"  {result['kernels_with_records']} of {result['kernels']} kernels now use a "
               "tuned record")
    if result.get("records_rejected"):
        click.echo(f"  {result['records_rejected']} record(s) lost to the default schedule in "
                   "an alternating timing check and are not used")
    if result.get("records_skipped"):
        click.echo(f"  {len(result['records_skipped'])} bad database line(s) skipped; "
                   f"`edgekit tune --repair --tuning-db {result['db']}` removes them")
    click.echo(f"database: {result['db']}")


COMMANDS = (tune_cmd,)
