"""Test models for the BatchNorm passes: hand-built ONNX graphs (any dtype) with random,
non-trivial BN statistics, and cached exports of the built-in graphs."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnx_ir as ir
import onnxscript.optimizer
from edgekit.graphs import available
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from edgekit.export import export_module
from edgekit.passes.core import Pass, PassContext, PassReport, load_samples, run_pass
from edgekit.verify import TensorSpec, compare, run_ort

_ELEM = {np.dtype("float32"): onnx.TensorProto.FLOAT, np.dtype("float64"): onnx.TensorProto.DOUBLE}


class Graph:
    """A tiny ONNX graph builder: random constants, nodes by name, one call to finish."""

    def __init__(self, dtype=np.float32, seed: int = 0):
        self.dtype, self.rng = np.dtype(dtype), np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []

    def input(self, name: str, *shape: int) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, _ELEM[self.dtype], shape))
        return name

    def const(self, name: str, array, dtype=None) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(array, dtype or self.dtype), name))
        return name

    def rand(self, name: str, *shape: int, scale: float = 0.5) -> str:
        return self.const(name, self.rng.standard_normal(shape) * scale)

    def node(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def bn(self, x: str, channels: int, name: str, **attrs) -> str:
        """BatchNormalization with random γ, β, μ and σ² (so a wrong fold shows)."""
        r = self.rng
        params = [self.const(f"{name}.{p}", v) for p, v in (
            ("gamma", r.uniform(0.5, 1.5, channels)), ("beta", r.normal(0, 0.3, channels)),
            ("mean", r.normal(0, 0.3, channels)), ("var", r.uniform(0.5, 1.5, channels)))]
        return self.node("BatchNormalization", [x, *params], name, epsilon=1e-3, **attrs)

    def model(self, *outputs: str) -> onnx.ModelProto:
        outs = [helper.make_tensor_value_info(o, _ELEM[self.dtype], None) for o in outputs]
        graph = helper.make_graph(self.nodes, "g", self.inputs, outs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        model.ir_version = 9
        return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def clean(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold the exporter's Constant/Shape/Expand noise (what an unoptimised export needs)."""
    m = ir.from_proto(model)
    onnxscript.optimizer.fold_constants(m)
    RemoveUnusedNodesPass()(m)
    return ir.to_proto(m)


@functools.cache
def exported(name: str, optimize: bool = True, dtype: str = "float32"):
    """(module, ONNX model) of a built-in graph; ``optimize=False`` keeps BN (and is cleaned)."""
    info = available()[name]
    module = info.build()
    if dtype == "float64":
        module = module.double()
    specs = [TensorSpec(n, s, dtype) for n, s, _ in info.inputs]
    model = export_module(module, specs, optimize=optimize)
    return module, model if optimize else clean(model)


def samples(model: onnx.ModelProto) -> list[dict[str, np.ndarray]]:
    return load_samples(model)


def ops(model: onnx.ModelProto, op_type: str) -> int:
    return sum(n.op_type == op_type for n in model.graph.node)


def rel_error(model: onnx.ModelProto, reference: onnx.ModelProto) -> float:
    """Worst norm-wise relative error of ``model`` against ``reference`` on seeded inputs."""
    names = [o.name for o in reference.graph.output]
    worst = 0.0
    for feed in samples(reference):
        got, ref = run_ort(model, feed), run_ort(reference, feed)
        worst = max([worst] + [c.rel for c in compare(names, got, ref, 0.0, 0.0)])
    return worst


def apply_directly(model: onnx.ModelProto, p: Pass, **params) -> tuple[onnx.ModelProto, PassReport]:
    """Run a pass without ``run_pass``'s onnxruntime check (ORT has no float64 Conv)."""
    work = ir.from_proto(model)
    report = p.apply(work, PassContext(samples(model)), **{**p.params, **params})
    RemoveUnusedNodesPass()(work)
    TopologicalSortPass()(work)
    new = ir.to_proto(work)
    onnx.checker.check_model(new, full_check=True)
    return new, report


def reference_error(model: onnx.ModelProto, reference: onnx.ModelProto) -> float:
    """``rel_error`` computed by onnx's numpy reference runtime, which runs float64 Conv."""
    worst = 0.0
    for feed in samples(reference):
        got = ReferenceEvaluator(model).run(None, feed)
        ref = ReferenceEvaluator(reference).run(None, feed)
        names = [o.name for o in reference.graph.output]
        worst = max([worst] + [c.rel for c in compare(names, got, ref, 0.0, 0.0)])
    return worst


def run_checked(model: onnx.ModelProto, p: Pass, **params):
    """(new model, report, worst relative error): through ``run_pass`` in float32, directly
    with the reference runtime in float64 (onnxruntime has no float64 Conv kernel)."""
    if model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.DOUBLE:
        new, report = apply_directly(model, p, **params)
        return new, report, reference_error(new, model)
    new, run = run_pass(model, p, {**p.params, **params}, samples(model))
    assert run.status in ("applied", "unchanged"), run.message
    return new, run.report, run.max_rel or 0.0
