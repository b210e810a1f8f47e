"""Cache-blocked matmul and GEMV default schedules (``cache_blocking``, ``tiling.tile_blocked``,
``gemv``): numerics for shapes that leave tails everywhere, which schedule a kernel gets, and
the machine model they are sized from."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgekit import api, runtime, verify
from edgekit.compiler import cache_blocking, machine
from edgekit.compiler.machine import Machine
from edgekit.targets import load_target


def _target():
    return load_target("host").tvm_target()


@pytest.fixture
def small_caches(monkeypatch):
    """This machine's vector unit with 2 KiB L1 / 8 KiB L2: small matrices get several K
    blocks and weight panels, so the tests exercise every loop of the blocked schedule."""
    real = machine.describe(_target())
    small = Machine(real.lanes, real.vector_registers, 2048, 8192, 0, "test")
    monkeypatch.setattr(machine, "describe", lambda tvm_target: small)
    return small


def _compile_matmul(a_shape: tuple[int, ...], k: int, n: int):
    """(scheduled TIR of the matmul kernel, a function running it)."""
    import tvm
    from tvm import relax

    from edgekit.compiler import pipeline, schedules

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((*a_shape, k), "float32"))
    w = relax.Var("w", relax.TensorType((k, n), "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(x, w))
        bb.emit_func_output(out)
    target = _target()
    mod, count = schedules.apply_default(pipeline.lower(bb.get(), target), target)
    assert count == 1
    text = next(f for _, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)).script()
    vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    return text, lambda a, b: vm["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b)).numpy()


def _relative_error(a_shape, k, n, run) -> float:
    rng = np.random.default_rng(1)
    a = rng.standard_normal((*a_shape, k), "float32")
    b = rng.standard_normal((k, n), "float32")
    ref = a.astype(np.float64) @ b.astype(np.float64)
    return float(np.abs(run(a, b) - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("a_shape,k,n", [
    # M, K, N odd: padded rows and columns, K prime (not split); 61 rows: at least 4 row
    # tiles (blocking's threshold) with 16-row tiles too (32 registers: AVX-512)
    ((61,), 389, 300),
    ((64,), 256, 200),  # K in several blocks, N padded to whole register tiles
    ((3, 29), 160, 250),  # a batch axis in front (3-D activations, 2-D weights)
])
def test_blocked_matmul_matches_float64(small_caches, a_shape, k, n):
    text, run = _compile_matmul(a_shape, k, n)
    assert "w_pad" in text or "w_global" in text  # the packed weight panel
    assert "T.parallel" in text and "T.vectorized" in text
    assert _relative_error(a_shape, k, n, run) <= 1e-5


def test_large_weight_matmul_gets_the_blocked_schedule():
    """128 x 768 @ 768 x 3072 (BERT's FFN, 9.4 MB of weights): more than half of any L2, so
    blocked over K and N whatever this machine's caches are."""
    cpu = machine.describe(_target())
    tiles = cache_blocking.matmul_tiles(128, 768, 3072, cpu, 2)
    assert tiles.blocked and 768 % tiles.k_block == 0 and tiles.k_block < 768
    text, run = _compile_matmul((128,), 768, 3072)
    assert "w_global" in text and 'scope="local"' in text
    assert _relative_error((128,), 768, 3072, run) <= 1e-5


@pytest.mark.parametrize("a_shape,k,n", [((1,), 300, 1001), ((1, 1), 64, 37)])
def test_gemv_streams_rows_and_matches_float64(a_shape, k, n):
    text, run = _compile_matmul(a_shape, k, n)
    assert "T.vectorized" in text and "_partition" in text  # chunks + the last columns
    assert 'scope="local"' not in text  # accumulates in place, chunk by chunk
    assert ("T.parallel" in text) == (k * n >= 1 << 18)
    assert _relative_error(a_shape, k, n, run) <= 1e-5


def _mlp_head_onnx(path):
    """MatMul + bias + Relu on 7 tokens (K 390, N 520: blocked under ``small_caches``, tails on
    every axis) and a one-token head MatMul + bias (N 1001: the GEMV rule)."""
    rng = np.random.default_rng(5)

    def const(name, shape):
        return helper.make_tensor(name, TensorProto.FLOAT, shape,
                                  (0.1 * rng.standard_normal(shape)).astype(np.float32).ravel())

    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]),
             helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["y"]),
             helper.make_node("MatMul", ["t", "w2"], ["g"]),
             helper.make_node("Add", ["g", "b2"], ["z"])]
    graph = helper.make_graph(
        nodes, "mlp_head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 7, 390]),
         helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 390])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 7, 520]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 1001])],
        [const("w1", [390, 520]), const("b1", [520]), const("w2", [390, 1001]),
         const("b2", [1001])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_epilogues_and_tails_match_onnxruntime(small_caches, tmp_path):
    src = _mlp_head_onnx(tmp_path / "m.onnx")
    result = api.compile(src, "host", tmp_path / "m.edgekit", tuning_db=tmp_path / "db")
    assert result.manifest["tuning"]["default_schedules"] == result.manifest["tuning"]["kernels"]
    model = onnx.load(str(src))
    inputs = verify.seeded_inputs(verify.onnx_input_specs(model, []), 3)
    refs = verify.run_ort(model, inputs)
    got = runtime.load(result.path).run(inputs)
    for name, ref in zip(("y", "z"), refs, strict=True):
        assert np.abs(got[name] - ref).max() / np.abs(ref).max() <= 1e-5


@pytest.mark.parametrize("lanes,registers,tile", [(8, 16, (4, 3)), (16, 32, (6, 4)),
                                                  (4, 32, (6, 4))])
def test_register_tile_fits_the_register_file(lanes, registers, tile):
    """AVX2, AVX-512, NEON: accumulators + weight vectors + one broadcast within the file."""
    mr, nv = cache_blocking.register_tile(128, 3072, lanes, registers)
    assert (mr, nv) == tile and mr * nv + nv + 1 <= registers
    assert cache_blocking.register_tile(3, 3072, lanes, registers)[0] <= 3


def test_cache_blocks_fit_the_caches_and_split_over_cores():
    avx2 = Machine(8, 16, 32 << 10, 512 << 10, 0, "test")
    for m, k, n in ((128, 768, 3072), (128, 3072, 768), (128, 768, 768), (197, 192, 768)):
        t = cache_blocking.matmul_tiles(m, k, n, avx2, 2)
        assert t.blocked and k % t.k_block == 0
        assert t.k_block * t.panel_tiles * t.cols * 4 <= avx2.l2 // 2  # weight panel in L2
        panels = -(-n // t.cols) // t.panel_tiles
        blocks = -(-m // t.rows) // t.row_tiles
        assert (panels * blocks) % 2 == 0  # both cores busy to the end
    assert cache_blocking.matmul_tiles(64, 769, 3072, avx2, 2).k_block == 769  # prime K
    assert not cache_blocking.matmul_tiles(64, 64, 128, avx2, 2).blocked  # 32 KiB of weights


def _fake_cache(root, index, level, kind, size, shared):
    d = root / f"index{index}"
    d.mkdir()
    for name, value in (("level", level), ("type", kind), ("size", size),
                        ("shared_cpu_list", shared)):
        (d / name).write_text(f"{value}\n")


def test_machine_reads_sysfs_and_knows_cross_targets(tmp_path):
    _fake_cache(tmp_path, 0, 1, "Data", "48K", "0")
    _fake_cache(tmp_path, 1, 1, "Instruction", "32K", "0")
    _fake_cache(tmp_path, 2, 2, "Unified", "2048K", "0-1")
    _fake_cache(tmp_path, 3, 3, "Unified", "32M", "0-3,8-11")
    assert machine.host_caches(tmp_path) == (48 << 10, 1 << 20, 4 << 20)
    assert machine.host_caches(tmp_path / "missing") is None
    v4 = machine.describe(load_target("x86-64-v4").tvm_target())
    assert (v4.lanes, v4.vector_registers, v4.caches_from) == (16, 32, "table:x86-64-v4")
    a72 = machine.describe(load_target("rpi4").tvm_target())
    assert (a72.lanes, a72.vector_registers, a72.l2) == (4, 32, 256 << 10)
