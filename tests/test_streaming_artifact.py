"""Step artifacts end to end: a trained digits LMUFormer exported with --streaming, compiled
with TVM, streamed frame by frame (runtime, CLI), profiled per frame; plus a spiking model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edgekit import api, runtime
from edgekit.cli import cli
from edgekit.streaming import digits, equivalence

FACTORY = '''
from edgekit.streaming.digits import make_model

INPUTS = [("x", ({batch}, 8, 8), "float32")]


def make():
    return make_model()
'''


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The digits fixture trained (seconds, reproducible) and compiled as a step artifact
    that streams the whole test split at once (batch = test-set size) — through the CLI."""
    d = tmp_path_factory.mktemp("digits")
    split = digits.load()
    model = digits.train(split, epochs=3)
    torch.save(model.state_dict(), d / "w.pt")
    (d / "net.py").write_text(FACTORY.format(batch=len(split.x_test)))
    result = invoke("export", f"{d / 'net.py'}:make", "--weights", d / "w.pt", "--streaming",
                    "-o", d / "step.onnx")
    assert result.exit_code == 0, result.output
    assert "state state_blocks_0_body_m: 360x4x8 float32, starts at 0" in result.output
    result = invoke("compile", d / "step.onnx", "-o", d / "step.edgekit")
    assert result.exit_code == 0, result.output
    with torch.no_grad():
        parallel = model(torch.from_numpy(split.x_test)).numpy()
    return d, split, parallel


def test_manifest_records_the_state(trained):
    d, *_ = trained
    manifest = runtime.read_manifest(d / "step.edgekit")
    st = manifest["streaming"]
    assert st["chunk"] == 1 and st["delay"] == 0 and st["frame_input"] == "x"
    names = [i["name"] for i in manifest["inputs"]]
    assert names == ["x", *(s["input"] for s in st["states"])]
    assert [o["name"] for o in manifest["outputs"]] == ["y", *(s["output"] for s in st["states"])]
    assert {s["key"]: s["init"] for s in st["states"]}["blocks.0.body.m"] == 0.0
    assert st["checks"]["sequence"]["ok"]


def test_streaming_accuracy_equals_parallel(trained):
    d, split, parallel = trained
    session = runtime.load(d / "step.edgekit").stream()
    streamed = session.run(split.x_test)
    report = equivalence.compare_outputs(streamed, parallel, 0, atol=0, rtol=1e-5)
    acc_stream = digits.accuracy(streamed, split.y_test)
    acc_parallel = digits.accuracy(parallel, split.y_test)
    print(f"digits: parallel accuracy {acc_parallel:.4f}, streaming (TVM) {acc_stream:.4f}, "
          f"rel error {report['rel']:.2e}, top-1 agreement {report['top1_agreement']:.4f}")
    assert report["ok"], report
    assert acc_parallel > 0.8  # it learned something, so agreement is meaningful
    assert acc_stream == acc_parallel


def test_session_steps_resets_and_checks_frames(trained):
    d, split, _ = trained
    session = runtime.load(d / "step.edgekit").stream()
    whole = session.run(split.x_test)
    assert session.frames == 8 and session.state["state_t"].tolist() == [8]
    session.reset()
    assert not session.state["state_blocks_0_body_m"].any()
    stepped = np.concatenate([session.step(split.x_test[:, t:t + 1]) for t in range(8)], 1)
    np.testing.assert_array_equal(stepped, whole)
    with pytest.raises(ValueError, match="expected"):
        session.step(split.x_test[:, :2])


def test_cli_run_stream_and_per_frame_profile(trained, tmp_path):
    d, split, parallel = trained
    np.save(tmp_path / "seq.npy", split.x_test)
    result = invoke("run", d / "step.edgekit", "--stream", "--input", f"x={tmp_path}/seq.npy",
                    "-o", tmp_path / "out.npz")
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "out.npz") as out:
        assert out["y"].shape == parallel.shape
        assert np.abs(out["y"] - parallel).max() <= 1e-5 * np.abs(parallel).max()
    result = invoke("profile", d / "step.edgekit", "--warmup", "2", "--repeat", "5", "--json")
    assert result.exit_code == 0, result.output
    stream = json.loads(result.output)["stream"]
    assert stream["chunk"] == 1 and stream["per_frame_ms"]["median"] > 0
    assert stream["state_bytes"] == 4 * 360 * (8 * 2 + 32 * 2 + 4 * 8 + 32) + 8


def test_cli_errors(trained, add_relu_onnx, tmp_path):
    d, *_ = trained
    result = invoke("export", "mobile-cnn", "--streaming", "-o", tmp_path / "m.onnx")
    assert result.exit_code == 1 and "not streamable" in result.output
    assert not (tmp_path / "m.onnx").exists()
    result = invoke("export", add_relu_onnx, "--streaming", "-o", tmp_path / "m.onnx")
    assert result.exit_code == 1 and result.output.startswith("error: --streaming converts")
    api.compile(add_relu_onnx, "host", tmp_path / "plain.edgekit")
    np.save(tmp_path / "x.npy", np.zeros((1, 4), np.float32))
    result = invoke("run", tmp_path / "plain.edgekit", "--stream", "--input",
                    f"x={tmp_path}/x.npy", "-o", tmp_path / "o.npz")
    assert result.exit_code == 1 and "not a step artifact" in result.output
    np.save(tmp_path / "bad.npy", np.zeros((360, 8, 3), np.float32))
    result = invoke("run", d / "step.edgekit", "--stream", "--input", f"x={tmp_path}/bad.npy",
                    "-o", tmp_path / "o.npz")
    assert result.exit_code == 1 and "expected" in result.output
    assert not (tmp_path / "o.npz").exists()


def test_spiking_step_artifact_in_chunks(tmp_path):
    """Random-weight spiking LMUFormer, 2 frames per step, compiled with TVM."""
    exported = api.export_streaming("spiking-lmuformer", tmp_path / "s.onnx", chunk=2)
    flips = exported.checks["spikes"]
    print(f"spiking fp32: {flips['flips']} of {flips['decisions']} spike decisions flipped")
    api.compile(tmp_path / "s.onnx", "host", tmp_path / "s.edgekit")
    session = runtime.load(tmp_path / "s.edgekit").stream()
    assert session.chunk == 2
    model = exported.form.module.model
    x = np.random.default_rng(7).standard_normal((1, 16, 8)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    report = equivalence.compare_outputs(session.run(x), ref, 0, atol=1e-5, rtol=1e-5)
    print(f"spiking fp32 through TVM: rel {report['rel']:.2e}, top-1 "
          f"{report['top1_agreement']:.3f}")
    assert report["top1_agreement"] >= 0.9 and flips["flip_rate"] <= 1e-3


def test_example_app_classifies_the_stream(trained, tmp_path):
    d, split, parallel = trained
    np.save(tmp_path / "seq.npy", split.x_test)
    app = Path(__file__).resolve().parents[1] / "examples" / "stream_classify.py"
    out = subprocess.run([sys.executable, str(app), str(d / "step.edgekit"),
                          str(tmp_path / "seq.npy")], capture_output=True, text=True, check=True)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 8
    assert lines[-1].startswith(f"frame    7: class {int(parallel[0, -1].argmax())} ")
