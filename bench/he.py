"""Encrypted-inference benchmark: polynomial MiniLM accuracy and depth, and CKKS timings.

    python bench/he.py [--sentences 200] [--calibration 32]

1. all-MiniLM-L6-v2 (real weights, offline) exported from the word embeddings to the mean-
   pooled sentence embedding; poly-layernorm, poly-gelu, poly-softmax applied in turn, each
   calibrated on ``--calibration`` real sentences and checked by the rewrite layer; after each
   pass: the checker's depth and the cosine (mean, min) of the sentence embeddings against the
   original graph on ``--sentences`` other real sentences (onnxruntime, plaintext).
2. CKKS (SEAL through TenSEAL): a polynomial MLP encrypted end to end; error against
   onnxruntime, time, and the parameters chosen from the checker's depth.
3. CKKS, token-packed: one attention block (seq 8, width 32, 2 heads, residual; seeded
   weights, poly-softmax calibrated on 16 seeded inputs) encrypted end to end; error against
   onnxruntime on the same polynomial graph and on the original block, time, parameters.
   The block, the polynomial block and the input are written to ``--out`` with the
   equivalent ``edgekit he-run`` command.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def minilm(n_eval: int, n_calib: int, passes: list[str]) -> None:
    import onnx

    from edgekit.he import minilm
    from edgekit.he.check import check
    from edgekit.he.text import sentences
    from edgekit.passes import available
    from edgekit.passes.core import parse_pass_list, run_pass
    from edgekit.verify import ort_session

    tok, model = minilm.load()
    texts = sentences()
    if len(texts) < n_eval + n_calib:
        raise SystemExit(f"only {len(texts)} sentences available")
    calib = minilm.embed_tokens(tok, model, texts[:n_calib])
    evals = minilm.embed_tokens(tok, model, texts[-n_eval:])
    with tempfile.TemporaryDirectory() as d:
        start = time.perf_counter()
        original = minilm.export(model, Path(d) / "minilm.onnx")
    lengths = [e["inputs_embeds"].shape[1] for e in evals]
    print(f"MiniLM exported in {time.perf_counter() - start:.1f}s; {n_calib} calibration / "
          f"{n_eval} evaluation sentences ({min(lengths)}–{max(lengths)} tokens)")
    session = ort_session(original)
    ref = [session.run(None, s)[0] for s in evals]
    current = original
    print(f"{'after':<16} {'status':<12} {'rel err':>8} {'depth':>6} {'cos mean':>9} "
          f"{'cos min':>8} {'seconds':>8}  offenders diverged")
    for spec in ["(original)", *passes]:
        run = None
        if spec != "(original)":
            [(p, params)] = parse_pass_list(spec, available())
            current, run = run_pass(current, p, params, calib)
        out = ort_session(current)
        cos = minilm.cosines(ref, [out.run(None, s)[0] for s in evals])
        diverged = int(np.sum(~np.isfinite(cos)))
        cos = np.where(np.isfinite(cos), cos, -1.0)  # a diverged embedding counts as cosine −1
        report = check(current)
        status = run.status if run else "-"
        err = f"{run.max_rel:.2g}" if run and run.max_rel is not None else "-"
        secs = f"{run.seconds:.0f}" if run else "-"
        print(f"{spec:<16} {status:<12} {err:>8} {report.depth:>6} {cos.mean():>9.5f} "
              f"{cos.min():>8.5f} {secs:>8}  {len(report.offenders):>9} {diverged:>8}")
        if run and run.status != "applied":
            print(f"    {run.message}")
        if run:
            for name, entry in list(run.report.details.get("replaced", {}).items())[:2]:
                print(f"    {name}: {entry}")
    final = check(current)
    print(f"HE-friendly: {final.he_friendly}; total depth {final.depth}; "
          f"offenders {[o.node for o in final.offenders][:6]}")
    onnx.save(current, Path(tempfile.gettempdir()) / "minilm-poly.onnx")


def ckks_mlp() -> None:
    from edgekit import api
    from edgekit.he.models import poly_mlp

    x = np.random.default_rng(0).standard_normal((1, 8)).astype(np.float32)
    result = api.he_run(poly_mlp(), {"x": x})
    [err] = result.relative_error.values()
    secs = ", ".join(f"{k} {v:.2f}s" for k, v in result.seconds.items())
    print(f"CKKS poly MLP 8-16-4 (x²): depth {result.depth}, {result.params.to_dict()}; "
          f"rel error {err:.2e}; {secs}")


def ckks_attention(seq: int, width: int, heads: int, out: Path) -> None:
    import onnx

    from edgekit import api
    from edgekit.he.models import block_inputs, poly_attention_block
    from edgekit.he.run import relative_error as rel
    from edgekit.verify import ort_session, run_ort

    start = time.perf_counter()
    original, poly, details = poly_attention_block(seq, width, heads)
    sm = details["replaced"]["softmax"]
    x = block_inputs(1, seq, width, seed=99)[0]
    probe = onnx.ModelProto()
    probe.CopyFrom(original)
    probe.graph.output.append(onnx.helper.make_tensor_value_info("scores", 1, None))
    scores = ort_session(probe).run(None, x)[1]
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(original, out / "attention.onnx")
    onnx.save(poly, out / "attention-poly.onnx")
    np.save(out / "x.npy", x["x"])
    print(f"attention block seq {seq}, width {width}, {heads} heads (+ residual); logits on the "
          f"input span [{scores.min():.2f}, {scores.max():.2f}] (std {scores.std():.2f}); "
          f"poly-softmax: exp degree {sm['exp']['degree']} on {sm['exp']['interval']}, "
          f"{sm['squaring_steps']} squarings, final Newton {sm['final_reciprocal']}; "
          f"he-check depth {api.he_check(poly).depth}; "
          f"built in {time.perf_counter() - start:.1f}s")
    result = api.he_run(poly, x, packed=True)
    [y], [ref], [err] = (result.outputs.values(), result.reference.values(),
                         result.relative_error.values())
    ref0 = run_ort(original, x)[0]
    secs = ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items())
    print(f"CKKS attention block (token-packed): {result.params.to_dict()}; rel error "
          f"{err:.2e} vs the polynomial graph, {rel(y, ref0):.2e} vs the original "
          f"block (plaintext poly vs original {rel(ref, ref0):.2e}); {secs}")
    print(f"    same run: edgekit he-run {out / 'attention-poly.onnx'} --input "
          f"x={out / 'x.npy'} --packed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sentences", type=int, default=200)
    ap.add_argument("--calibration", type=int, default=64)
    ap.add_argument("--passes", default="poly-layernorm,poly-gelu,poly-softmax")
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--skip-attention", action="store_true")
    ap.add_argument("--attention", default="8,32,2", help="seq,width,heads of the block")
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "edgekit-he")
    args = ap.parse_args()
    ckks_mlp()
    if not args.skip_attention:
        seq, width, heads = (int(v) for v in args.attention.split(","))
        ckks_attention(seq, width, heads, args.out)
    if not args.skip_minilm:
        minilm(args.sentences, args.calibration, args.passes.split(","))


if __name__ == "__main__":
    main()
