"""The client/server cut of a transformer: the embedding lookup moves to the client.

Under HE the server cannot look a row up by a secret index (a table lookup is not a
polynomial), so the client embeds its own tokens and encrypts the embeddings. ``cut_embeddings``
takes a standard export that starts at the token ids (``input_ids -> Gather(word embedding
table, input_ids) -> ...``, what transformers' exporters write) and makes that Gather's output a
graph input (``inputs_embeds``, shape ``ids.shape + (width,)``): for every ids ``I``,

    cut(table[I], other inputs) == original(I, other inputs)

exactly, since the Gather computed ``table[I]`` and nothing else is changed. Other readers of
the ids must only read their shape (``Shape``, with or without ``start``/``end``: the first
``rank(ids)`` dims of the embeddings are the ids' dims), which is what exporters add for
position and token-type ids; anything else reading the ids is refused with its name. The cut is
then checked in onnxruntime against the original on the caller's token ids (or seeded ones).

Preconditions: one Gather (axis 0) of a 2-D initializer by an integer graph input (or name the
input with ``ids``); ONNX protobuf in, protobuf out (the input model is not modified).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgekit.errors import EdgekitError

EMBEDS = "inputs_embeds"  # transformers' name for the same tensor
METADATA_KEY = "edgekit.embedding_cut"
_INT_TYPES = (onnx.TensorProto.INT32, onnx.TensorProto.INT64)
TOLERANCE = 1e-5  # max abs difference / max abs reference: only float reassociation differs


@dataclass
class Cut:
    """The server's graph (``model``) and what the client needs: ``table[ids]`` is ``embeds``."""

    model: onnx.ModelProto
    table: np.ndarray
    ids: str
    embeds: str
    max_rel: float  # the check against the original, over the samples

    def to_dict(self) -> dict[str, Any]:
        """What the reports show: which input became which, the client's table, the check."""
        return {"ids": self.ids, "embeds": self.embeds, "table_shape": list(self.table.shape),
                "max_rel": self.max_rel}

    def lookup(self, token_ids: np.ndarray) -> np.ndarray:
        """The client's part: the embeddings of ``token_ids`` (any shape, in range)."""
        token_ids = np.asarray(token_ids)
        if token_ids.size and (token_ids.min() < 0 or token_ids.max() >= len(self.table)):
            raise EdgekitError(f"token ids must be in [0, {len(self.table)}), got "
                               f"{token_ids.min()}..{token_ids.max()}")
        return self.table[token_ids]

    def client_inputs(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The cut graph's inputs from the original's: the ids become their embeddings."""
        if self.ids not in inputs:
            raise EdgekitError(f"the cut needs the token ids {self.ids!r} among the inputs")
        names = {i.name for i in self.model.graph.input}
        out = {k: v for k, v in inputs.items() if k != self.ids and k in names}
        out[self.embeds] = self.lookup(inputs[self.ids])
        return out


def _find_lookup(model: onnx.ModelProto, ids: str | None) -> onnx.NodeProto:
    inits = {t.name: t for t in model.graph.initializer}
    int_inputs = {i.name for i in model.graph.input if i.name not in inits
                  and i.type.tensor_type.elem_type in _INT_TYPES}
    found = [n for n in model.graph.node if n.op_type == "Gather"
             and len(inits.get(n.input[0], onnx.TensorProto()).dims) == 2
             and n.input[1] in int_inputs and (ids is None or n.input[1] == ids)
             and all(a.i == 0 for a in n.attribute if a.name == "axis")]
    if not found:
        what = f"input {ids!r}" if ids else "an integer graph input"
        raise EdgekitError(f"no embedding lookup to cut: no Gather of a 2-D weight table by "
                           f"{what} (export the model from its token ids)")
    if len(found) > 1:
        raise EdgekitError("several embedding lookups by graph inputs ("
                           + ", ".join(f"{n.input[0]}[{n.input[1]}]" for n in found)
                           + "): name the token-id input to cut")
    return found[0]


def _shape_of_embeds(node: onnx.NodeProto, embeds: str, rank: int) -> onnx.NodeProto:
    """``Shape(ids, start, end)`` as a Shape of the embeddings: their first ``rank`` dims."""
    attrs = {a.name: a.i for a in node.attribute}
    start, end = attrs.get("start", 0), attrs.get("end", rank)
    start, end = (v + rank if v < 0 else v for v in (start, end))
    return helper.make_node("Shape", [embeds], list(node.output), name=node.name,
                            start=max(0, min(start, rank)), end=max(0, min(end, rank)))


def _cut_graph(model: onnx.ModelProto, lookup: onnx.NodeProto) -> tuple[onnx.ModelProto, str]:
    table_name, ids, looked_up = lookup.input[0], lookup.input[1], lookup.output[0]
    graph = model.graph
    taken = {v.name for v in [*graph.input, *graph.output, *graph.value_info]} | {
        o for n in graph.node for o in n.output}
    embeds = EMBEDS if EMBEDS not in taken else f"{EMBEDS}_cut"
    ids_info = next(i for i in graph.input if i.name == ids)
    rank = len(ids_info.type.tensor_type.shape.dim)
    nodes = []
    for n in graph.node:
        if n == lookup:
            continue
        if ids in n.input:
            if n.op_type != "Shape":
                raise EdgekitError(f"the token ids {ids!r} also feed {n.op_type} node "
                                   f"{n.name or n.output[0]!r}, which needs the ids themselves: "
                                   "the lookup cannot move to the client")
            n = _shape_of_embeds(n, embeds, rank)
        copy = onnx.NodeProto()
        copy.CopyFrom(n)
        copy.input[:] = [embeds if x == looked_up else x for x in copy.input]
        nodes.append(copy)
    nodes += [helper.make_node("Identity", [embeds], [o.name])  # the lookup was an output
              for o in graph.output if o.name == looked_up]
    table = next(t for t in graph.initializer if t.name == table_name)
    info = helper.make_tensor_value_info(embeds, table.data_type, None)
    shape = info.type.tensor_type.shape
    for d in ids_info.type.tensor_type.shape.dim:
        shape.dim.add().CopyFrom(d)
    shape.dim.add().dim_value = table.dims[1]
    still_read = any(table_name in n.input for n in nodes)  # tied weights stay
    new_graph = helper.make_graph(
        nodes, graph.name, [info if i.name == ids else i for i in graph.input],
        list(graph.output),
        [t for t in graph.initializer if t.name != table_name or still_read],
        value_info=[v for v in graph.value_info if v.name != looked_up])
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.CopyFrom(new_graph)
    props = {p.key: p.value for p in model.metadata_props}
    props[METADATA_KEY] = json.dumps({"ids": ids, "embeds": embeds, "table": table_name})
    helper.set_model_props(out, props)
    return out, embeds


def _seeded(model: onnx.ModelProto, ids: str, vocab: int) -> dict[str, np.ndarray]:
    """One sample for the check when the caller gives none: dynamic dims 8, ids seeded in
    range, other integer inputs ones (masks, token types), float inputs N(0, 1)."""
    rng = np.random.default_rng(0)
    inits = {t.name for t in model.graph.initializer}
    sample = {}
    for i in model.graph.input:
        if i.name in inits:
            continue
        t = i.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else 8 for d in t.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(t.elem_type)
        if i.name == ids:
            sample[i.name] = rng.integers(0, vocab, shape).astype(dtype)
        elif np.issubdtype(dtype, np.integer):
            sample[i.name] = np.ones(shape, dtype)
        else:
            sample[i.name] = rng.standard_normal(shape).astype(dtype)
    return sample


def cut_embeddings(model: onnx.ModelProto, samples: Sequence[Mapping[str, np.ndarray]] = (),
                   ids: str | None = None) -> Cut:
    """Move the embedding lookup to the client (see the module docstring) and check the cut
    graph on ``table[ids]`` against the original on ``ids``, over ``samples`` (the original's
    inputs, real token ids) or one seeded sample."""
    from edgekit.verify import ort_session

    lookup = _find_lookup(model, ids)
    cut_model, embeds = _cut_graph(model, lookup)
    table = numpy_helper.to_array(next(t for t in model.graph.initializer
                                       if t.name == lookup.input[0]))
    cut = Cut(cut_model, table, lookup.input[1], embeds, 0.0)
    before, after = ort_session(model), ort_session(cut_model)
    for sample in samples or [_seeded(model, cut.ids, len(table))]:
        ref = before.run(None, dict(sample))
        got = after.run(None, cut.client_inputs(sample))
        for r, g in zip(ref, got, strict=True):
            scale = float(np.max(np.abs(r))) if r.size else 0.0
            diff = float(np.max(np.abs(g.astype(np.float64) - r))) if r.size else 0.0
            cut.max_rel = max(cut.max_rel, diff / scale if scale else diff)
    if not cut.max_rel <= TOLERANCE:
        raise EdgekitError(f"the cut graph differs from the original by {cut.max_rel:.3g} "
                           f"(relative; allowed {TOLERANCE:g}): not cut")
    return cut
