"""The profile command's ``--save``/``--assert``/``--baseline`` handling (``Gate``) and the
``--duration SECONDS|auto`` type, shared by ``profile`` and ``demo``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from edgekit import api
from edgekit.errors import EdgekitError


class DurationType(click.ParamType):
    """Seconds (> 0), ``auto`` or ``auto:CAP_SECONDS``."""

    name = "SECONDS|auto"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None):
        try:
            return api.parse_duration(value)
        except EdgekitError as exc:
            self.fail(str(exc).split(": ", 1)[-1], param, ctx)


DURATION = DurationType()


def percent(value: str | None) -> float | None:
    return None if value is None else api.parse_percent(value)


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
        for a in self.asserts:
            api.parse_assertion(a)
        if self.max_regress is not None and self.baseline is None:
            raise click.UsageError("--max-regress needs --baseline")
        percent(self.max_regress)
        if self.baseline is not None:
            self._baseline_run = api.load_run(self.baseline)

    def finish(self, result: dict[str, Any], quiet: bool) -> None:
        """Save the run, then evaluate the checks; raise one ``error:`` line on violation."""
        if self.save is not None:
            api.save_run(result, self.save)
            if not quiet:
                click.echo(f"saved {self.save}")
        failures = [m for a in self.asserts if (m := api.check_assertion(result, a))]
        if self._baseline_run is not None:
            limit = percent(self.max_regress)
            comparison, failure = api.check_regression(result, self._baseline_run,
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
