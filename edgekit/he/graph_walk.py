"""The node-by-node walk both CKKS runners share (per element: ``ckks``; token-packed:
``packed``). They differ only in how a ciphertext value is held and how one node acts on it.

Plaintext-only nodes (weights, shape arithmetic) run in the clear with onnx's reference
evaluator; ``Shape`` of a ciphertext is known without decrypting; every other node with an
encrypted input goes to the runner. A value is dropped right after the node that reads it last:
at ring 32768 a ciphertext is ~10 MB, and a block holds thousands of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from edgekit.errors import EdgekitError
from edgekit.onnx_nodes import attr


def plain_node(node: onnx.NodeProto, args: list) -> list[np.ndarray]:
    """Evaluate one node on plaintext arrays (``None`` for an omitted optional input)."""
    from onnx.reference import ReferenceEvaluator  # slow to import; plaintext nodes are rare

    feeds = {n: a for n, a in zip(node.input, args, strict=True) if n}
    return list(ReferenceEvaluator(node).run(None, feeds))


def last_uses(model: onnx.ModelProto) -> dict[int, list[str]]:
    """Node index -> the values it reads for the last time (graph outputs are kept)."""
    keep = {o.name for o in model.graph.output}
    last: dict[str, int] = {}
    for step, node in enumerate(model.graph.node):
        for name in node.input:
            if name and name not in keep:
                last[name] = step
    out: dict[int, list[str]] = {}
    for name, step in last.items():
        out.setdefault(step, []).append(name)
    return out


def evaluate_graph(model: onnx.ModelProto, feeds: dict[str, Any],
                   is_encrypted: Callable[[Any], bool],
                   encrypted_shape: Callable[[Any], tuple[int, ...]],
                   encrypted_node: Callable[[onnx.NodeProto, list], Any],
                   trace: Callable[[onnx.NodeProto, Any], None] | None = None) -> list[Any]:
    """Walk ``model`` on ``feeds`` (plaintext arrays and the runner's encrypted values).

    ``encrypted_node(node, args)`` computes a node with an encrypted input (its first output;
    the runners evaluate single-output ops only); ``trace(node, value)`` sees each result."""
    values: dict[str, Any] = dict(feeds)
    for init in model.graph.initializer:
        values[init.name] = numpy_helper.to_array(init)
    last = last_uses(model)
    for step, node in enumerate(model.graph.node):
        missing = [i for i in node.input if i and i not in values]
        if missing:
            raise EdgekitError(f"node {node.name!r} ({node.op_type}) reads {missing[0]!r}, "
                               "which no input, initializer or earlier node provides")
        args = [values[i] if i else None for i in node.input]
        for name in last.get(step, ()):
            values.pop(name, None)
        if not any(is_encrypted(a) for a in args):
            for name, value in zip(node.output, plain_node(node, args), strict=False):
                values[name] = value
        elif node.op_type == "Shape":
            shape = np.array(encrypted_shape(args[0]), dtype=np.int64)
            values[node.output[0]] = shape[attr(node, "start", 0):attr(node, "end", None)]
        else:
            values[node.output[0]] = encrypted_node(node, args)
            if trace is not None:
                trace(node, values[node.output[0]])
    return [values[o.name] for o in model.graph.output]
