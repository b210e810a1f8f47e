"""Test models for the normalization passes: small hand-built residual graphs (any dtype,
any norm form) and cached exports of tiny-gpt, tiny-vit and transformers' GPT2 / BERT."""

from __future__ import annotations

import functools

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgekit.verify import TensorSpec, run_ort

TOKENS, WIDTH, VOCAB = 6, 16, 32
NORMS = ("ln", "div", "reciprocal", "pow", "mul_square", "fused")


class _Graph:
    def __init__(self, dtype, seed: int):
        self.dtype, self.rng = np.dtype(dtype), np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, array) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(array, self.dtype), name))
        return name

    def rand(self, name: str, *shape: int, scale=1.0, offset=0.0) -> str:
        return self.const(name, self.rng.standard_normal(shape) * scale + offset)

    def node(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def norm(self, x: str, name: str, kind: str) -> str:
        """LayerNormalization ("ln") or an RMSNorm written one of several ways (γ, β kept)."""
        gamma = self.rand(f"{name}.weight", WIDTH, scale=0.2, offset=1.0)
        beta = self.rand(f"{name}.bias", WIDTH, scale=0.1)
        if kind == "ln":
            return self.node("LayerNormalization", [x, gamma, beta], name, epsilon=1e-5)
        if kind == "fused":
            y = self.node("RMSNormalization", [x, gamma], f"{name}.rms", epsilon=1e-5,
                          stash_type=11 if self.dtype == np.float64 else 1)
            return self.node("Add", [y, beta], name)
        two = self.const(f"{name}.two", 2.0)
        sq = (self.node("Mul", [x, x], f"{name}.sq") if kind == "mul_square" else
              self.node("Pow", [x, two], f"{name}.sq"))
        axes = f"{name}.axes"
        self.inits.append(numpy_helper.from_array(np.array([-1], np.int64), axes))
        ms = self.node("ReduceMean", [sq, axes], f"{name}.ms")
        ms = self.node("Add", [ms, self.const(f"{name}.eps", 1e-5)], f"{name}.mse")
        if kind == "pow":
            r = self.node("Pow", [ms, self.const(f"{name}.p", -0.5)], f"{name}.r")
            y = self.node("Mul", [x, r], f"{name}.n")
        elif kind == "reciprocal":
            r = self.node("Reciprocal", [self.node("Sqrt", [ms], f"{name}.s")], f"{name}.r")
            y = self.node("Mul", [r, x], f"{name}.n")
        else:
            y = self.node("Div", [x, self.node("Sqrt", [ms], f"{name}.s")], f"{name}.n")
        return self.node("Add", [self.node("Mul", [y, gamma], f"{name}.g"), beta], name)


def residual_model(dtype=np.float32, *, norm: str = "ln", blocks: int = 2, head: str = "matmul",
                   tied: bool = False, post_ln: bool = False, tap: bool = False,
                   final_output: bool = False, centre: bool = False, layer_scale: bool = False,
                   seed: int = 0, opset: int = 20) -> onnx.ModelProto:
    """Token + position embedding, ``blocks`` MLP blocks on a residual stream, final norm, head.

    head: "matmul" (MatMul + bias Add), "matmul_nobias", "gemm" (Gemm, W[in, out]) or "gemm_t"
    (Gemm transB=1 on W[out, in]; with ``tied`` it reuses the embedding table initializer).
    post_ln puts the norms after the residual Add (BERT); tap adds a Tanh output that reads
    the stream directly; final_output also returns the final norm's output; centre makes
    every writer zero-mean over the channel (the precondition of rmsnorm-to-crmsnorm);
    layer_scale multiplies each branch by a per-channel constant before the residual Add.
    """
    g = _Graph(dtype, seed)
    dense = functools.partial(_centred, centre)
    table = g.const("wte", dense(g.rng.standard_normal((VOCAB, WIDTH)) + 0.5))
    pos = g.const("wpe", dense(g.rng.standard_normal((TOKENS, WIDTH)) * 0.3 + 0.2))
    h = g.node("Add", [g.node("Gather", [table, "input_ids"], "embed"), pos], "embed_add")
    for i in range(blocks):
        a = h if post_ln else g.norm(h, f"ln{i}", norm)
        u = g.node("Add", [g.node("MatMul", [a, g.rand(f"w1_{i}", WIDTH, 4 * WIDTH,
                                                        scale=0.3)], f"fc1_{i}"),
                           g.rand(f"b1_{i}", 4 * WIDTH, scale=0.1)], f"fc1_bias_{i}")
        u = g.node("Tanh", [u], f"act_{i}")
        w2 = dense(g.rng.standard_normal((4 * WIDTH, WIDTH)) * 0.2
                   + g.rng.standard_normal((4 * WIDTH, 1)) * 0.1)
        b2 = dense(g.rng.standard_normal(WIDTH) * 0.1 + 0.3)
        v = g.node("Add", [g.node("MatMul", [u, g.const(f"w2_{i}", w2)], f"fc2_{i}"),
                           g.const(f"b2_{i}", b2)], f"fc2_bias_{i}")
        if layer_scale:
            v = g.node("Mul", [g.rand(f"ls_{i}", WIDTH, scale=0.3, offset=0.5), v], f"scale_{i}")
        h = g.node("Add", [h, v], f"residual_{i}")
        if post_ln:
            h = g.norm(h, f"ln{i}", norm)
        if tap and i == 0:
            g.node("Tanh", [h], "tap")
    f = h if post_ln else g.norm(h, "ln_f", norm)
    outputs = [_head(g, f, head, tied, table)]
    outputs += ["tap"] * tap + [f] * final_output
    shape = {o: [1, TOKENS, WIDTH] for o in ("tap", f)}
    graph = helper.make_graph(
        g.nodes, "residual",
        [helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, [1, TOKENS])],
        [helper.make_tensor_value_info(o, helper.np_dtype_to_tensor_dtype(g.dtype),
                                       shape.get(o)) for o in outputs],
        g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def as_input(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """``model`` with initializer ``name`` turned into a graph input (no longer a constant)."""
    init = next(i for i in model.graph.initializer if i.name == name)
    model.graph.initializer.remove(init)
    model.graph.input.append(helper.make_tensor_value_info(name, init.data_type, init.dims))
    return model


def _centred(on: bool, w: np.ndarray) -> np.ndarray:
    return w - w.mean(axis=-1, keepdims=True) if on else w


def _head(g: _Graph, f: str, head: str, tied: bool, table: str) -> str:
    if head.startswith("matmul"):
        y = g.node("MatMul", [f, g.rand("head_w", WIDTH, VOCAB, scale=0.3)], "head")
        return y if head == "matmul_nobias" else g.node(
            "Add", [y, g.rand("head_b", VOCAB, scale=0.1)], "head_bias")
    flat = g.node("Reshape", [f, "flat_shape"], "flatten")
    g.inits.append(numpy_helper.from_array(np.array([-1, WIDTH], np.int64), "flat_shape"))
    if head == "gemm":
        w = g.rand("head_w", WIDTH, VOCAB, scale=0.3)
        return g.node("Gemm", [flat, w, g.rand("head_b", VOCAB)], "head", alpha=0.5, beta=2.0)
    w = table if tied else g.rand("head_w", VOCAB, WIDTH, scale=0.3)
    return g.node("Gemm", [flat, w], "head", transB=1)


def ids(seed: int = 0, tokens: int = TOKENS, vocab: int = VOCAB) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(0, vocab, (1, tokens)).astype(np.int64)}


def samples(n: int = 3, tokens: int = TOKENS, vocab: int = VOCAB) -> list[dict]:
    """Token ids over the whole vocabulary (edgekit's seeded ints are only 0/1)."""
    return [ids(s, tokens, vocab) for s in range(n)]


def rel_error(a: onnx.ModelProto, b: onnx.ModelProto, feeds: list[dict]) -> float:
    """Worst norm-wise relative error over all outputs and feeds."""
    worst = 0.0
    for feed in feeds:
        for x, y in zip(run_ort(a, feed), run_ort(b, feed), strict=True):
            assert x.shape == y.shape
            worst = max(worst, float(np.abs(x - y).max() / np.abs(y).max()))
    return worst


def op_count(model: onnx.ModelProto, op: str) -> int:
    return sum(n.op_type == op for n in model.graph.node)


def builtin_feeds(name: str) -> list[dict[str, np.ndarray]]:
    """Inputs for a built-in graph: token ids over the vocabulary, or seeded images."""
    from edgekit.passes.core import load_samples

    if name == "tiny-gpt":
        return samples(tokens=16, vocab=256)
    return load_samples(builtin(name), seeds=3)


@functools.cache
def builtin(name: str) -> onnx.ModelProto:
    """A built-in graph (``graphs/``) exported once per test session."""
    from edgekit.graphs import available

    from edgekit.export import export_module

    info = available()[name]
    specs = [TensorSpec(n, s, d) for n, s, d in info.inputs]
    return export_module(info.build(), specs)


@functools.cache
def hf_model(kind: str):
    """(torch module, exported ONNX) for a small random transformers GPT2Model / BertModel."""
    import torch
    from edgekit.graphs._init_utils import randomize_norm_stats
    from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

    from edgekit.export import export_module

    torch.manual_seed(0)
    if kind == "gpt2":
        config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=32,
                            bos_token_id=0, eos_token_id=0, use_cache=False,
                            attn_implementation="eager")
        model = GPT2Model(config)
    else:
        config = BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=128,
                            max_position_embeddings=32, attn_implementation="eager")
        model = BertModel(config, add_pooling_layer=False)
    with torch.no_grad():  # trained-like: non-zero biases and a common-mode component
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1 + 0.1)
            if "wte" in name or "word_embeddings" in name:
                p.add_(0.3)
    model = randomize_norm_stats(model, 0)

    class LastHidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            return self.model(input_ids=input_ids).last_hidden_state

    module = LastHidden().eval()
    return module, export_module(module, [TensorSpec("input_ids", (1, 8), "int64")])


def naive_rmsnorm(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every LayerNormalization replaced by RMSNorm·γ + β WITHOUT recentring the stream."""
    import onnx_ir as ir

    from edgekit.passes._ir import Builder, attr, const_array
    from edgekit.passes.ln_to_rmsnorm import emit_rms

    work = ir.from_proto(model)
    b = Builder(work.graph)
    for ln in [n for n in work.graph if n.op_type == "LayerNormalization"]:
        beta = const_array(ln.inputs[2]) if len(ln.inputs) > 2 else None
        y = emit_rms(b, ln, ln.inputs[0], attr(ln, "epsilon", 1e-5), const_array(ln.inputs[1]),
                     beta, fused=False)
        b.redirect(ln.outputs[0], y)
        work.graph.remove(ln, safe=True)
    return ir.to_proto(work)
