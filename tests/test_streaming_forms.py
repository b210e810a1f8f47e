"""Streaming forms in torch: LMU math, and stepping == parallel (fp64, fp32, delay, chunks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from edgekit.graphs import _lmu_math
from edgekit.graphs._lmuformer_net import make
from edgekit.graphs._stream_layers import LMU, CausalConv1d, Residual, StreamSequential

from edgekit import graphs
from edgekit.errors import EdgekitError
from edgekit.streaming import equivalence
from edgekit.streaming.convert import run_steps, to_step
from edgekit.streaming.protocol import step


def _parallel(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def test_zoh_matches_scipy_and_impulse_response_matches_recurrence():
    signal = pytest.importorskip("scipy.signal")
    order, theta = 6, 10.0
    abar, bbar = _lmu_math.lmu_matrices(order, theta)
    i, j = np.meshgrid(np.arange(order), np.arange(order), indexing="ij")
    a = np.where(i < j, -1.0, (-1.0) ** (i - j + 1)) * (2 * i + 1) / theta
    b = ((2 * np.arange(order) + 1) * (-1.0) ** np.arange(order) / theta)[:, None]
    ad, bd, *_ = signal.cont2discrete((a, b, np.eye(order), np.zeros((order, 1))), 1.0, "zoh")
    np.testing.assert_allclose(abar, ad, rtol=0, atol=1e-12)
    np.testing.assert_allclose(bbar, bd[:, 0], rtol=0, atol=1e-12)
    u = np.random.default_rng(0).standard_normal(20)
    m, ms = np.zeros(order), []
    for ut in u:
        m = abar @ m + bbar * ut
        ms.append(m)
    h = _lmu_math.impulse_response(abar, bbar, 20)
    conv = np.stack([sum(h[t - k] * u[k] for k in range(t + 1)) for t in range(20)])
    np.testing.assert_allclose(conv, np.stack(ms), rtol=0, atol=1e-12)


def test_parallel_memory_equals_fft_form():
    layer = LMU(dim=4, memories=3, order=8, theta=16).double()
    u = torch.from_numpy(np.random.default_rng(1).standard_normal((2, 3, 40)))
    got = layer.memory(u).reshape(2, 3, 8, 40)
    t = u.shape[-1]
    h = torch.from_numpy(_lmu_math.impulse_response(layer._abar, layer._bbar, t))  # (T, order)
    spec = torch.fft.rfft(u, 2 * t)[:, :, None, :] * torch.fft.rfft(h.T, 2 * t)[None, None]
    fft = torch.fft.irfft(spec, 2 * t)[..., :t]  # length 2T: no circular wrap-around
    assert float((got - fft).abs().max()) < 1e-12


@pytest.mark.parametrize("name", ["lmu", "lmuformer", "spiking-lmuformer"])
def test_builtin_graphs_step_equals_parallel(name):
    g = graphs.available()[name]
    shape = g.inputs[0][1]
    model = g.build()
    x64 = np.random.default_rng(2).standard_normal(shape)
    m64 = model.double()
    form = to_step(m64, shape, dtype="float64")
    assert form.delay == 0 and form.states[0].key == "t"
    ref = _parallel(m64, x64)
    got = run_steps(form, x64)
    assert np.abs(got - ref).max() <= 1e-10 * np.abs(ref).max()
    if getattr(m64, "spiking", False):
        flips = equivalence.spike_flips(m64, x64, lambda s: run_steps(form, s))
        assert flips["decisions"] > 0 and flips["flips"] == 0  # identical spikes in fp64
        rates = [v["rate"] for v in flips["layers"].values()]
        assert 0.02 < float(np.mean(rates)) < 0.9  # the test exercises real spiking
    m32 = model.float()
    x32 = x64.astype(np.float32)
    form32 = to_step(m32, shape)
    ref32, got32 = _parallel(m32, x32), run_steps(form32, x32)
    report = equivalence.compare_outputs(got32, ref32, 0, atol=0, rtol=1e-5)
    if getattr(m32, "spiking", False):
        flips = equivalence.spike_flips(m32, x32, lambda s: run_steps(form32, s))
        print(f"{name} fp32 spike flip rate {flips['flip_rate']:.2e}")  # reported, not asserted
    else:
        assert report["ok"], report


@pytest.mark.parametrize("spiking", [False, True])
@pytest.mark.parametrize("chunk", [1, 4])
def test_lookahead_delays_the_step_form_and_chunks_agree(spiking, chunk):
    """k=3 convs padded (1, 1) as in LMUFormer: each looks one frame ahead."""
    model = make(3, features=5, dim=12, lookahead=1, spiking=spiking).double()
    shape = (2, 16, 5)
    x = np.random.default_rng(3).standard_normal(shape)
    form = to_step(model, shape, chunk, "float64")
    assert form.delay == 2 and form.frame_shape == (2, chunk, 5)
    ref = _parallel(model, x)
    got = run_steps(form, x)
    report = equivalence.compare_outputs(got, ref, form.delay, atol=0, rtol=1e-10)
    assert report["ok"] and report["frames"] == 14, report
    if spiking:
        assert equivalence.spike_flips(model, x, lambda s: run_steps(form, s))["flips"] == 0


def test_state_names_shapes_and_initial_values():
    g = graphs.available()["lmuformer"]
    form = to_step(g.build(), g.inputs[0][1])
    by_key = {s.key: s for s in form.states}
    assert by_key["blocks.0.body.m"].shape == (1, 4, 8)  # LMU memory: memories x order
    assert by_key["embed.0.cache"].shape == (1, 8, 2)  # k=3 conv: last 2 input frames
    assert by_key["head.sum"].shape == (1, 32, 1)
    assert by_key["t"].dtype == "int64"
    assert all(s.init == 0.0 for s in form.states)
    assert by_key["blocks.0.body.m"].input == "state_blocks_0_body_m"
    assert by_key["blocks.0.body.m"].output == "state_blocks_0_body_m_next"


class _TimeMajor(torch.nn.Module):
    """(B, T, C) in and out around a (B, C, T) body."""

    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return self.body(x.transpose(1, 2)).transpose(1, 2)

    def stream_step(self, x, state, new, prefix, ctx):
        return step(self.body, x.transpose(1, 2), state, new, prefix + "body.", ctx).transpose(1, 2)


def test_unsupported_structures_are_refused():
    ahead = _TimeMajor(Residual(CausalConv1d(4, 4, 3, lookahead=1)))
    with pytest.raises(EdgekitError, match="residual"):
        run_steps(to_step(ahead, (1, 6, 4)), np.zeros((1, 6, 4), np.float32))
    with pytest.raises(EdgekitError, match="not streamable"):
        to_step(torch.nn.Linear(3, 3), (1, 4, 3))
    gru = _TimeMajor(StreamSequential(torch.nn.Conv1d(3, 3, 1), torch.nn.GRU(3, 3)))
    with pytest.raises(EdgekitError, match="GRU has no streaming form"):
        run_steps(to_step(gru, (1, 4, 3)), np.zeros((1, 4, 3), np.float32))
    with pytest.raises(EdgekitError, match="lookahead"):
        CausalConv1d(2, 2, 3, lookahead=3)
