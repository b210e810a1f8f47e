"""torch.nn.Module -> one self-contained ONNX model, checked against torch.

Export uses the dynamo exporter (``torch.onnx.export(dynamo=True)``) with its default graph
optimisation, weights embedded in the ``.onnx`` file (no ``.onnx.data`` side file; models
over 2 GB are refused). ``check_against_torch`` then runs torch and onnxruntime on the same
seeded inputs.

Symbolic dims (``edgekit.shapes``): each name becomes one ``torch.export.Dim`` with the
user's bounds, shared by every input that uses it, and the example inputs take the middle
check point (an odd length >= 2: torch.export specialises a dim whose example is 0 or 1 into
a constant). torch 2.13 accepts a lower bound of 1 but traces assuming the length is not 1
(its 0/1 specialisation: a branch on ``x.shape[1] > 1`` takes the long side), so the graph
is not trusted at 1 by construction: the check runs at every ``shapes.check_points`` length,
the low end included, and a graph wrong at one of them (an exporter's ``Squeeze`` of the
symbolic axis fails at every length but 1) is refused naming that length.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import re
import warnings
from collections.abc import Sequence

import numpy as np
import onnx

from edgekit import shapes
from edgekit.errors import EdgekitError
from edgekit.files import replacing
from edgekit.verify import (
    Comparison,
    TensorSpec,
    at_length,
    compare,
    index_bounds,
    ort_session,
    run_ort,
    seeded_at,
    seeded_inputs,
    set_model_dims,
)

_TWO_GB = 2 * 1024**3


@contextlib.contextmanager
def _quiet():
    """The exporter prints progress and warnings on stdout/stderr; keep the CLI's output ours."""
    loggers = [logging.getLogger(n) for n in (
        "torch", "torch.onnx", "onnxscript", "torch.export", "torch.export._trace")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    buf = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf), \
                contextlib.redirect_stderr(buf):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def torch_inputs(specs: Sequence[TensorSpec], seed: int = 0) -> dict[str, np.ndarray]:
    return seeded_inputs(specs, seed)


def export_module(module, specs: Sequence[TensorSpec], optimize: bool = True,
                  dims: dict[str, tuple[int, int]] | None = None) -> onnx.ModelProto:
    """Export ``module`` (eval mode) for inputs ``specs`` and return the ONNX model.

    ``dims``: the bounds of the symbolic names in ``specs`` (see the module docstring); the
    model records them (``verify.model_dims``)."""
    model = _export(module, specs, optimize, dict(dims or {}))
    if dims:
        _name_input_dims(model, specs)
        set_model_dims(model, dims)
    return model


def _export(module, specs: Sequence[TensorSpec], optimize: bool,
            dims: dict[str, tuple[int, int]] | None) -> onnx.ModelProto:
    import torch

    module = module.eval()
    dynamic = None
    example = specs
    if dims:
        # one Dim per name, shared; an example of 0/1 would be specialised to a constant
        point = shapes.check_points(dims)[-1]
        example = shapes.concrete(specs, {k: max(v, min(2, dims[k][1]))
                                          for k, v in point.items()})
        by_name = {k: torch.export.Dim(k, min=lo, max=hi) for k, (lo, hi) in dims.items()}
        dynamic = tuple({axis: by_name[d] for axis, d in enumerate(s.shape)
                         if shapes.is_symbolic(d)} or None for s in specs)
    args = tuple(torch.from_numpy(a) for a in torch_inputs(example).values())
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                external_data=False,
                optimize=optimize,
                verbose=False,
                input_names=[s.name for s in specs],
                dynamic_shapes=dynamic,
            )
            model = program.model_proto
    except Exception as exc:
        # the exporter's message is multi-line with ANSI colours; the root cause is the
        # innermost exception's first line
        cause = exc
        while cause.__cause__ is not None:
            cause = cause.__cause__
        msg = re.sub(r"\x1b\[[0-9;]*m", "", str(cause)).strip().splitlines()
        raise EdgekitError(
            f"torch.onnx export failed: {msg[0] if msg else type(cause).__name__}") from exc
    if model.ByteSize() >= _TWO_GB:
        raise EdgekitError("the exported model is over 2 GB; edgekit writes single-file ONNX only")
    model.producer_name = "edgekit"
    return model


