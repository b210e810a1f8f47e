"""``edgekit run | verify | profile | demo``."""

from __future__ import annotations

from pathlib import Path

import click

from edgekit import api
from edgekit.cli._common import parse_named_arrays, print_json, progress
from edgekit.cli._gate import DURATION, Gate, gate_options
from edgekit.cli._tables import latency_table, per_op_table
from edgekit.errors import EdgekitError


def _parse_lengths(text: str | None) -> list[int]:
    """``8,32,128`` -> [8, 32, 128]; anything else is one ``error:`` line."""
    if not text:
        return []
    try:
        out = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise EdgekitError(f"bad --lengths {text!r}: expected comma-separated integers >= 1, "
                           "e.g. 8,32,128")
    return out


@click.command("run")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--input", "inputs", multiple=True, metavar="NAME=FILE.npy",
              help="An input array (repeatable; none for a model without inputs).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the outputs (.npz).")
@click.option("--stream", is_flag=True,
              help="Step artifact: feed the sequence frame by frame, keeping the state; write "
                   "every frame's output.")
@click.option("--sha256", metavar="DIGEST",
              help="Refuse the artifact unless its digest (edgekit verify) is DIGEST.")
@click.option("--no-range-warnings", "no_range_warnings", is_flag=True,
              help="Do not warn when an input leaves the range the model's approximate "
                   "passes were calibrated on.")
def run_cmd(artifact: Path, inputs: tuple[str, ...], output: Path, stream: bool,
            sha256: str | None, no_range_warnings: bool) -> None:
    """Run an artifact once on inputs from .npy files; write the outputs to an .npz.

    With --stream, ARTIFACT is a step artifact (edgekit export --streaming) and the input is
    a whole sequence (batch, time, ...): it is fed chunk by chunk and the output holds one
    frame per input frame (minus the model's lookahead delay, if any).

    \b
    Example:
      edgekit run cnn.edgekit --input image=x.npy -o out.npz
      edgekit run step.edgekit --stream --input x=seq.npy -o out.npz
      edgekit run gpt.edgekit --input input_ids=ids.npy -o out.npz   (any length in --dim)
    """
    if stream:
        if sha256:
            api.verify_artifact(artifact, sha256)
        outputs, delay = api.run_stream(artifact, parse_named_arrays(inputs))
        if delay:
            click.echo(f"  delay {delay} frame(s): the last {delay} frame(s) need future input")
    else:
        outputs = api.run(artifact, parse_named_arrays(inputs), sha256=sha256,
                          warn_ranges=not no_range_warnings,
                          warn=lambda line: click.echo(f"warning: {line}", err=True))
    api.save_npz(output, outputs)
    for name, arr in outputs.items():
        click.echo(f"  {name}: {arr.dtype} {tuple(arr.shape)}")
    click.echo(f"wrote {output}")


@click.command("verify")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--sha256", metavar="DIGEST", help="Fail unless the artifact's digest is DIGEST.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def verify_cmd(artifact: Path, sha256: str | None, as_json: bool) -> None:
    """Check an artifact without running it and print its digest.

    Checks the manifest's schema, that the directory holds exactly the files the manifest
    lists (no symlinks) with their sha256, and that model.so is a complete shared library for
    the target's machine. The digest is the sha256 of manifest.json, which lists every file's
    sha256: pin it where the artifact is deployed (--sha256 here, on run and profile, or
    edgekit.runtime.load(path, sha256=...)).

    \b
    Example:
      edgekit verify cnn.edgekit
      edgekit verify cnn.edgekit --sha256 3f7c...e1
    """
    result = api.verify_artifact(artifact, sha256)
    if as_json:
        print_json(result)
        return
    click.echo(f"{result['sha256']}  {artifact}")
    click.echo(f"  ok: {len(result['files'])} file(s) match, target {result['target']}",
               err=True)


