"""Symbolic shapes through the TVM backend (issue 17 item 3): one library for every length in
the bounds, checked against onnxruntime at the check points; kernels with a symbolic extent
get a schedule (not the naive loop nest); tuning a symbolic model refuses in one line."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgekit import compiler, verify
from edgekit.compiler import pipeline, schedules
from edgekit.compiler.frontend import to_relax
from edgekit.errors import EdgekitError
from edgekit.targets import load_target
from edgekit.verify import TensorSpec

HIDDEN, HEADS, VOCAB, MAX_LEN = 32, 2, 50, 40
SPECS = [TensorSpec("input_ids", (1, "seq"), "int64"),
         TensorSpec("attention_mask", (1, "seq"), "int64")]
BOUNDS = {"seq": (1, MAX_LEN)}


def tiny_bert() -> onnx.ModelProto:
    """One BERT-like layer with dynamic ``seq``, as torch's dynamo exporter writes it:
    positions by ``Range(0, Shape(ids)[1], 1)``, heads by ``Reshape(.., [1, -1, 2, 16])``,
    ``seq x seq`` attention scores with the padding mask added, masked mean pooling."""
    rng = np.random.default_rng(0)
    d, h = HIDDEN, HIDDEN // HEADS
    inits = {"wte": rng.standard_normal((VOCAB, d)), "wpe": rng.standard_normal((MAX_LEN, d)),
             "ln_g": 1 + 0.1 * rng.standard_normal(d), "ln_b": 0.1 * rng.standard_normal(d),
             "wq": rng.standard_normal((d, d)) / 6, "wk": rng.standard_normal((d, d)) / 6,
             "wv": rng.standard_normal((d, d)) / 6, "wo": rng.standard_normal((d, d)) / 6,
             "w1": rng.standard_normal((d, 4 * d)) / 6, "w2": rng.standard_normal((4 * d, d)) / 6,
             "scale": np.array(h ** -0.5), "big": np.array(-1e4), "one": np.array(1.0)}
    tensors = [helper.make_tensor(k, TensorProto.FLOAT, np.shape(v), np.ravel(v).astype(
        np.float32)) for k, v in inits.items()]
    tensors += [helper.make_tensor(k, TensorProto.INT64, np.shape(v), np.ravel(v)) for k, v in {
        "i0": np.array(0), "i1": np.array(1), "heads": np.array([1, -1, HEADS, h]),
        "flat": np.array([1, -1, d]), "ax1": np.array([1]), "ax2": np.array([2]),
        "ax12": np.array([1, 2])}.items()]
    n = helper.make_node
    nodes = [
        n("Shape", ["input_ids"], ["len1"], start=1, end=2), n("Squeeze", ["len1"], ["len"]),
        n("Range", ["i0", "len", "i1"], ["pos"]),
        n("Gather", ["wte", "input_ids"], ["tok"]), n("Gather", ["wpe", "pos"], ["pe"]),
        n("Add", ["tok", "pe"], ["emb"]),
        n("LayerNormalization", ["emb", "ln_g", "ln_b"], ["x"], axis=-1),
        *[n("MatMul", ["x", f"w{c}"], [f"{c}0"]) for c in "qkv"],
        *[n("Reshape", [f"{c}0", "heads"], [f"{c}1"]) for c in "qkv"],
        n("Transpose", ["q1"], ["q"], perm=[0, 2, 1, 3]),
        n("Transpose", ["k1"], ["kt"], perm=[0, 2, 3, 1]),
        n("Transpose", ["v1"], ["v"], perm=[0, 2, 1, 3]),
        n("MatMul", ["q", "kt"], ["s0"]), n("Mul", ["s0", "scale"], ["s1"]),
        n("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
        n("Sub", ["one", "mf"], ["mi"]), n("Mul", ["mi", "big"], ["mb"]),
        n("Unsqueeze", ["mb", "ax12"], ["m4"]), n("Add", ["s1", "m4"], ["s2"]),
        n("Softmax", ["s2"], ["p"], axis=-1), n("MatMul", ["p", "v"], ["c0"]),
        n("Transpose", ["c0"], ["c1"], perm=[0, 2, 1, 3]), n("Reshape", ["c1", "flat"], ["c"]),
        n("MatMul", ["c", "wo"], ["o"]), n("Add", ["o", "x"], ["r"]),
        n("MatMul", ["r", "w1"], ["f0"]), n("Gelu", ["f0"], ["f1"]),
        n("MatMul", ["f1", "w2"], ["f2"]), n("Add", ["f2", "r"], ["y"]),
        n("Unsqueeze", ["mf", "ax2"], ["mt"]),  # (1, seq, 1): mean pooling over the mask
        n("Mul", ["y", "mt"], ["ym"]),
        n("ReduceSum", ["ym", "ax1"], ["num"], keepdims=0),
        n("ReduceSum", ["mt", "ax1"], ["den"], keepdims=0), n("Div", ["num", "den"], ["emb_out"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_bert",
        [helper.make_tensor_value_info(s.name, TensorProto.INT64, [1, "seq"]) for s in SPECS],
        [helper.make_tensor_value_info("emb_out", TensorProto.FLOAT, [1, d])], tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    onnx.checker.check_model(model)
    return model


def test_one_library_serves_every_length(tmp_path):
    """Compiled once with ``seq`` symbolic, the library matches onnxruntime at both bounds and
    an odd length between, and at other lengths; the build reports how it serves them."""
    model, target = tiny_bert(), load_target("host")
    mod = to_relax(model, SPECS, tvm_target=target.tvm_target(), dim_bounds=BOUNDS)
    assert mod["main"].attrs["tir_var_upper_bound"]["seq"] == MAX_LEN
    info: dict = {}
    library = tmp_path / "model.so"
    compiler.export_library(compiler.build(mod, target, info=info), target, library)
    assert info["shapes"] == {"dims": {"seq": [1, MAX_LEN]}, "buckets": [], "mode": "symbolic"}
    outputs = [TensorSpec("emb_out", (1, HIDDEN), "float32")]
    found = compiler.check_library(library, model, SPECS, outputs, target, 1e-5, 1e-4,
                                   dim_bounds=BOUNDS)
    assert [c.name for c in found] == [f"emb_out [seq={n}]" for n in (1, MAX_LEN, 21)]
    assert all(c.ok for c in found), found
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), tvm.cpu())
    session = verify.ort_session(model)
    for length in (2, 5, 16, 33):
        x = {"input_ids": np.arange(length, dtype=np.int64)[None] % VOCAB,
             "attention_mask": (np.arange(length) < length - 1).astype(np.int64)[None]}
        got = vm["main"](*(tvm.runtime.tensor(a) for a in x.values())).numpy()
        ref = session.run(None, x)[0]
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max(), length


def test_symbolic_kernels_get_schedules():
    """Every kernel of the symbolic model is scheduled; the dense layers (symbolic rows) get
    the padded register tile: rows padded to the tile, vector loops, the naive nest gone."""
    target = load_target("host")
    tvm_target = target.tvm_target()
    mod = pipeline.lower(to_relax(tiny_bert(), SPECS, tvm_target=tvm_target,
                                  dim_bounds=BOUNDS), tvm_target)
    scheduled, count = schedules.apply_default(mod, tvm_target)
    assert count == pipeline.kernel_count(mod)
    dense = [f.script() for gv, f in scheduled.functions.items()
             if gv.name_hint.startswith("fused_matmul") and "gelu" in gv.name_hint]
    assert dense, [gv.name_hint for gv in scheduled.functions]
    text = dense[0]
    assert "seq" in text and "_pad" in text and "T.vectorized" in text and "T.unroll" in text


def test_symbolic_refusals():
    """A symbolic dim without bounds, and tuning a symbolic model: one-line errors."""
    target = load_target("host")
    with pytest.raises(EdgekitError, match="--dim seq=LO..HI"):
        to_relax(tiny_bert(), SPECS)
    mod = to_relax(tiny_bert(), SPECS, dim_bounds=BOUNDS)
    with pytest.raises(EdgekitError, match="tuning needs static shapes; dim 'seq'") as err:
        pipeline.prepare(mod, target, compiler.TuningRequest(True, 1, None, None))
    assert "\n" not in str(err.value)


def test_static_length_of_a_dynamic_export():
    """The same ONNX with ``seq`` fixed by the specs imports too (TVM's own Range import
    would leave a fresh shape variable that breaks the ``Reshape(.., -1)`` after it)."""
    static = [TensorSpec(s.name, (1, 7), s.dtype) for s in SPECS]
    text = to_relax(tiny_bert(), static)["main"].script()
    assert 'R.Tensor((1, 32), dtype="float32")' in text


def test_torchscript_dynamic_axes_export_compiles(tmp_path):
    """transformers' BERT through torch's TorchScript exporter with ``dynamic_axes``, as
    exported (Shape chains not folded): its scalar ``ConstantOfShape`` (of an empty shape) is
    rewritten by ``tidy_onnx`` (TVM's import failed on it), and one library serves every
    length, checked against onnxruntime at the check points."""
    from _exports import tiny_bert_export

    from edgekit import api
    from edgekit.compiler.frontend import tidy_onnx

    def count(m: onnx.ModelProto) -> int:
        return sum(n.op_type == "ConstantOfShape" for n in m.graph.node)

    model = tiny_bert_export(fold=False, dynamic={"input_ids": {1: "seq"},
                                                  "attention_mask": {1: "seq"}})
    assert count(tidy_onnx(model)) == count(model) - 1  # the scalar one
    path = tmp_path / "bert_ts.onnx"
    onnx.save(model, path)
    result = api.compile(path, "host", tmp_path / "bert.edgekit",
                         inputs=api.InputSpecs([], {"seq": (1, 32)}))
    assert result.manifest["shapes"]["dims"] == {"seq": [1, 32]}
