"""Packed-weight convolutions (conv_layout.PackConvWeights + conv_schedule): numerics against
onnxruntime, the weights packed once at compile time, the tile from the target's features,
and convs the pass leaves to the generic schedule."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from _compiled import host as _host
from _compiled import kernels as _kernels
from _compiled import lowered as _lowered
from _compiled import run_against_ort as _run_against_ort
from onnx import TensorProto, helper


def _conv_onnx(cin: int, cout: int, hw: tuple[int, int], kernel: int = 3, residual=False,
               **attrs) -> onnx.ModelProto:
    """Conv (+ bias) -> Relu (-> + the conv's own output: a second epilogue input)."""
    rng = np.random.default_rng(cin * 100 + cout)
    groups = attrs.get("group", 1)
    w = rng.standard_normal((cout, cin // groups, kernel, kernel)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], **attrs),
             helper.make_node("Relu", ["c"], ["r" if residual else "y"])]
    if residual:
        nodes.append(helper.make_node("Add", ["r", "c"], ["y"]))
    graph = helper.make_graph(
        nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, *hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [helper.make_tensor("w", TensorProto.FLOAT, w.shape, w.ravel()),
         helper.make_tensor("b", TensorProto.FLOAT, b.shape, b)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


CASES = {
    "3x3 pad 1, odd map": dict(cin=16, cout=32, hw=(9, 11), pads=[1, 1, 1, 1]),
    # output channels a multiple of 16: packed on AVX2 (8 lanes) and AVX-512 (16) alike
    "3x3 stride 2, odd map": dict(cin=8, cout=48, hw=(15, 13), pads=[1, 1, 1, 1],
                                  strides=[2, 2]),
    "1x1 GEMM, 7x7 map": dict(cin=40, cout=64, hw=(7, 7), kernel=1),
    "5x5 dilation 2": dict(cin=8, cout=16, hw=(12, 12), kernel=5, dilations=[2, 2],
                           pads=[4, 4, 4, 4]),
    "asymmetric pads": dict(cin=8, cout=16, hw=(10, 10), pads=[0, 1, 2, 0]),
    "SAME_UPPER, stride 2": dict(cin=8, cout=16, hw=(11, 11), auto_pad="SAME_UPPER",
                                 strides=[2, 2]),
    "VALID": dict(cin=8, cout=16, hw=(11, 9), auto_pad="VALID"),
    "7x7 stem, 3 channels": dict(cin=3, cout=16, hw=(33, 33), kernel=7, pads=[3, 3, 3, 3],
                                 strides=[2, 2]),
    "residual epilogue": dict(cin=16, cout=16, hw=(14, 14), pads=[1, 1, 1, 1], residual=True),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_packed_conv_matches_onnxruntime(case):
    err, names = _run_against_ort(_conv_onnx(**CASES[case]))
    assert any("edgekit_conv_packed" in n for n in names), names
    assert not any("conv2d" in n for n in names), names  # no conv left to the old rule
    assert err <= 1e-5


def _panels(mod) -> np.ndarray:
    """The 5-D constant the packed conv kernel is called with in ``main``."""
    import tvm
    from tvm import relax

    calls = []
    relax.analysis.post_order_visit(mod["main"], lambda e: calls.append(e) if isinstance(
        e, relax.Call) and getattr(e.op, "name", "") == "relax.call_tir" else None)
    conv = next(c for c in calls if "edgekit_conv_packed" in c.args[0].name_hint)
    consts = [a.value.numpy() for a in conv.args[1].fields
              if isinstance(a, tvm.ir.expr.Constant)]
    return next(c for c in consts if c.ndim == 5)


def test_weights_are_packed_at_compile_time():
    """The conv kernel reads a 5-D panel constant of ``main`` (packed by NumPy while
    compiling); no kernel transposes or packs weights per call: the only kernels are the
    conv and the activations' layout change at the graph's edges."""
    model = _conv_onnx(16, 32, (9, 11), pads=[1, 1, 1, 1])
    mod = _lowered(model, _host().tvm_target())
    names = list(_kernels(mod))
    assert all("edgekit_conv_packed" in n or n.startswith("transpose") for n in names), names
    panels = _panels(mod)
    assert panels.shape[:4] == (32 // panels.shape[4], 3, 3, 16)
    # Wp[p, r, s, c, b] = W[p B + b, c, r, s] of the ONNX weights
    w = onnx.numpy_helper.to_array(model.graph.initializer[0])
    wp = w.transpose(2, 3, 1, 0).reshape(3, 3, 16, -1, panels.shape[4]).transpose(3, 0, 1, 2, 4)
    np.testing.assert_array_equal(panels, wp)


def test_panel_width_from_the_target_features():
    """AVX2 (8 lanes, 16 registers) and AVX-512 (16 lanes, 32 registers) targets pack panels
    of their own vector width, whatever this machine is; the tile fits the registers."""
    import tvm

    from edgekit.compiler.conv_schedule import padded_rows, tile_shape

    widths = {}
    for mcpu, lanes in (("haswell", 8), ("skylake-avx512", 16)):
        target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "num-cores": 2})
        mod = _lowered(_conv_onnx(16, 64, (14, 14), pads=[1, 1, 1, 1]), target)
        widths[mcpu] = _panels(mod).shape[4]
        assert widths[mcpu] % lanes == 0
    assert widths["haswell"] < widths["skylake-avx512"]
    for registers in (16, 32):
        for rows in (12544, 196, 49, 13, 2):
            r, v = tile_shape(rows, 8, registers)
            padded = padded_rows(rows, v, registers)
            assert 8 % v == 0 and r * v + v + 1 <= registers and padded % r == 0
            assert rows <= padded <= rows * 1.125  # at most an eighth recomputed


@pytest.mark.parametrize("kernel, cin", [(7, 3), (3, 16), (1, 40)], ids=["7x7 stem", "3x3", "1x1"])
def test_packed_schedule_applies_with_taps_and_channels_as_one_loop(kernel, cin):
    """``conv_schedule.schedule`` returns a schedule (it falls back to the generic rule by
    returning None, silently), and its reduction is two loops, r and the fused (s, c), of
    ``KW * C`` steps."""

    from edgekit.compiler import conv_schedule

    target = _host().tvm_target()
    mod = _lowered(_conv_onnx(cin, 32, (15, 15), kernel=kernel, pads=[kernel // 2] * 4), target)
    func = next(f for name, f in _kernels(mod).items() if "edgekit_conv_packed" in name)
    scheduled = conv_schedule.schedule(func, target, cores=1)
    assert scheduled is not None
    loops = [line for line in scheduled.script().splitlines() if line.strip().startswith("for ")]
    extents = {int(v) for line in loops for v in re.findall(r"T\.int64\((\d+)\)", line)}
    assert kernel * cin in extents and kernel in extents


@pytest.mark.parametrize("case", ["grouped", "channels not a vector multiple"])
def test_conv_the_pass_leaves_alone_still_compiles_correctly(case):
    """A grouped conv and 10 output channels (not a multiple of the vector width) keep the
    generic conv2d kernel and its schedule; results still match onnxruntime."""
    attrs = dict(cin=16, cout=32, hw=(8, 8), pads=[1, 1, 1, 1], group=2) if case == "grouped" \
        else dict(cin=8, cout=10, hw=(9, 9), pads=[1, 1, 1, 1])
    err, names = _run_against_ort(_conv_onnx(**attrs))
    assert not any("edgekit_conv_packed" in n for n in names)
    assert any("conv2d" in n for n in names), names
    assert err <= 1e-5
