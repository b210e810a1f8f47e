"""``edgekit tracker | serve-device | devices | runner``: the device farm and the C++ runner."""

from __future__ import annotations

from pathlib import Path

import click

from edgekit import api
from edgekit.cli._common import print_json


def _announce(message: str) -> None:
    click.echo(message)
    click.echo("press Ctrl-C to stop", err=True)


def _warn(message: str) -> None:
    click.echo(f"warning: {message}", err=True)


_secret = click.option(
    "--secret", envvar="EDGEKIT_FARM_SECRET", show_envvar=True,
    help="Farm secret the tracker and devices check before listing, leasing or running "
         "anything (prefer the environment variable: arguments show in `ps`).")


@click.command("tracker")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind (0.0.0.0 to accept devices from other machines).")
@click.option("--port", type=click.IntRange(1, 65535), default=9190, show_default=True,
              help="First port to try; the next 10 are tried if it is taken.")
@_secret
def tracker_cmd(host: str, port: int, secret: str | None) -> None:
    """Run TVM's RPC tracker: devices register with it, profiles request them by key.

    \b
    Example:
      edgekit tracker --port 9190
    """
    api.serve_tracker(host, port, announce=_announce, secret=secret, warn=_warn)


@click.command("serve-device")
@click.option("--key", required=True, help="Device key clients ask for (e.g. rpi4).")
@click.option("--tracker", "tracker", default="127.0.0.1:9190", show_default=True,
              metavar="HOST:PORT", help="Tracker to register with.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind (0.0.0.0 when the tracker's clients are elsewhere).")
@click.option("--port", type=click.IntRange(1, 65535), default=9090, show_default=True,
              help="First port to try; the next 10 are tried if it is taken.")
@_secret
def serve_device_cmd(key: str, tracker: str, host: str, port: int, secret: str | None) -> None:
    """Serve this machine as a device (TVM's RPC server) registered under KEY.

    It runs code that clients upload: bind a non-loopback --host only on a trusted network,
    and give the farm a secret (EDGEKIT_FARM_SECRET) so that clients without it are refused.

    \b
    Example:
      edgekit serve-device --key rpi4 --tracker 192.168.1.10:9190 --host 0.0.0.0
    """
    api.serve_device(key, tracker, host, port, announce=_announce, secret=secret, warn=_warn)


@click.command("devices")
@click.option("--tracker", "tracker", default="127.0.0.1:9190", show_default=True,
              metavar="HOST:PORT", help="Tracker to ask.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_secret
def devices_cmd(tracker: str, as_json: bool, secret: str | None) -> None:
    """List the devices registered with a tracker, by key.

    \b
    Example:
      edgekit devices --tracker 127.0.0.1:9190
    """
    rows = api.list_devices(tracker, secret)
    if as_json:
        print_json(rows)
        return
    if not rows:
        click.echo(f"no devices registered with {tracker}")
        return
    click.echo(f"{'key':<20} {'free':>5} {'pending':>8} {'total':>6}  addresses")
    for r in rows:
        click.echo(f"{r['key']:<20} {r['free']:>5} {r['pending']:>8} {r['total']:>6}  "
                   f"{', '.join(r['addresses'])}")


@click.command("build-runner")
@click.option("--arch", type=click.Choice(["host", "aarch64"]), default="host",
              show_default=True, help="CPU to build for (aarch64 uses the cross toolchain).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Copy the binary here (default: just print the cached path).")
def build_runner_cmd(arch: str, output: Path | None) -> None:
    """Build edgekit-runner, the C++ benchmark binary that runs artifacts on a device.

    For aarch64 it links the aarch64 TVM runtime from PyPI's wheels (fetched once into
    ~/.cache/edgekit); copy the binary and the two libraries it prints to the device.

    \b
    Example:
      edgekit build-runner --arch aarch64 -o edgekit-runner
    """
    built = api.build_runner(arch, output)
    click.echo(f"runner: {built.binary}")
    for lib in built.libraries:
        click.echo(f"needs:  {lib}")


COMMANDS = (tracker_cmd, serve_device_cmd, devices_cmd, build_runner_cmd)
