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


def test_cli_he_run(tmp_path):
    onnx.save(poly_mlp(), tmp_path / "mlp.onnx")
    np.save(tmp_path / "x.npy", np.linspace(-1, 1, 8, dtype=np.float32).reshape(1, 8))
    out = CliRunner().invoke(cli, ["he-run", str(tmp_path / "mlp.onnx"), "--input",
                                   f"x={tmp_path / 'x.npy'}", "--json", "-o",
                                   str(tmp_path / "y.npz")])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["relative_error"]["y"] < 1e-3 and data["params"]["levels"] == 3
    assert np.load(tmp_path / "y.npz")["y"].shape == (1, 4)
