"""token-prune: Zero-TPrune, training-free token pruning of transformer encoders (§5).

At each chosen layer the pass takes that layer's attention probabilities (the Softmax whose
output is B×H×N×N), ranks tokens with a Weighted PageRank over them (``_wpr``: head filter,
I-stage, S-stage on the layer's keys, CLS kept) and gathers the kept tokens out of the residual
stream right after the attention block (the first Add of two B×N×D activations after that
Softmax), so the MLP and every later layer run on k < N tokens. ``_wpr`` states the math:
``s^{t+1} = Aᵀ s^t`` per head, head filter on var(N·s_h), heads combined by root mean square
(the paper's "Emphasizing Informative Region"). Keep counts are static
(TopK + GatherElements), so shapes stay static and TVM compiles the result.

Everything downstream of the cut is re-shaped by following the token axis through the graph:
Reshape / Expand / Slice constants that spell N are rewritten to k, and a tensor that meets a
pruned one with N on the same axis (BERT's additive padding mask, a pooling mask) is gathered
with the same indices, so padding stays masked. Padding tokens receive no attention, hence zero
importance, and are pruned first. Ops that cannot follow a changing token count (Shape, Split,
Concat along tokens, graph outputs carrying tokens...) refuse, naming the node.

Schedule: ``keep`` is the fraction of the current tokens each chosen layer keeps; with
``flops`` > 0 the pass instead finds (by bisection) the largest uniform ``keep`` whose counted
FLOPs (``edgekit.flops``) drop by at least that fraction. ``layers`` lists 0-based attention
layers separated by "/" (``layers=1/2/3``; "" = every layer but the first and the last).
``s_ratio`` is the share of each layer's removals made by the S-stage; ``iters`` the WPR
power iterations; ``vmin``/``vmax`` the head filter's bounds on var(N·s_h); ``eir`` (1) combines
the heads by root mean square, 0 by their mean; ``cls`` the number of leading tokens always
kept. ``importance`` = wpr | colmean | random (baselines; ``seed`` picks the random scores).
Each pruning site adds its selection subgraph (about 60 ONNX nodes, 40 small TVM kernels), a
fixed cost FLOPs do not count: on a small model one early site (``layers=1``) with a lower keep
is faster than several sites with a higher keep for the same FLOPs (``bench/token_prune.py``).

Approximate by design. Budget: the check allows a norm-wise relative output error of
``BUDGET`` = 1.0 on the check samples (seeded noise plus any ``--calibration`` data): the pruned
output must stay closer to the original than the original is to zero, a guard against a broken
graph rather than an accuracy claim; accuracy is measured on real data by
``bench/token_prune.py``.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir

from edgekit import flops
from edgekit.passes._token_axis import follow_tokens, graph_info
from edgekit.passes._wpr import Emitter, emit_select
from edgekit.passes.core import Pass, PassContext, PassRefused, PassReport

BUDGET = 1.0
METHODS = ("wpr", "colmean", "random")


def _attention_softmaxes(info) -> list[onnx.NodeProto]:
    out = []
    for node in info.model.graph.node:
        shape = info.shape(node.output[0]) if node.op_type == "Softmax" else None
        if shape is not None and len(shape) == 4 and shape[-1] == shape[-2]:
            out.append(node)
    return out


def _residual_add(info, softmax: onnx.NodeProto) -> onnx.NodeProto | None:
    """The first Add after ``softmax`` joining two activations shaped (B, N, D)."""
    n = info.shape(softmax.output[0])[-1]
    seen, frontier = set(), [softmax.output[0]]
    candidates = []
    while frontier:
        value = frontier.pop()
        for node in info.consumers.get(value, []):
            if id(node) in seen:
                continue
            seen.add(id(node))
            shapes = [info.shape(x) for x in node.input]
            if (node.op_type == "Add" and len(shapes) == 2 and None not in shapes
                    and all(len(s) == 3 and s[1] == n for s in shapes) and shapes[0] == shapes[1]
                    and not any(info.is_const(x) for x in node.input)):
                candidates.append(node)
                continue
            frontier.extend(node.output)
    return min(candidates, key=info.position) if candidates else None


def _keys(info, softmax: onnx.NodeProto):
    """(value, layout, shape) of the keys feeding ``softmax``'s Q·Kᵀ MatMul, or None."""
    value = softmax.input[0]
    for _ in range(8):
        node = info.producer.get(value)
        if node is None:
            return None
        if node.op_type == "MatMul":
            kt = info.shape(node.input[1])
            return (node.input[1], "bhdn", kt) if kt is not None and len(kt) == 4 else None
        if node.op_type not in ("Add", "Mul", "Div", "Sub", "Where", "Cast"):
            return None
        live = [x for x in node.input if not info.is_const(x) and info.shape(x) is not None
                and len(info.shape(x)) == 4 and info.shape(x)[-1] == info.shape(value)[-1]]
        if not live:
            return None
        value = live[-1] if node.op_type == "Where" else live[0]
    return None


