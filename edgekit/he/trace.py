"""``he-run --trace``: every intermediate ciphertext against the plaintext run of the graph.

A debugging aid, not a deployment mode: the runner decrypts each ciphertext result as it is
produced (so the client sees everything) and compares it with the same tensor of one
onnxruntime run, recording the relative and max-abs error and the levels left. A sudden
jump in the error pinpoints the node (scale drift, exhausted headroom, noisy rotations).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from edgekit.he.seal import Ct


@dataclass
class TraceRow:
    """One ciphertext result compared with the plaintext run of the same graph."""

    name: str
    op: str
    layout: str
    levels_left: int
    rel_error: float
    max_abs: float

    def to_dict(self) -> dict:
        return {"name": self.name, "op": self.op, "layout": self.layout,
                "levels_left": self.levels_left, "rel_error": self.rel_error,
                "max_abs": self.max_abs}


def reference_values(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict:
    """Every float tensor of a plaintext onnxruntime run (for the per-node trace)."""
    from edgekit.verify import ort_session

    inferred = onnx.shape_inference.infer_shapes(model)
    proto = onnx.ModelProto()
    proto.CopyFrom(model)
    known = {o.name for o in proto.graph.output}
    for vi in inferred.graph.value_info:
        if vi.name not in known and vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            proto.graph.output.append(vi)
    names = [o.name for o in proto.graph.output]
    return dict(zip(names, ort_session(proto).run(None, feeds), strict=True))


def _levels(value) -> int:
    first = next(iter(np.reshape(value.cts if hasattr(value, "cts") else value, -1)))
    return first.m - 1 if isinstance(first, Ct) else -1


class Recorder:
    """Collects a TraceRow per ciphertext result; ``decrypt`` turns a value into an array."""

    def __init__(self, model: onnx.ModelProto, feeds: dict[str, np.ndarray],
                 decrypt: Callable):
        self.ref = reference_values(model, feeds)
        self.decrypt = decrypt
        self.rows: list[TraceRow] = []

    def record(self, node: onnx.NodeProto, layouts: dict) -> None:
        for layout, value in layouts.items():
            got, want = self.decrypt(value), self.ref.get(node.output[0])
            if want is None or np.shape(want) != np.shape(got):
                continue
            err = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
            self.rows.append(TraceRow(node.output[0], node.op_type, layout, _levels(value),
                                      err, float(np.max(np.abs(got - want)))))