def _name_input_dims(model: onnx.ModelProto, specs: Sequence[TensorSpec]) -> None:
    """The exported inputs' symbolic dims carry the spec's names (torch may name them s0, s1),
    and a dim torch kept static where the spec has a name is an error naming both."""
    by_name = {s.name: s for s in specs}
    for value in model.graph.input:
        spec = by_name.get(value.name)
        if spec is None:
            continue
        for axis, (d, want) in enumerate(zip(value.type.tensor_type.shape.dim, spec.shape,
                                             strict=False)):
            if not shapes.is_symbolic(want):
                continue
            if d.HasField("dim_value"):
                raise EdgekitError(
                    f"torch.export made dim {want!r} of input {value.name!r} (axis {axis}) the "
                    f"constant {d.dim_value}: the model does not compute with a variable length "
                    "there")
            d.dim_param = want


def torch_outputs(module, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run the module and flatten its outputs (tensor, tuple/list, or dict of tensors)."""
    import torch

    with torch.no_grad():
        result = module(*(torch.from_numpy(a) for a in inputs.values()))
    flat: list[np.ndarray] = []

    def visit(x) -> None:
        if isinstance(x, torch.Tensor):
            flat.append(x.detach().cpu().numpy())
        elif isinstance(x, dict) or hasattr(x, "to_tuple"):
            for v in (x.values() if isinstance(x, dict) else x.to_tuple()):
                visit(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                visit(v)

    visit(result)
    return flat


def check_against_torch(
    module,
    model: onnx.ModelProto,
    specs: Sequence[TensorSpec],
    atol: float,
    rtol: float,
    seed: int = 0,
    dims: dict[str, tuple[int, int]] | None = None,
) -> list[Comparison]:
    """Run torch and onnxruntime on the same seeded inputs; one comparison per output, and
    per ``shapes.check_points(dims)`` length with symbolic dims (named ``out [seq=17]``).

    Token-id inputs draw from the whole embedding table the exported graph shows."""
    bounds = index_bounds(model)
    specs = [dataclasses.replace(s, high=bounds.get(s.name, s.high)) for s in specs]
    names = [o.name for o in model.graph.output]
    session = ort_session(model)
    result = []
    for point, inputs in seeded_at(specs, dims or {}, seed):
        ref = torch_outputs(module, inputs)
        try:
            out = run_ort(session, inputs)
        except EdgekitError as exc:
            if not point:
                raise
            raise EdgekitError(f"the exported ONNX model fails at {shapes.format_point(point)}"
                               f": {exc}") from None
        if len(ref) != len(out):
            raise EdgekitError(
                f"torch returned {len(ref)} outputs but the ONNX model has {len(out)}")
        result += compare([at_length(n, point) for n in names], out, ref, atol, rtol)
    return result


def save_onnx(model: onnx.ModelProto, path) -> None:
    """Write a single-file ONNX model atomically (temp file, then rename)."""
    from pathlib import Path

    path = Path(path)
    with replacing(path) as tmp:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(model.SerializeToString())


def rename_outputs(model: onnx.ModelProto, names: Sequence[str]) -> None:
    """Give the graph's outputs ``names`` (in order; the exporter names them after the op
    that made them, e.g. ``div_1``), renaming every use of the old names."""
    outputs = model.graph.output
    if len(names) != len(outputs):
        raise EdgekitError(f"{len(names)} output names for {len(outputs)} outputs")
    taken = {v for n in model.graph.node for v in [*n.input, *n.output]}
    renames = {o.name: new for o, new in zip(outputs, names, strict=True) if o.name != new}
    clash = next((new for old, new in renames.items() if new in taken), None)
    if clash is not None:
        raise EdgekitError(f"cannot name an output {clash!r}: the graph already has a value "
                           "of that name")
    for node in model.graph.node:
        node.input[:] = [renames.get(v, v) for v in node.input]
        node.output[:] = [renames.get(v, v) for v in node.output]
    for value in [*model.graph.output, *model.graph.value_info]:
        value.name = renames.get(value.name, value.name)
