"""torch.nn.Module -> one self-contained ONNX model, checked against torch.

Export uses the dynamo exporter (``torch.onnx.export(dynamo=True)``) with its default graph
optimisation, weights embedded in the ``.onnx`` file (no ``.onnx.data`` side file; models
over 2 GB are refused). ``check_against_torch`` then runs torch and onnxruntime on the same
seeded inputs.
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

from edgekit.errors import EdgekitError
from edgekit.files import replacing
from edgekit.verify import (
    Comparison,
    TensorSpec,
    compare,
    index_bounds,
    run_ort,
    seeded_inputs,
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


def export_module(module, specs: Sequence[TensorSpec], optimize: bool = True) -> onnx.ModelProto:
    """Export ``module`` (eval mode) for inputs ``specs`` and return the ONNX model."""
    import torch

    module = module.eval()
    args = tuple(torch.from_numpy(a) for a in torch_inputs(specs).values())
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
) -> list[Comparison]:
    """Run torch and onnxruntime on the same seeded inputs; one comparison per output.

    Token-id inputs draw from the whole embedding table the exported graph shows."""
    bounds = index_bounds(model)
    specs = [dataclasses.replace(s, high=bounds.get(s.name, s.high)) for s in specs]
    inputs = torch_inputs(specs, seed)
    ref = torch_outputs(module, inputs)
    out = run_ort(model, inputs)
    names = [o.name for o in model.graph.output]
    if len(ref) != len(out):
        raise EdgekitError(
            f"torch returned {len(ref)} outputs but the ONNX model has {len(out)}")
    return compare(names, out, ref, atol, rtol)


def save_onnx(model: onnx.ModelProto, path) -> None:
    """Write a single-file ONNX model atomically (temp file, then rename)."""
    from pathlib import Path

    path = Path(path)
    with replacing(path) as tmp:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(model.SerializeToString())
