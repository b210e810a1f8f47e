"""An encrypted run checked against onnxruntime: what ``edgekit he-run`` reports.

``ckks.run`` encrypts the inputs, evaluates the graph on ciphertexts and decrypts; here the
same inputs also go through onnxruntime in plaintext, and each output gets its norm-wise
relative error ``‖he − ort‖ / ‖ort‖``. Both sides evaluate the same (polynomial) graph, so
the error is CKKS's own noise and rescaling, not the polynomial approximation's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from edgekit.he import ckks
from edgekit.verify import run_ort


@dataclass
class HERun:
    outputs: dict[str, np.ndarray]  # decrypted, by output name
    reference: dict[str, np.ndarray]  # onnxruntime on the plaintext inputs
    relative_error: dict[str, float]
    params: ckks.Params
    depth: int
    packing: str
    seconds: dict[str, float]  # keys, encrypt, evaluate, decrypt
    trace: list | None = None  # edgekit.he.trace.TraceRow per ciphertext result
    cut: dict | None = None  # the client/server cut made first (``he.cut.Cut.to_dict``)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "params": self.params.to_dict(), "depth": self.depth, "packing": self.packing,
            "seconds": {k: round(v, 4) for k, v in self.seconds.items()},
            "relative_error": self.relative_error,
        }
        if self.trace is not None:
            data["trace"] = [row.to_dict() for row in self.trace]
        if self.cut is not None:
            data["cut"] = self.cut
        return data


def relative_error(got: np.ndarray, ref: np.ndarray) -> float:
    """``‖got − ref‖ / ‖ref‖`` (an all-zero reference divides by 1e-30, not by zero)."""
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))


def run_against_ort(model: onnx.ModelProto, inputs: Mapping[str, np.ndarray],
                    plain_inputs: Iterable[str] = (), scale_bits: int | None = None,
                    packed: bool = False, trace: bool = False) -> HERun:
    """``ckks.run`` on ``inputs``, then onnxruntime on the same inputs; see the module doc."""
    feeds = dict(inputs)
    result = ckks.run(model, feeds, tuple(plain_inputs), scale_bits, packed=packed,
                      trace=trace)
    names = [o.name for o in model.graph.output]
    outputs = dict(zip(names, result.outputs, strict=True))
    reference = dict(zip(names, run_ort(model, feeds), strict=True))
    return HERun(outputs, reference,
                 {n: relative_error(outputs[n], reference[n]) for n in names},
                 result.params, result.depth, result.packing, result.seconds, result.trace)
