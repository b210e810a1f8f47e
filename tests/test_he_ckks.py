"""A real CKKS run (TenSEAL): encrypt, evaluate on ciphertexts, decrypt, compare with ORT."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from edgekit.cli import cli
from edgekit.errors import EdgekitError
from edgekit.he import ckks
from edgekit.he.models import poly_mlp
from edgekit.verify import run_ort

pytest.importorskip("tenseal")


def test_parameters_follow_the_depth():
    small = ckks.choose_params(3)
    assert small.coeff_mod_bit_sizes == [60, 40, 40, 40, 60]
    assert sum(small.coeff_mod_bit_sizes) <= ckks.MAX_BITS[small.ring_degree]
    assert ckks.choose_params(18).ring_degree == 32768
    with pytest.raises(EdgekitError, match="bootstrapping"):
        ckks.choose_params(40)


def test_encrypted_mlp_matches_onnxruntime():
    model = poly_mlp()
    x = np.random.default_rng(3).standard_normal((4, 1, 8)).astype(np.float32)
    result = ckks.run(model, {"x": x}, batch=True)  # 4 samples in the slots
    ref = np.stack([run_ort(model, {"x": xi})[0] for xi in x])
    assert result.outputs[0].shape == ref.shape
    assert np.linalg.norm(result.outputs[0] - ref) / np.linalg.norm(ref) < 1e-3
    assert result.depth == 3 and result.seconds["evaluate"] > 0


def test_non_polynomial_models_are_refused(add_relu_onnx):
    with pytest.raises(EdgekitError, match="not HE-friendly.*relu"):
        ckks.run(onnx.load(add_relu_onnx), {"x": np.ones((1, 4), np.float32)})


def test_cli_he_run(tmp_path):  # per-element packing, 3 levels of 40 bits
    onnx.save(poly_mlp(), tmp_path / "mlp.onnx")
    np.save(tmp_path / "x.npy", np.linspace(-1, 1, 8, dtype=np.float32).reshape(1, 8))
    out = CliRunner().invoke(cli, ["he-run", str(tmp_path / "mlp.onnx"), "--input",
                                   f"x={tmp_path / 'x.npy'}", "--json", "-o",
                                   str(tmp_path / "y.npz")])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["relative_error"]["y"] < 1e-3 and data["params"]["levels"] == 3
    assert np.load(tmp_path / "y.npz")["y"].shape == (1, 4)


def test_scales_stay_exact_through_many_rescales():
    """TenSEAL declares the scale Δ after every rescale (true: Δ²/q); the engine keeps the
    exact scale, so x·1 rescaled 20 times and added to a fresher x stays at noise level."""
    from edgekit.he.seal import Engine

    p = ckks.choose_params(22)
    assert p.scale_bits < 40 and p.coeff_mod_bit_sizes[0] == p.scale_bits + ckks.HEADROOM
    engine = Engine(p.ring_degree, p.coeff_mod_bit_sizes, p.scale_bits, rotations=[4])
    x = np.linspace(-1, 1, 16)
    a = b = engine.encrypt(x)
    for _ in range(20):
        a = a * 1.0
    both = engine.decrypt(a + engine.rotate(b, 4))[:12]
    assert np.max(np.abs(both - (x[:12] + x[4:16]))) < 1e-3


def test_zero_results_are_fresh_encryptions_of_zero():
    """SEAL refuses 'transparent' ciphertexts (x·0, x − x); the engine encrypts a 0 instead."""
    from edgekit.he.seal import Engine

    engine = Engine(8192, [60, 40, 60], 40)
    x = engine.encrypt(np.ones(4))
    for zero in (x * 0.0, x - x, engine.lincomb([x, x], [0.0, 0.0], bias=2.0) - 2.0):
        assert np.max(np.abs(engine.decrypt(zero)[:4])) < 1e-6


def test_trace_compares_every_ciphertext_node():
    model = poly_mlp()
    x = np.random.default_rng(1).standard_normal((1, 8)).astype(np.float32)
    result = ckks.run(model, {"x": x}, trace=True)
    assert [row.name for row in result.trace] == ["h", "hb", "sq", "z", "y"]
    assert all(row.rel_error < 1e-4 for row in result.trace)
    assert [row.levels_left for row in result.trace] == [2, 2, 1, 0, 0]


def test_cli_trace_prints_one_line_per_ciphertext_node(tmp_path):
    onnx.save(poly_mlp(), tmp_path / "mlp.onnx")
    np.save(tmp_path / "x.npy", np.linspace(-1, 1, 8, dtype=np.float32).reshape(1, 8))
    out = CliRunner().invoke(cli, ["he-run", str(tmp_path / "mlp.onnx"), "--input",
                                   f"x={tmp_path / 'x.npy'}", "--trace"])
    assert out.exit_code == 0, out.output
    lines = [ln.split() for ln in out.output.splitlines() if ln.startswith("trace ")]
    assert [ln[1] for ln in lines] == ["h", "hb", "sq", "z", "y"]
    assert "element packing" in out.output


def test_encrypted_attention_block_matches_its_polynomial_graph(tmp_path):
    """Token-packed CKKS run of a real attention block (2 heads, poly-softmax) via the CLI."""
    from edgekit.he.models import block_inputs, poly_attention_block

    # 4 Newton steps for the softmax denominator (depth 21, 36-bit primes) keep the run short
    spec = "poly-softmax:steps=0:tol=0.02:iters=4"
    original, poly, details = poly_attention_block(seq=4, width=8, heads=2, softmax=spec)
    assert details["replaced"]["softmax"]["final_reciprocal"]["iterations"] == 4
    onnx.save(poly, tmp_path / "att.onnx")
    x = block_inputs(1, 4, 8, seed=7)[0]["x"]
    np.save(tmp_path / "x.npy", x)
    out = CliRunner().invoke(cli, ["he-run", str(tmp_path / "att.onnx"), "--input",
                                   f"x={tmp_path / 'x.npy'}", "--packed", "--json", "-o",
                                   str(tmp_path / "y.npz")])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["packing"] == "tokens" and data["params"]["ring_degree"] == 32768
    assert data["relative_error"]["y"] <= 1e-3  # against onnxruntime on the same graph
    y = np.load(tmp_path / "y.npz")["y"]
    ref = run_ort(original, {"x": x})[0]  # the polynomial block still approximates the block
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 5e-2


def test_packed_runner_refuses_non_power_of_two_sequences():
    from edgekit.he.models import poly_attention_block

    _, poly, _ = poly_attention_block(seq=3, width=4, heads=1, calibration=4)
    with pytest.raises(EdgekitError, match="power-of-two"):
        ckks.run(poly, {"x": np.zeros((1, 3, 4), np.float32)}, packed=True)


def test_packed_runner_names_a_reshape_that_merges_the_tokens():
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "flat"], ["y"], name="flatten_tokens")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])],
        [numpy_helper.from_array(np.array([1, 32], np.int64), "flat")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(EdgekitError, match="merges the token axis"):
        ckks.run(model, {"x": np.ones((1, 4, 8), np.float32)}, packed=True)