def prune_model(model: onnx.ModelProto, layers: list[int] | None, keep: float, s_ratio: float,
                cls: int, iters: int, vmin: float, vmax: float, importance: str,
                seed: int, eir: bool = True) -> tuple[onnx.ModelProto, list[dict]]:
    """The pruned copy of ``model`` and, per pruned layer, what was done."""
    info = graph_info(model)
    softmaxes = [s.name for s in _attention_softmaxes(info)]
    if not softmaxes:
        unknown = sum(n.op_type == "Softmax" and info.shape(n.output[0]) is None
                      for n in info.model.graph.node)
        hint = (f": {unknown} Softmax output(s) have no static shape (Shape/Gather chains from "
                "the exporter?); run fold-constants before token-prune") if unknown else ""
        raise PassRefused(f"no self-attention Softmax shaped (B, H, N, N) in the model{hint}")
    chosen = layers if layers is not None else list(range(1, len(softmaxes) - 1))
    bad = [i for i in chosen if not 0 <= i < len(softmaxes)]
    if bad:
        raise PassRefused(f"layer {bad[0]} does not exist: the model has {len(softmaxes)} "
                          "attention layers")
    done = []
    for layer in sorted(set(chosen)):
        softmax = next(n for n in info.model.graph.node if n.name == softmaxes[layer])
        b, h, n, _ = info.shape(softmax.output[0])
        if _elem_type(info.model, softmax.output[0]) != onnx.TensorProto.FLOAT:
            raise PassRefused("only float32 attention probabilities are supported", softmax.name)
        k = max(cls + 1, min(n, round(keep * n)))
        if k >= n:
            continue
        add = _residual_add(info, softmax)
        if add is None:
            raise PassRefused("no residual Add of two (B, N, D) activations after the "
                              "attention", softmax.name)
        r = round(s_ratio * (n - k))
        keys = _keys(info, softmax) if r else None
        if r and keys is None:
            keys = (add.output[0], "bnd", info.shape(add.output[0]))
        e = Emitter(_fresh_prefix(info.model, f"token_prune{layer}"), info.opset)
        idx = emit_select(e, softmax.output[0], (b, h, n, n), k, r, cls, iters, vmin, vmax,
                          importance, seed + layer, keys, eir)
        info = follow_tokens(info, add, e, idx, n, k, b)
        done.append({"layer": layer, "node": softmax.name, "tokens_before": n, "kept": k,
                     "s_stage": r, "keys": keys[1] if keys else None})
    return info.model, done


def _elem_type(model: onnx.ModelProto, name: str) -> int | None:
    g = model.graph
    return next((vi.type.tensor_type.elem_type for vi in [*g.value_info, *g.output]
                 if vi.name == name), None)


def _fresh_prefix(model: onnx.ModelProto, base: str) -> str:
    """``base`` or ``base_2``, ... : no name in the graph starts with it (passes may repeat)."""
    g = model.graph
    names = {x for n in g.node for x in (*n.output, n.name)} | {i.name for i in g.initializer}
    prefix, i = base, 1
    while any(name.startswith(prefix + "/") for name in names):
        i += 1
        prefix = f"{base}_{i}"
    return prefix


def _layers(text: str) -> list[int] | None:
    if not text.strip():
        return None
    try:
        return [int(x) for x in text.replace(";", " ").replace("/", " ").split()]
    except ValueError:
        raise PassRefused(f"layers={text!r}: expected space- or '/'-separated integers") from None


def apply(model: ir.Model, ctx: PassContext, keep: float = 0.7, flops_target: float = 0.0,
          layers: str = "", s_ratio: float = 0.25, cls: int = 1, iters: int = 10,
          vmin: float = 0.01, vmax: float = 1e9, eir: bool = True, importance: str = "wpr",
          seed: int = 0) -> PassReport:
    if importance not in METHODS:
        raise PassRefused(f"importance={importance!r}: expected one of {', '.join(METHODS)}")
    if not 0.0 < keep <= 1.0 or not 0.0 <= s_ratio <= 1.0 or not 0.0 <= flops_target < 1.0:
        raise PassRefused("keep must be in (0, 1], s_ratio in [0, 1], flops_target in [0, 1)")
    proto = ir.to_proto(model)
    chosen = _layers(layers)
    args = (chosen, s_ratio, cls, iters, vmin, vmax, importance, seed, eir)
    if flops_target > 0:
        base = flops.count(proto)
        lo, hi = 0.0, 1.0  # keep=lo meets the target (or is the floor), keep=hi does not
        for _ in range(12):
            mid = (lo + hi) / 2
            pruned, _ = prune_model(proto, chosen, mid, *args[1:])
            lo, hi = (mid, hi) if 1 - flops.count(pruned) / base >= flops_target else (lo, mid)
        keep = max(lo, 1e-3)
    new, done = prune_model(proto, chosen, keep, *args[1:])
    report = PassReport()
    if not done:
        report.skip("(model)", f"keep={keep:g} keeps every token at the chosen layers")
        return report
    report.change("prune-layer", len(done))
    report.details.update({"keep": round(keep, 4), "importance": importance, "layers": done})
    model.graph = ir.from_proto(new).graph  # the opset imports live on the graph
    return report


PASS = Pass(
    name="token-prune",
    summary="Zero-TPrune: drop unimportant tokens (Weighted PageRank over attention)",
    exact=False,
    apply=apply,
    params={"keep": 0.7, "flops_target": 0.0, "layers": "", "s_ratio": 0.25, "cls": 1,
            "iters": 10, "vmin": 0.01, "vmax": 1e9, "eir": True, "importance": "wpr", "seed": 0},
    budget=BUDGET,
)
