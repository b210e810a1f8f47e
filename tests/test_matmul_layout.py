"""``PackMatmulWeights`` (``compiler/matmul_layout``): constant matmul weights re-laid out at
compile time into the panels of the blocked schedule, static and symbolic rows; and
``build.relax_pipeline``'s fix that keeps ``noalias`` on kernels of symbolic libraries."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgekit import compiler, verify
from edgekit.compiler import machine
from edgekit.compiler.machine import Machine
from edgekit.compiler.matmul_layout import MATMUL, pack_weights
from edgekit.targets import load_target

K, N = 48, 96


@pytest.fixture
def small_caches(monkeypatch):
    """This machine's vector unit with 2 KiB L1 / 8 KiB L2: a 48 x 96 weight is "large", so
    the pass applies and the blocked schedule has several K blocks and panels."""
    real = machine.describe(load_target("host").tvm_target())
    small = Machine(real.lanes, real.vector_registers, 2048, 8192, 0, "test")
    monkeypatch.setattr(machine, "describe", lambda tvm_target: small)
    return small


def _model(rows, weight: np.ndarray, gemm: bool = False, batch: tuple[int, ...] = (1,)):
    k, n = (weight.shape[1], weight.shape[0]) if gemm else weight.shape
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [*batch, rows, k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [*batch, rows, n])
    bias = np.linspace(-1, 1, n, dtype=np.float32)
    if gemm:  # Gemm(x, W, transB=1): the weight is [N, K], transposed at compile time
        nodes = [helper.make_node("Gemm", ["x", "W", "b"], ["y"], transB=1)]
    else:
        nodes = [helper.make_node("MatMul", ["x", "W"], ["t"]),
                 helper.make_node("Add", ["t", "b"], ["y"])]
    graph = helper.make_graph(nodes, "g", [x], [y], [numpy_helper.from_array(weight, "W"),
                                                     numpy_helper.from_array(bias, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), bias


def _build(model: onnx.ModelProto, bounds=None):
    import tvm
    from tvm import relax

    target = load_target("host")
    mod = compiler.to_relax(model, verify.onnx_input_specs(model, []),
                            tvm_target=target.tvm_target(), dim_bounds=bounds)
    vm = relax.VirtualMachine(compiler.build(mod, target), tvm.cpu())
    return mod, lambda x: vm["main"](tvm.runtime.tensor(x)).numpy()


def _weights(seed: int = 0, shape=(K, N)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _packed_params(mod) -> list[tuple[int, ...]]:
    """Shapes of the constant weights the packed kernels are called with."""
    import tvm
    from tvm import relax

    found = []

    def visit(expr):
        if (isinstance(expr, relax.Call) and "call_tir" in str(expr.op)
                and MATMUL in expr.args[0].name_hint):
            found.extend(tuple(int(d) for d in a.value.shape) for a in expr.args[1].fields
                         if isinstance(a, tvm.ir.expr.Constant))

    relax.analysis.post_order_visit(mod["main"], visit)
    return found


def test_pack_weights_layout():
    w = _weights(shape=(5, 11))
    wp = pack_weights(w, 4)
    assert wp.shape == (3, 5, 4)
    for p in range(3):
        for b in range(4):
            col = w[:, p * 4 + b] if p * 4 + b < 11 else np.zeros(5, np.float32)
            np.testing.assert_array_equal(wp[p, :, b], col)


@pytest.mark.parametrize("n", [N, N + 4])
def test_symbolic_rows_every_length(small_caches, n):
    """One library, lengths that leave every kind of row tail, against float64 NumPy; a
    column count that is not whole panels gets zero columns in the packed weights."""
    w = _weights(shape=(K, n))
    model, bias = _model("seq", w)
    mod, run = _build(model, {"seq": (1, 64)})
    packed = _packed_params(mod)
    assert len(packed) == 1 and packed[0][1] == K
    assert packed[0][0] * packed[0][2] == -(-n // packed[0][2]) * packed[0][2]
    rng = np.random.default_rng(1)
    for rows in (1, 2, 3, 5, 17, 64):
        x = rng.standard_normal((1, rows, K)).astype(np.float32)
        ref = x.astype(np.float64) @ w.astype(np.float64) + bias
        assert run(x).shape == (1, rows, n)
        err = np.abs(run(x) - ref).max() / np.abs(ref).max()
        assert err <= 1e-5, (rows, err)


@pytest.mark.parametrize("gemm", [False, True])
def test_static_rows_with_tail_and_gemm(small_caches, gemm):
    """Static rows that are not a multiple of the register tile (the kernel recomputes the
    last row into the padding), batch dims, and Gemm's transposed weight folded first."""
    w = _weights(2, (N, K) if gemm else (K, N))
    batch = () if gemm else (2,)
    model, bias = _model(37, w, gemm=gemm, batch=batch)
    mod, run = _build(model)
    assert len(_packed_params(mod)) == 1
    x = np.random.default_rng(3).standard_normal((*batch, 37, K)).astype(np.float32)
    dense = w.T if gemm else w
    ref = x.astype(np.float64) @ dense.astype(np.float64) + bias
    assert np.abs(run(x) - ref).max() / np.abs(ref).max() <= 1e-5


def test_left_alone_when_not_blocked_or_not_constant(small_caches):
    """Refusals: a weight the register tile alone serves (4 rows: fewer than the row tiles
    that repay packing) and a weight that is a graph input keep the plain matmul."""
    model, _ = _model(4, _weights())
    mod, _ = _build(model)
    assert _packed_params(mod) == []
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, K])
    w = helper.make_tensor_value_info("w", TensorProto.FLOAT, [K, N])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, N])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x, w], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    import tvm
    from tvm import relax

    target = load_target("host")
    mod = compiler.to_relax(model, verify.onnx_input_specs(model, []),
                            tvm_target=target.tvm_target())
    assert _packed_params(mod) == []
    vm = relax.VirtualMachine(compiler.build(mod, target), tvm.cpu())
    a, b = _weights(4, (64, K)), _weights(5)
    out = vm["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b)).numpy()
    np.testing.assert_allclose(out, a @ b, rtol=1e-5, atol=1e-4)


def test_symbolic_library_keeps_noalias(small_caches):
    """The shape function TVM adds to a symbolic library is marked noalias, so the kernels
    keep per-buffer alias classes (without it every access shared one class: ``tvm-alias``,
    and the accumulators of the matmul tile went to memory after each multiply-add)."""
    import tvm

    model, _ = _model("seq", _weights())
    target = load_target("host")
    mod = compiler.to_relax(model, verify.onnx_input_specs(model, []),
                            tvm_target=target.tvm_target(), dim_bounds={"seq": (1, 64)})
    ir = compiler.build(mod, target).mod.imports[0].inspect_source("ll")
    assert "shape_func" in ir
    assert '"tvm-alias"' not in ir
    bare = tvm.compile(compiler.pipeline.prepare(mod, target)[0], target=target.tvm_target())
    assert '"tvm-alias"' in bare.mod.imports[0].inspect_source("ll")  # TVM's own pipeline
