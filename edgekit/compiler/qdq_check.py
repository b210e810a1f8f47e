"""The compile check for quantized models (``verify.QUANTIZED_OPS``): onnxruntime's reference
session and the tolerance in quantization steps (``build.check_library`` uses both).

Reference. onnxruntime runs a QDQ graph with its QDQ fusions at the default (extended)
optimization level: int8 kernels (MLAS) in place of DQ -> float op -> Q. On x86 without
AVX-512 VNNI, MLAS's u8 x s8 kernel multiplies with ``vpmaddubsw``, which saturates each pair
of products to int16 (255 * 127 * 2 > 32767), so those outputs differ from the graph's math
(measured here, AVX2 only: 33.5 absolute on a two-layer uint8 MLP, 0.0 with the fusions off;
onnxruntime documents it under ``reduce_range``). The library accumulates exactly in int32,
so it is compared with onnxruntime without its QDQ fusions (``verify.ort_session(model,
qdq_fusions=False)``, the one session for the QDQ math that the pass check also uses), i.e.
with the QDQ graph's own semantics: DequantizeLinear, the float op, QuantizeLinear.

Tolerance. The library's integer sums are exact, onnxruntime's float sums are not, so a value
within float rounding of a rounding boundary of a QuantizeLinear can land one step (one
``scale``) apart. Such a flip moves an output by at most its *step*, derived backwards from
the output through the graph:

- DequantizeLinear of an activation: ``max(scale)`` (the flip itself); an integer output of
  QuantizeLinear / QLinearMatMul / QLinearConv: 1 (integer outputs are compared as numbers);
  ConvInteger / MatMulInteger: 0;
- MatMul / Gemm / Conv with a constant (or dequantized constant) weight W: ``step(x) *
  max|W|`` (one flipped input element times its largest weight; Gemm also times ``alpha``);
- Add / Sub of two activations: the sum of their steps; Mul / Div by a constant c:
  ``step * max|c|`` / ``step / min|c|``;
- shape ops, Relu / Clip / pooling / Softmax / Sigmoid / Tanh / Gelu / Erf / Concat (slopes
  at most ~1.13): the largest step of their inputs; graph inputs and constants: 0;
- anything else (LayerNorm, an activation x activation MatMul, ...): unknown (0 here).

Sensitivity. A flip can flip further values downstream (a cascade through requantized layers,
amplified by LayerNorm), which no data-free bound sees. So the check also measures it on the
seeded inputs: onnxruntime runs the graph twice more with every QuantizeLinear input scaled
by ``1 +- NUDGE`` (1e-6, a few float32 roundings: about as far as two engines' float sums
drift), and the largest change of each output is its *sensitivity*. Measured on
all-MiniLM-L6-v2 quantized by onnxruntime's ``quantize_static`` (64 tokens, unit-norm
embedding): a 1e-7 nudge moves the output by 0.034 (cosine 0.980 to the unnudged one), 1e-6
by 0.08-0.10; TVM running the same QDQ graph in float (no integer lowering) is 0.049 from
onnxruntime. Such a graph's output is only defined to that level by its own math.

Each output is accepted within ``atol + rtol * max|ref| + FLIP_STEPS * max(step,
sensitivity)``: up to two flips reaching one output element together, or twice the nudged
change. Beyond that the check fails and says by how much.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from edgekit.verify import ort_session

FLIP_STEPS = 2
NUDGE = 1e-6

_PASS_THROUGH = {
    "Identity", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Relu", "Clip",
    "LeakyRelu", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Softmax",
    "Sigmoid", "Tanh", "Gelu", "Erf", "Concat", "Slice", "Split", "Gather", "Dropout",
    "ReduceMean", "ReduceMax", "ReduceMin", "Cast", "Expand", "Pad", "Resize",
}
def reference_session(model: onnx.ModelProto):
    """onnxruntime CPU session without QDQ fusions: the QDQ math (module docstring)."""
    return ort_session(model, qdq_fusions=False)


def as_number(array) -> np.ndarray:
    """Integer outputs as float64, so a comparison sees how many steps apart they are."""
    array = np.asarray(array)
    return array.astype(np.float64) if array.dtype.kind in "iu" else array


class _Steps:
    def __init__(self, model: onnx.ModelProto):
        graph = model.graph
        self.consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.producer = {out: node for node in graph.node for out in node.output}
        self.memo: dict[str, float | None] = {}

    def value(self, name: str) -> np.ndarray | None:
        """The constant value of ``name``: an initializer or a DequantizeLinear of one."""
        if name in self.consts:
            return self.consts[name]
        node = self.producer.get(name)
        if node is None or node.op_type != "DequantizeLinear":
            return None
        args = [self.value(i) for i in node.input if i]
        if any(a is None for a in args):
            return None
        q, s, z = (args + [np.zeros((), args[0].dtype)])[:3]
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % max(q.ndim, 1)
        shape = [1] * q.ndim
        if s.size > 1:
            shape[axis] = s.size
        return (q.astype(np.float64) - z.reshape(shape if z.size > 1 else ())) \
            * s.astype(np.float64).reshape(shape if s.size > 1 else ())

    def step(self, name: str) -> float | None:
        if name not in self.memo:
            self.memo[name] = None  # guards against cycles in a malformed graph
            self.memo[name] = self._step(name)
        return self.memo[name]

    def _step(self, name: str) -> float | None:
        if self.value(name) is not None:
            return 0.0
        node = self.producer.get(name)
        if node is None:
            return 0.0  # a graph input: the same values on both sides
        op = node.op_type
        live = [i for i in node.input if i and self.value(i) is None]
        if op in ("QuantizeLinear", "QLinearMatMul", "QLinearConv"):
            return 1.0  # an integer output: one step is 1
        if op in ("ConvInteger", "MatMulInteger"):
            return 0.0  # exact integer sums on both sides
        if op == "DequantizeLinear":
            return float(np.max(np.abs(self.consts[node.input[1]]))) \
                if node.input[1] in self.consts else None
        if op in ("MatMul", "Gemm", "Conv"):
            weight = self.value(node.input[1])
            x = self.step(node.input[0])
            if weight is None or x is None or node.input[0] not in live:
                return None
            alpha = next((a.f for a in node.attribute if a.name == "alpha"), 1.0)
            return x * float(np.max(np.abs(weight))) * abs(alpha)
        steps = [self.step(i) for i in live]
        if any(s is None for s in steps):
            return None
        if op in ("Add", "Sub"):
            return sum(steps)
        if op in ("Mul", "Div") and len(live) == 1:
            c = np.abs(next(self.value(i) for i in node.input if i not in live))
            factor = float(np.max(c)) if op == "Mul" else 1.0 / max(float(np.min(c)), 1e-30)
            return steps[0] * factor
        if op in _PASS_THROUGH:
            return max(steps, default=0.0)
        return None


def output_steps(model: onnx.ModelProto, names: Sequence[str]) -> dict[str, float | None]:
    """Each output's step (module docstring): what one flipped requantization can move it by;
    None where it cannot be derived."""
    steps = _Steps(model)
    return {n: steps.step(n) for n in names}


def nudged(model: onnx.ModelProto, factor: float) -> onnx.ModelProto:
    """A copy of ``model`` whose every QuantizeLinear reads its input times ``factor``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    graph.initializer.append(numpy_helper.from_array(np.array(factor, np.float32),
                                                     "edgekit_nudge"))
    nodes = []
    for i, node in enumerate(graph.node):
        if node.op_type == "QuantizeLinear":
            moved = f"edgekit_nudged_{i}"
            nodes.append(onnx.helper.make_node("Mul", [node.input[0], "edgekit_nudge"], [moved],
                                               name=f"edgekit_nudge_{i}"))
            node.input[0] = moved
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return out


def tolerances(model: onnx.ModelProto, inputs: dict[str, np.ndarray],
               names: Sequence[str]) -> dict[str, dict[str, float | None]]:
    """Per output: its ``step`` (None: not derivable), its ``sensitivity`` on ``inputs`` and
    the ``allowance`` added to the float tolerance (module docstring)."""
    steps = output_steps(model, names)
    ref = reference_session(model).run(list(names), inputs)
    moved = [0.0] * len(names)
    if any(n.op_type == "QuantizeLinear" for n in model.graph.node):
        for factor in (1 + NUDGE, 1 - NUDGE):
            outs = reference_session(nudged(model, factor)).run(list(names), inputs)
            moved = [max(m, float(np.max(np.abs(as_number(a) - as_number(b)), initial=0.0)))
                     for m, a, b in zip(moved, outs, ref, strict=True)]
    return {n: {"step": steps[n], "sensitivity": m,
                "allowance": FLIP_STEPS * max(steps[n] or 0.0, m)}
            for n, m in zip(names, moved, strict=True)}
