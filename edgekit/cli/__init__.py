"""``edgekit`` command line: argument handling and printing only; work happens in edgekit.api.

Exit codes: 0 success, 1 failure (one ``error: ...`` line; ``--debug`` shows the traceback),
2 usage error (click's own).
"""

from __future__ import annotations

import signal
import sys

import click

from edgekit import __version__, api
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
        except KeyboardInterrupt as exc:  # SIGINT, or SIGTERM/SIGHUP via _terminated
            # An object the interrupt caught half-built can fail in its __del__ later (TVM's
            # TempDirectory without its temp_dir): noise after the one error line, not news.
            sys.unraisablehook = lambda _unraisable: None
            click.echo(f"error: {getattr(exc, 'why', 'interrupted')}", err=True)
            ctx.exit(128 + getattr(exc, "signum", signal.SIGINT))
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


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a CI cancel, ``docker stop``, ``timeout``) or SIGHUP, raised where Python runs
    next, so that every ``finally`` and atexit hook (staging directories, TVM's temp
    directories) cleans up exactly as for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.why = f"interrupted by {signal.Signals(signum).name}"


def _terminated(signum: int, _frame: object) -> None:
    raise _Terminated(signum)


def main() -> None:
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is signal.SIG_DFL:  # leave a parent's SIG_IGN (nohup) alone
            signal.signal(sig, _terminated)
    with api.private_tempdir():  # TVM's temporary files go, however the command ends
        cli.main(prog_name="edgekit")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
