"""Shared CLI pieces: input-spec options, progress display, JSON printing, NAME=FILE.npy inputs."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any

import click

from edgekit import api


def input_specs(values: tuple[str, ...]) -> list[api.TensorSpec]:
    return [api.parse_input_spec(v) for v in values]


input_option = click.option(
    "--input", "inputs", multiple=True, metavar="NAME:1x3x224x224[:DTYPE]",
    help="Input name and static shape (repeatable); dtype defaults to the model's own "
         "(float32 for a PyTorch model that declares none).")
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
