"""Shared CLI pieces: input-spec options, progress display, JSON printing, NAME=FILE.npy inputs."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any

import click

from edgekit import api

_DIMS = "edgekit.dims"  # where --dim leaves its texts in the click context, for input_specs


def input_specs(values: tuple[str, ...]) -> api.InputSpecs:
    """The ``--input`` texts with the command's ``--dim`` bounds (see ``input_option``)."""
    ctx = click.get_current_context(silent=True)
    return api.parse_inputs(values, ctx.meta.get(_DIMS, ()) if ctx else ())


def _keep_dims(ctx: click.Context, _param: click.Parameter, value: tuple[str, ...]) -> None:
    ctx.meta[_DIMS] = value


_input = click.option(
    "--input", "inputs", multiple=True, metavar="NAME:1x3x224x224[:DTYPE]",
    help="Input name and shape (repeatable); a dim written as a name is symbolic "
         "(ids:1xseq:int64), bounded with --dim. The dtype defaults to the model's own "
         "(float32 for a PyTorch model that declares none).")
# not a parameter of the command: every command with --input takes it, and input_specs reads it
_dim = click.option(
    "--dim", "dims", multiple=True, metavar="NAME=LO..HI", expose_value=False,
    callback=_keep_dims,
    help="Bounds of a symbolic dim (repeatable), e.g. seq=1..256: one model serves every "
         "length inside them. An ONNX file's own named dims need one too, unless edgekit "
         "recorded them when it wrote the file.")


def input_option(fn):
    """``--input`` and ``--dim`` (read back by ``input_specs``)."""
    return _input(_dim(fn))
tolerance_options = [
    click.option("--atol", type=float, default=1e-4, show_default=True,
                 help="Absolute tolerance of the numerical check."),
    click.option("--rtol", type=float, default=1e-4, show_default=True,
                 help="Tolerance relative to the largest reference value."),
]


def with_tolerances(fn):
    for opt in reversed(tolerance_options):
        fn = opt(fn)
    return fn


@contextlib.contextmanager
def progress(enabled: bool = True) -> Iterator[Callable[[str], None]]:
    """A status line on a terminal (stderr); silent when not interactive or disabled."""
    if not (enabled and sys.stderr.isatty()):
        yield lambda _msg: None
        return
    from rich.console import Console

    console = Console(stderr=True)
    with console.status("starting") as status:
        yield lambda msg: status.update(msg)


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def parse_named_arrays(values: tuple[str, ...]) -> dict:
    """``name=path.npy`` pairs -> arrays (headers checked, loaded without pickle)."""
    out = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"{v!r}: expected NAME=FILE.npy", param_hint="--input")
        out[name] = api.load_npy(path)
    return out
