"""``edgekit export MODEL --streaming``: the step graph of a streamable model, checked twice.

1. onnxruntime runs the step ONNX against the torch step module on seeded inputs and states;
2. onnxruntime *steps* the ONNX through a seeded sequence of the parallel model's length and
   the outputs are compared with the torch parallel model, frame by frame (after the delay).
   Spiking models also compare every spike decision of the torch step form with the parallel
   form; fp32 may flip a few (reported), at most ``SPIKE_FLIP_BUDGET`` of them.

Nothing is written unless both checks pass. The ONNX metadata ``edgekit.streaming`` records
the state names, shapes, dtypes and initial values, the delay and the checks; ``edgekit
compile`` copies it into the artifact's manifest.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgekit import intake, verify
from edgekit.errors import EdgekitError
from edgekit.streaming import equivalence
from edgekit.streaming.convert import FRAME_INPUT, FRAME_OUTPUT, StepForm, run_steps, to_step
from edgekit.verify import TensorSpec

METADATA_KEY = "edgekit.streaming"
SPIKE_FLIP_BUDGET = 1e-3


@dataclass
class StreamExportResult:
    model: onnx.ModelProto
    form: StepForm
    source: intake.Source
    checks: dict[str, Any] = field(default_factory=dict)


def _name_outputs(model: onnx.ModelProto, names: Sequence[str]) -> None:
    """Give the graph outputs our names (Identity nodes; compilers drop them)."""
    if len(model.graph.output) != len(names):
        raise EdgekitError(f"step graph has {len(model.graph.output)} outputs, expected "
                           f"{len(names)}")
    for out, name in zip(model.graph.output, names, strict=True):
        if out.name != name:
            model.graph.node.append(onnx.helper.make_node("Identity", [out.name], [name],
                                                          name=f"rename_{name}"))
            out.name = name


def _step_onnx(model: onnx.ModelProto, form: StepForm, x: np.ndarray) -> np.ndarray:
    """Feed ``x`` (B, T, ...) through the step ONNX in onnxruntime, chunk by chunk."""
    sess = verify.ort_session(model)
    state = {s.input: s.initial() for s in form.states}
    outs = []
    for i in range(0, x.shape[1] - x.shape[1] % form.chunk, form.chunk):
        result = sess.run(None, {FRAME_INPUT: x[:, i:i + form.chunk], **state})
        outs.append(result[0])
        state = {s.input: r for s, r in zip(form.states, result[1:], strict=True)}
    return np.concatenate(outs, axis=1)


def export_step(spec: str, out: str | Path | None = None, chunk: int = 1,
                inputs: Sequence[TensorSpec] = (), weights: str | Path | None = None,
                atol: float = 1e-4, rtol: float = 1e-4,
                progress: Callable[[str], None] = lambda _m: None) -> StreamExportResult:
    """Export the step form of a streamable torch MODEL (see module docstring)."""
    import torch

    from edgekit.export import check_against_torch, export_module, save_onnx

    if intake.is_onnx_spec(spec):
        raise EdgekitError("--streaming converts a torch model (built-in graph or file.py:"
                           "factory); an ONNX file has no step form to derive")
    tm = intake.load_torch(spec, inputs, weights)
    if len(tm.specs) != 1:
        raise EdgekitError(f"a streamable model takes one input (B, T, ...); {spec} takes "
                           f"{len(tm.specs)}")
    parallel = tm.specs[0]
    progress("building the step form")
    form = to_step(tm.module, parallel.shape, chunk, parallel.dtype)
    specs = [TensorSpec(FRAME_INPUT, form.frame_shape, parallel.dtype)]
    specs += [TensorSpec(s.input, s.shape, s.dtype) for s in form.states]
    progress("exporting the step module with torch.onnx (dynamo)")
    model = export_module(form.module, specs)
    _name_outputs(model, [FRAME_OUTPUT, *(s.output for s in form.states)])
    progress("checking onnxruntime against the torch step module")
    one_step = check_against_torch(form.module, model, specs, atol, rtol)
    if not all(c.ok for c in one_step):
        raise EdgekitError("step ONNX differs from the torch step module: "
                           f"{verify.describe_failures(one_step)}")
    progress("stepping the ONNX through a sequence against the parallel model")
    x = verify.seeded_inputs([parallel], seed=0)[parallel.name]
    with torch.no_grad():
        ref = tm.module(torch.from_numpy(x)).numpy()
    stepped = equivalence.compare_outputs(_step_onnx(model, form, x), ref[:, :x.shape[1]
                                          - x.shape[1] % chunk], form.delay, atol, rtol)
    checks: dict[str, Any] = {"one_step": [c.to_dict() for c in one_step],
                              "sequence": {"frames": int(x.shape[1]), **stepped}}
    if any(getattr(m, "emits_spikes", False) for m in tm.module.modules()):
        flips = equivalence.spike_flips(tm.module, x[:, :x.shape[1] - x.shape[1] % chunk],
                                        lambda seq: run_steps(form, seq))
        checks["spikes"] = {k: v for k, v in flips.items() if k != "layers"}
        if flips["flip_rate"] > SPIKE_FLIP_BUDGET:
            raise EdgekitError(f"stepping flips {flips['flip_rate']:.2%} of the spikes of the "
                               f"parallel model (budget {SPIKE_FLIP_BUDGET:.2%})")
    elif not stepped["ok"]:
        raise EdgekitError("stepping the step ONNX does not reproduce the parallel model: max "
                           f"abs {stepped['max_abs']:.3g}, rel {stepped['rel']:.3g}")
    metadata = {**form.metadata(), "parallel_input": parallel.to_dict(), "checks": checks}
    onnx.helper.set_model_props(model, {
        METADATA_KEY: json.dumps(metadata),
        # not "graph"/"python": the torch module of the source takes the whole sequence, so
        # baselines that rebuild it must not feed it a step's inputs
        "edgekit.source": json.dumps({"kind": "streaming", "spec": tm.source.spec,
                                      "parallel": tm.source.to_dict(), "chunk": chunk}),
    })
    result = StreamExportResult(model, form, tm.source, checks)
    if out is not None:
        save_onnx(model, out)
    return result


def read_metadata(model: onnx.ModelProto) -> dict[str, Any] | None:
    """The ``edgekit.streaming`` section of a step ONNX, or None for ordinary models."""
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            try:
                data = json.loads(prop.value)
            except json.JSONDecodeError:
                raise EdgekitError(f"malformed {METADATA_KEY} metadata in the ONNX model") from None
            if not isinstance(data, dict) or "states" not in data:
                raise EdgekitError(f"malformed {METADATA_KEY} metadata in the ONNX model")
            return data
    return None
