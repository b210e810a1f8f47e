"""``edgekit he-check | he-run``: HE-friendliness, multiplicative depth, encrypted runs."""

from __future__ import annotations

from pathlib import Path

import click

from edgekit import api
from edgekit.cli._common import parse_named_arrays, print_json

_cut_option = click.option(
    "--cut-embeddings", "cut_embeddings", is_flag=True,
    help="The model starts at token ids (a standard transformers export): move its embedding "
         "lookup to the client, so the server's graph starts at the embeddings (checked "
         "against the original first).")


def _echo_cut(cut: dict | None) -> None:
    if cut:
        rows, width = cut["table_shape"]
        click.echo(f"cut: {cut['ids']} -> {cut['embeds']} (the client looks up a {rows}x"
                   f"{width} table; matches the original within {cut['max_rel']:.1e})")


_plain_option = click.option(
    "--plain", "plain", multiple=True, metavar="INPUT",
    help="An input the server may see in the clear (e.g. a mask or lengths); repeatable.")


@click.command("he-check")
@click.argument("onnx_file", type=click.Path(path_type=Path))
@_plain_option
@_cut_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON (with per-tensor depths).")
def he_check_cmd(onnx_file: Path, plain: tuple[str, ...], cut_embeddings: bool,
                 as_json: bool) -> None:
    """Check that only HE-evaluable ops touch encrypted data; report degree and depth.

    Exits 1 when some node is not HE-evaluable (each is named with the reason).

    \b
    Example:
      edgekit rewrite m.onnx -o m-poly.onnx --passes poly-layernorm,poly-gelu,poly-softmax
      edgekit he-check m-poly.onnx --json
    """
    report = api.he_check(onnx_file, plain, cut_embeddings)
    if as_json:
        print_json(report.to_dict())
    else:
        _echo_cut(report.cut)
        for o in report.offenders:
            click.echo(f"offender {o.node} ({o.op}): {o.reason}")
        for name, info in report.outputs.items():
            click.echo(f"output {name}: degree {info.degree}, depth {info.depth}")
        verdict = "HE-friendly" if report.he_friendly else (
            f"not HE-friendly: {len(report.offenders)} offending node(s)")
        click.echo(f"{verdict}; multiplicative depth {report.depth}")
    if not report.he_friendly:
        raise click.exceptions.Exit(1)


@click.command("he-run")
@click.argument("onnx_file", type=click.Path(path_type=Path))
@click.option("--input", "inputs", multiple=True, metavar="NAME=FILE.npy", required=True,
              help="Input array (repeatable).")
@_plain_option
@click.option("--scale-bits", type=click.IntRange(20, 60), default=None,
              help="CKKS scale (bits of each rescaling prime); default 40, or fewer (≥ 30) "
                   "when the depth needs more levels than 40-bit primes allow.")
@click.option("--packed", is_flag=True,
              help="Put the token axis (-2) of the inputs in the slots (transformer blocks: "
                   "attention with QKᵀ and AV); default: one ciphertext per element.")
@click.option("--trace", is_flag=True,
              help="Decrypt every intermediate ciphertext and print its error against the "
                   "plaintext onnxruntime run (debugging; the client sees everything).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the decrypted outputs to this .npz.")
@_cut_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def he_run_cmd(onnx_file: Path, inputs: tuple[str, ...], plain: tuple[str, ...],
               scale_bits: int | None, packed: bool, trace: bool, output: Path | None,
               cut_embeddings: bool, as_json: bool) -> None:
    """Run an HE-friendly model under CKKS (TenSEAL) and compare with onnxruntime.

    The inputs are encrypted (client), the graph is evaluated on ciphertexts with plaintext
    weights (server), the outputs are decrypted (client). Parameters follow from he-check's
    depth.

    \b
    Example:
      edgekit he-run mlp.onnx --input x=x.npy
      edgekit he-run attention-poly.onnx --input x=x.npy --packed --trace
    """
    result = api.he_run(onnx_file, parse_named_arrays(inputs), plain, scale_bits, packed, trace,
                        cut_embeddings)
    if output is not None:
        api.save_npz(output, result.outputs)
    if as_json:
        print_json(result.to_dict())
        return
    _echo_cut(result.cut)
    for row in result.trace or []:
        click.echo(f"trace {row.name:<28} {row.op:<10} {row.layout:<7} levels left "
                   f"{row.levels_left:>2}  rel err {row.rel_error:.2e}  max abs {row.max_abs:.2e}")
    p = result.params
    click.echo(f"CKKS ring degree {p.ring_degree}, modulus {p.coeff_mod_bit_sizes} "
               f"(depth {result.depth}, {result.packing} packing)")
    click.echo("time: " + ", ".join(f"{k} {v:.3f}s" for k, v in result.seconds.items()))
    for n, e in result.relative_error.items():
        click.echo(f"{n}: relative error vs onnxruntime {e:.2e}")
    if output is not None:
        click.echo(f"wrote {output}")


COMMANDS = (he_check_cmd, he_run_cmd)
