"""Small transformer exports the pass tests share: TorchScript export (seconds, where the
dynamo exporter takes a minute) with its Shape chains folded by onnxruntime."""

from __future__ import annotations

import onnx


def export(net, args: tuple, names: list[str], fold: bool = True,
           dynamic: dict | None = None) -> onnx.ModelProto:
    """TorchScript export: seconds instead of the dynamo exporter's minute (bench/ uses that);
    ``fold``: fold its Shape chains into constants; ``dynamic``: torch's dynamic_axes."""
    import io
    import warnings

    import torch

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, args, buf, input_names=names, dynamo=False, opset_version=18,
                          dynamic_axes=dynamic)
    model = onnx.load_from_string(buf.getvalue())
    return static_shapes(model) if fold else model


def static_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime's basic (constant-folding) optimization: TorchScript's Shape chains go."""
    import tempfile
    from pathlib import Path

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as d:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(Path(d) / "folded.onnx")
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return onnx.load(so.optimized_model_filepath)


def tiny_bert_export(fold: bool = True, dynamic: dict | None = None,
                     layers: int = 2) -> onnx.ModelProto:
    """A ``layers``-layer BERT (random weights) with masked mean pooling, as in
    sentence-transformers."""
    import torch
    import transformers as tf

    cfg = tf.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=32,
                        attn_implementation="eager")
    torch.manual_seed(0)
    bert = tf.BertModel(cfg, add_pooling_layer=False).eval()

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask[..., None].to(h.dtype)
            return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)

    ones = torch.ones(1, 16, dtype=torch.int64)
    return export(Pooled().eval(), (ones, ones), ["input_ids", "attention_mask"], fold, dynamic)
