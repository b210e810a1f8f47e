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
importance, and are pruned first. A symbolic token count (``edgekit.shapes``: attention
over ``seq`` tokens) is refused with "needs a static token count": the keep counts are
static TopK sizes. Ops that cannot follow a changing token count (Shape, Split, Concat along
tokens, graph outputs carrying tokens...) refuse, naming the node. A Softmax that
is not (B, H, N, N) attention, and a layer whose ``keep`` keeps every token, are skipped with
the reason; a layer whose keys cannot be traced back to Q·Kᵀ compares tokens by the residual
stream in the S-stage, and its entry in the details says why (``keys_from_stream``).

Schedule: ``keep`` is the fraction of the current tokens each chosen layer keeps; with
``flops`` > 0 the pass instead finds (by bisection) the largest uniform ``keep`` whose counted
FLOPs (``edgekit.flops``) drop by at least that fraction. ``layers`` lists 0-based attention
layers separated by "/" (``layers=1/2/3``; "" = the recommended schedule, one site at layer
``L // 3`` of L attention layers: layer 2 of all-MiniLM-L6-v2, the measured setting of
docs/token-pruning.md, where the former default, every layer but the first and the last,
failed the check at keep=0.7 with error 1.25).
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

import onnx_ir as ir

from edgekit import flops
from edgekit.passes._ir import Builder, const_array, static_shape
from edgekit.passes._token_axis import follow_tokens, infer_shapes
from edgekit.passes._wpr import Keys, emit_select
from edgekit.passes.core import Pass, PassContext, PassRefused, PassReport

BUDGET = 1.0
METHODS = ("wpr", "colmean", "random")


def _attention_softmaxes(graph: ir.Graph, report: PassReport | None) -> list[ir.Node]:
    """The Softmax nodes whose output is (B, H, N, N); the others are skipped, with why."""
    out = []
    for node in (n for n in graph if n.op_type == "Softmax"):
        shape = static_shape(node.outputs[0])
        if shape is not None and len(shape) == 4 and shape[-1] == shape[-2]:
            out.append(node)
        elif report is not None:
            report.skip(node.name, "its output has no static shape to show (B, H, N, N)"
                        if shape is None else
                        f"not self-attention: its output is {shape}, not (B, H, N, N)")
    return out


def _residual_add(softmax: ir.Node) -> ir.Node | None:
    """The first Add after ``softmax`` joining two activations shaped (B, N, D)."""
    n = static_shape(softmax.outputs[0])[-1]
    seen, frontier = set(), [softmax.outputs[0]]
    candidates = []
    while frontier:
        value = frontier.pop()
        for node in (use.node for use in value.uses()):
            if node in seen:
                continue
            seen.add(node)
            shapes = [static_shape(x) for x in node.inputs]
            if (node.op_type == "Add" and len(shapes) == 2 and None not in shapes
                    and all(len(s) == 3 and s[1] == n for s in shapes) and shapes[0] == shapes[1]
                    and not any(const_array(x) is not None for x in node.inputs)):
                candidates.append(node)
                continue
            frontier.extend(node.outputs)
    if not candidates:
        return None
    position = {node: i for i, node in enumerate(softmax.graph)}
    return min(candidates, key=position.__getitem__)


def _keys(softmax: ir.Node) -> Keys | str:
    """(value, layout, shape) of the keys feeding ``softmax``'s Q·Kᵀ MatMul, or why not."""
    value = softmax.inputs[0]
    for _ in range(8):
        node = value.producer()
        if node is None:
            return f"{value.name!r} before the Softmax is not computed by a node"
        if node.op_type == "MatMul":
            kt = static_shape(node.inputs[1])
            if kt is None or len(kt) != 4:
                return f"the right operand of MatMul {node.name!r} is not a static 4-D Kᵀ"
            return node.inputs[1], "bhdn", kt
        if node.op_type not in ("Add", "Mul", "Div", "Sub", "Where", "Cast"):
            return f"{node.op_type} {node.name!r} stands between the Softmax and Q·Kᵀ"
        width = static_shape(value)[-1]
        live = [x for x in node.inputs if const_array(x) is None and
                (shape := static_shape(x)) is not None and len(shape) == 4 and shape[-1] == width]
        if not live:
            return f"no input of {node.op_type} {node.name!r} carries the attention logits"
        value = live[-1] if node.op_type == "Where" else live[0]
    return "no Q·Kᵀ MatMul within 8 nodes before the Softmax"


def _symbolic_tokens(graph: ir.Graph, inputs_too: bool) -> str:
    """Why the token count is symbolic (keep counts are static: k of N needs N), or "". Only
    a model with a named symbolic input dim has one: then an attention Softmax (rank 4) over
    a length that is not a number, or (``inputs_too``: no static attention was found) that
    input. In a model with static inputs an unknown length is a shape inference could not
    see (Shape chains), which fold-constants may fix."""
    symbolic = [(v.name, _dim_name(d)) for v in graph.inputs for d in (v.shape or ())
                if _dim_name(d)]
    if not symbolic:
        return ""
    for node in graph:
        shape = node.outputs[0].shape if node.op_type == "Softmax" else None
        if shape is not None and len(shape) == 4 and not isinstance(shape[-1], int):
            return (f"attention {node.name} is over a symbolic number of tokens "
                    f"({_dim_name(shape[-1]) or '?'}); give a fixed length "
                    "(--input NAME:1x128)")
    name, dim = symbolic[0]
    return (f"input {name!r} has the symbolic dim {dim!r}; give a fixed length "
            f"(--input {name}:1x128)") if inputs_too else ""


