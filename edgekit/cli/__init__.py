"""``edgekit`` command line: argument handling and printing only; work happens in edgekit.api.

Exit codes: 0 success, 1 failure (one ``error: ...`` line; ``--debug`` shows the traceback),
2 usage error (click's own).
"""

from __future__ import annotations

import sys

import click

from edgekit import __version__
from edgekit.cli import (
    commands,
    devices_cmd,
    he_cmd,
    passes_cmd,
    report_cmd,
    run_cmd,
    tune_cmd,
)
from edgekit.errors import EdgekitError, first_line


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except EdgekitError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            ctx.exit(130)
        except Exception as exc:  # a bug: say so in one line unless --debug
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: internal error ({type(exc).__name__}: "
                       f"{first_line(exc)}); rerun with --debug for the traceback",
                       err=True)
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"],
                                           "auto_envvar_prefix": "EDGEKIT"})
@click.version_option(__version__, prog_name="edgekit")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """edgekit: PyTorch/ONNX -> rewrites -> TVM -> artifact and latency profile.

    \b
    Example:
      edgekit demo
      edgekit export mobile-cnn -o m.onnx
      edgekit compile m.onnx --target host -o m.edgekit
      edgekit profile m.edgekit --compare ort,torch
    """
    ctx.ensure_object(dict)["debug"] = debug


for command in (*commands.COMMANDS, *passes_cmd.COMMANDS, *run_cmd.COMMANDS,
                *report_cmd.COMMANDS, *devices_cmd.COMMANDS, *he_cmd.COMMANDS,
                *tune_cmd.COMMANDS):
    cli.add_command(command)


def main() -> None:
    cli.main(prog_name="edgekit")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