def _profile_options(fn):
    opts = [
        click.option("--warmup", type=click.IntRange(0), default=10, show_default=True,
                     help="Untimed calls before timing."),
        click.option("--repeat", type=click.IntRange(1), default=100, show_default=True,
                     help="Timed calls (ignored with --duration)."),
        click.option("--duration", type=DURATION,
                     help="Time calls for this many seconds instead of --repeat; 'auto': "
                          "until the median's 95% CI is within ±1% (cap 10 s, auto:CAP)."),
        click.option("--threads", type=click.IntRange(1),
                     help="Threads for every engine (default: all CPUs)."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _engines(compare: str) -> list[str]:
    return [e.strip() for e in compare.split(",") if e.strip()]


@click.command("profile")
@click.argument("artifact", type=click.Path(path_type=Path))
@_profile_options
@click.option("--compare", default="", metavar="ort,torch",
              help="Also time onnxruntime and/or torch (same inputs, threads and process).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--runner", type=click.Choice(["native", "qemu"]),
              help="Time it with edgekit-runner (C++), here or under qemu-user (aarch64).")
@click.option("--tracker", metavar="HOST:PORT", help="Profile on a device of an RPC tracker.")
@click.option("--key", help="Device key on --tracker (see `edgekit devices`).")
@click.option("--per-op", "per_op", is_flag=True,
              help="Also time every kernel and VM builtin and map kernels to ONNX nodes.")
@click.option("--source", metavar="FILE.py:factory",
              help="The torch model for --compare torch (an artifact's own .py source is "
                   "never imported; built-in graphs need no --source).")
@click.option("--sha256", metavar="DIGEST",
              help="Refuse the artifact unless its digest (edgekit verify) is DIGEST.")
@click.option("--input", "input_files", multiple=True, metavar="NAME=FILE.npy",
              help="Time on these arrays (repeatable; default: seeded inputs); a symbolic "
                   "artifact at their lengths.")
@click.option("--lengths", metavar="8,32,128",
              help="Symbolic artifact: time each length of its symbolic dim (seeded inputs), "
                   "every --compare engine at the same lengths.")
@click.option("--no-memory", "no_memory", is_flag=True,
              help="Skip the memory measurement (each engine loaded and run once more, in a "
                   "fresh process, for its peak RSS).")
@gate_options
def profile_cmd(artifact: Path, warmup: int, repeat: int, duration: float | str | None,
                threads: int | None, compare: str, as_json: bool, save: Path | None,
                asserts: tuple[str, ...], baseline: Path | None,
                max_regress: str | None, runner: str | None, tracker: str | None,
                key: str | None, per_op: bool, source: str | None, sha256: str | None,
                input_files: tuple[str, ...], lengths: str | None,
                no_memory: bool) -> None:
    """Measure an artifact's latency on this machine (or a device: --runner, --tracker).

    Prints min/mean/median/p90/p95/p99/max/std/CV and the first-run latency apart;
    --compare adds onnxruntime (ort) and torch (when the source model is known). Then memory:
    the artifact's size, each engine's peak RSS growth to load the model and over its first
    runs (each engine in a fresh process), and the VM's planned workspace.

    \b
    Example:
      edgekit profile cnn.edgekit --compare ort,torch --repeat 200
      edgekit profile net.edgekit --compare torch --source net.py:make
      edgekit profile cnn.edgekit --duration auto --save run.json --assert "p99<20ms"
      edgekit profile cnn.edgekit --baseline run.json --max-regress 5%
      edgekit profile cnn-rpi4.edgekit --runner qemu
      edgekit profile cnn.edgekit --per-op
      edgekit profile cnn-rpi4.edgekit --tracker 127.0.0.1:9190 --key rpi4
      edgekit profile gpt.edgekit --lengths 8,32,128 --compare ort
      edgekit profile gpt.edgekit --input input_ids=ids.npy
    """
    gate = Gate(save, asserts, baseline, max_regress)
    gate.check_inputs()
    if per_op and (runner or tracker):
        raise EdgekitError("--per-op times kernels in this process; it cannot be "
                           "combined with --runner or --tracker")
    with progress(not as_json) as step:
        step("profiling")
        result = api.profile(artifact, warmup=warmup, repeat=repeat, duration=duration,
                             compare=_engines(compare), threads=threads, runner=runner,
                             tracker=tracker, key=key, source=source, sha256=sha256,
                             memory=not no_memory, lengths=_parse_lengths(lengths),
                             inputs=parse_named_arrays(input_files) if input_files else None)
        if per_op:
            step("per-op profiling")
            result.update(api.per_op(artifact, threads, min(warmup, 5), min(repeat, 50)))
    if as_json:
        print_json(result)
    else:
        latency_table(result)
        if result.get("lengths"):
            _lengths_text(result["lengths"])
        if result.get("memory"):
            _memory_text(result["memory"])
        if per_op:
            per_op_table(result)
    gate.finish(result, quiet=as_json)


def _lengths_text(rows: list[dict]) -> None:
    """One line per length: medians of edgekit and each baseline, and edgekit's ratio."""
    click.echo("latency per length (median):")
    for row in rows:
        where = ", ".join(f"{k}={v}" for k, v in row["lengths"].items())
        others = "".join(f", {k} {s['median']:.3f} ms (edgekit ÷ {k} {row['ratios'][k]:.2f})"
                         for k, s in row["baselines"].items())
        click.echo(f"  {where}: edgekit {row['latency_ms']['median']:.3f} ms{others}")


def _memory_text(memory: dict) -> None:
    """The run's memory object as lines: artifact size, RSS growth per engine, workspace."""
    def mib(n: int) -> str:
        return f"{n / 2**20:.1f} MiB"

    art, ws = memory["artifact"], memory["planned_workspace"]
    click.echo(f"memory: artifact {mib(art['total_bytes'])} (library "
               f"{mib(art['library_bytes'])}); VM planned workspace "
               + ("not measured" if ws is None else f"{mib(ws['bytes'])} in {ws['storages']} "
                  "storage(s)"))
    edgekit = memory["engines"].get("edgekit", {}).get("total_bytes")
    for engine, m in memory["engines"].items():
        ratio = (f", edgekit ÷ {engine} {edgekit / m['total_bytes']:.2f}"
                 if engine != "edgekit" and edgekit is not None and m["total_bytes"] > 0 else "")
        click.echo(f"  {engine:<8} peak RSS growth: load {mib(m['load_bytes'])}, first "
                   f"{m['runs']} runs {mib(m['run_bytes'])}, load + run "
                   f"{mib(m['total_bytes'])} (resident after: {mib(m['resident_bytes'])})"
                   f"{ratio}")


@click.command("demo")
@click.option("--model", default=None, help="Built-in graph (default: the demo default).")
@click.option("-t", "--target", default="host", show_default=True, help="Target to compile for.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("edgekit-demo"), show_default=True, help="Output directory.")
@_profile_options
def demo_cmd(model: str | None, target: str, out: Path, warmup: int, repeat: int,
             duration: float | None, threads: int | None) -> None:
    """Export -> compile -> verify -> profile the default built-in model, end to end.

    Writes OUT/MODEL.onnx, OUT/MODEL.edgekit and OUT/report.json, and prints the latency
    table with ratios to onnxruntime and torch.

    \b
    Example:
      edgekit demo
    """
    with progress() as step:
        result = api.demo(model, target, out, warmup, repeat, duration, threads, progress=step,
                          stage=lambda line: click.echo(line, err=True))
    latency_table(result.report["profile"])
    click.echo(f"report: {result.report_path}")


COMMANDS = (run_cmd, verify_cmd, profile_cmd, demo_cmd)