def _dim_name(dim) -> str:
    """A symbolic dim's name ("" for a number or an unnamed unknown dim)."""
    return "" if isinstance(dim, int) else str(getattr(dim, "value", None) or "")


def prune(model: ir.Model, layers: list[int] | None, keep: float, s_ratio: float, cls: int,
          iters: int, vmin: float, vmax: float, importance: str, seed: int, eir: bool = True,
          report: PassReport | None = None) -> list[dict]:
    """Prune ``model`` in place; per pruned layer, what was done. ``report`` (if given) gets
    the Softmax nodes and layers left alone, with the reason."""
    infer_shapes(model)
    graph = model.graph
    symbolic = _symbolic_tokens(graph, inputs_too=False)
    if symbolic:
        raise PassRefused(f"needs a static token count: {symbolic}")
    softmaxes = _attention_softmaxes(graph, report)
    if not softmaxes:
        symbolic = _symbolic_tokens(graph, inputs_too=True)
        if symbolic:
            raise PassRefused(f"needs a static token count: {symbolic}")
        unknown = sum(n.op_type == "Softmax" and static_shape(n.outputs[0]) is None
                      for n in graph)
        hint = (f": {unknown} Softmax output(s) have no static shape (Shape/Gather chains from "
                "the exporter?); run fold-constants before token-prune") if unknown else ""
        raise PassRefused(f"no self-attention Softmax shaped (B, H, N, N) in the model{hint}")
    chosen = layers if layers is not None else [len(softmaxes) // 3]
    bad = [i for i in chosen if not 0 <= i < len(softmaxes)]
    if bad:
        raise PassRefused(f"layer {bad[0]} does not exist: the model has {len(softmaxes)} "
                          "attention layers")
    b = Builder(graph)
    done = []
    for layer in sorted(set(chosen)):
        softmax = softmaxes[layer]
        bs, h, n, _ = static_shape(softmax.outputs[0])
        if softmax.outputs[0].dtype != ir.DataType.FLOAT:
            raise PassRefused("only float32 attention probabilities are supported", softmax.name)
        k = max(cls + 1, min(n, round(keep * n)))
        if k >= n:
            if report is not None:
                report.skip(softmax.name, f"layer {layer}: keep={keep:g} keeps all {n} tokens")
            continue
        add = _residual_add(softmax)
        if add is None:
            raise PassRefused("no residual Add of two (B, N, D) activations after the "
                              "attention", softmax.name)
        r = round(s_ratio * (n - k))
        keys = _keys(softmax) if r else None
        entry = {"layer": layer, "node": softmax.name, "tokens_before": n, "kept": k,
                 "s_stage": r}
        if isinstance(keys, str):  # the S-stage compares tokens by their residual stream
            entry["keys_from_stream"] = keys
            keys = (add.outputs[0], "bnd", static_shape(add.outputs[0]))
        at = b.at(add, after=True, hint=f"token_prune{layer}")
        idx = emit_select(at, softmax.outputs[0], (bs, h, n, n), k, r, cls, iters, vmin, vmax,
                          importance, seed + layer, keys, eir)
        follow_tokens(at, add, idx, n, k, bs)
        infer_shapes(model)
        done.append(entry | {"keys": keys[1] if keys else None})
    return done


def _layers(text: str) -> list[int] | None:
    if not text.strip():
        return None
    try:
        return [int(x) for x in text.replace(";", " ").replace("/", " ").split()]
    except ValueError:
        raise PassRefused(f"layers={text!r}: expected space- or '/'-separated integers") from None


def apply(model: ir.Model, ctx: PassContext, *, keep: float = 0.7, flops_target: float = 0.0,
          layers: str = "", s_ratio: float = 0.25, cls: int = 1, iters: int = 10,
          vmin: float = 0.01, vmax: float = 1e9, eir: bool = True, importance: str = "wpr",
          seed: int = 0) -> PassReport:
    if importance not in METHODS:
        raise PassRefused(f"importance={importance!r}: expected one of {', '.join(METHODS)}")
    if not 0.0 < keep <= 1.0 or not 0.0 <= s_ratio <= 1.0 or not 0.0 <= flops_target < 1.0:
        raise PassRefused("keep must be in (0, 1], s_ratio in [0, 1], flops_target in [0, 1)")
    chosen = _layers(layers)
    args = (s_ratio, cls, iters, vmin, vmax, importance, seed, eir)
    if flops_target > 0:
        base = flops.count(ir.to_proto(model))
        lo, hi = 0.0, 1.0  # keep=lo meets the target (or is the floor), keep=hi does not
        for _ in range(12):
            mid = (lo + hi) / 2
            trial = model.clone()
            prune(trial, chosen, mid, *args)
            met = 1 - flops.count(ir.to_proto(trial)) / base >= flops_target
            lo, hi = (mid, hi) if met else (lo, mid)
        keep = max(lo, 1e-3)
    report = ctx.report
    done = prune(model, chosen, keep, *args, report=report)
    if not done:
        report.skip("(model)", f"keep={keep:g} keeps every token at the chosen layers")
        return report
    report.change("prune-layer", len(done))
    report.details.update({"keep": round(keep, 4), "importance": importance, "layers": done})
    return report


PASS = Pass(
    name="token-prune",
    summary="Zero-TPrune: drop unimportant tokens (Weighted PageRank over attention)",
    exact=False,
    apply=apply,
    budget=BUDGET,
)
