"""Parallel model -> step module: one frame (or a chunk of k frames) in, state explicit.

``StepModule(model, batch, chunk)`` is an ``nn.Module`` whose forward is
``(x_chunk, *states) -> (y_chunk, *next_states)``: ``x_chunk`` is ``(B, k, ...)``, a slice of
the parallel model's input along time, and ``y_chunk`` the matching slice of its output
(``delay`` frames late). States are named by module path (``StateSpec``); their initial
values come from the layers' ``stream_state``. Exporting this module with torch.onnx gives
a step graph that compiles like any other model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.streaming.protocol import (
    StepContext,
    check_streamable,
    initial_state,
    step,
    total_delay,
)

FRAME_INPUT = "x"
FRAME_OUTPUT = "y"


@dataclass(frozen=True)
class StateSpec:
    """One state tensor: graph input ``input``, graph output ``output``, start value ``init``
    (every element; the step form's states all start constant)."""

    key: str
    input: str
    output: str
    shape: tuple[int, ...]
    dtype: str
    init: float

    def to_dict(self) -> dict:
        return {**asdict(self), "shape": list(self.shape)}

    def initial(self) -> np.ndarray:
        return np.full(self.shape, self.init, dtype=self.dtype)


def state_specs(model, batch: int, dtype) -> list[StateSpec]:
    specs = []
    for key, value in initial_state(model, batch, dtype).items():
        flat = value.flatten()
        init = float(flat[0]) if flat.numel() else 0.0
        if flat.numel() and not bool((flat == flat[0]).all()):
            raise EdgekitError(f"state {key} does not start constant; edgekit records one "
                               "initial value per state")
        name = "state_" + key.replace(".", "_")  # identifiers: compilers rename dotted names
        specs.append(StateSpec(key, name, f"{name}_next", tuple(value.shape),
                               str(value.dtype).removeprefix("torch."), init))
    return specs


def _make_step_module(model, keys: list[str], chunk: int):
    import torch
    from torch import nn

    class StepModule(nn.Module):
        """``(x_chunk, *states) -> (y_chunk, *next_states)`` for a streamable model."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x, *states):
            state = dict(zip(keys, states, strict=True))
            outputs = []
            for i in range(chunk):
                new: dict = {}
                ctx = StepContext(state["t"])
                outputs.append(step(self.model, x[:, i:i + 1], state, new, "", ctx))
                new["t"] = state["t"] + 1
                state = {**state, **new}
            y = outputs[0] if chunk == 1 else torch.cat(outputs, dim=1)
            return (y, *(state[k] for k in keys))

    return StepModule().eval()


@dataclass
class StepForm:
    module: object  # the StepModule (torch)
    states: list[StateSpec]
    chunk: int
    delay: int
    frame_shape: tuple[int, ...]  # (B, chunk, ...)
    dtype: str

    def metadata(self) -> dict:
        """What the manifest's ``streaming`` section records."""
        return {"frame_input": FRAME_INPUT, "frame_output": FRAME_OUTPUT, "time_axis": 1,
                "chunk": self.chunk, "delay": self.delay,
                "states": [s.to_dict() for s in self.states]}


def to_step(model, input_shape: tuple[int, ...], chunk: int = 1,
            dtype: str = "float32") -> StepForm:
    """Step form of a streamable ``model`` whose parallel input is ``input_shape`` (B, T, ...)."""
    import torch

    check_streamable(model)
    if chunk < 1:
        raise EdgekitError(f"chunk must be at least 1 frame, got {chunk}")
    if len(input_shape) < 2:
        raise EdgekitError(f"a streamable input is (batch, time, ...); got shape {input_shape}")
    torch_dtype = getattr(torch, dtype)
    specs = state_specs(model, input_shape[0], torch_dtype)
    module = _make_step_module(model.eval(), [s.key for s in specs], chunk)
    frame = (input_shape[0], chunk, *input_shape[2:])
    return StepForm(module, specs, chunk, total_delay(model), frame, dtype)


def run_steps(form: StepForm, x: np.ndarray) -> np.ndarray:
    """Feed ``x`` (B, T, ...) chunk by chunk through the torch step module; outputs of every
    step concatenated along time (the first ``delay`` frames are warm-up)."""
    import torch

    if x.shape[1] % form.chunk:
        raise EdgekitError(f"{x.shape[1]} frames are not a whole number of {form.chunk}-frame "
                           "chunks")
    states = [torch.from_numpy(s.initial()) for s in form.states]
    outs = []
    with torch.no_grad():
        for i in range(0, x.shape[1], form.chunk):
            y, *states = form.module(torch.from_numpy(x[:, i:i + form.chunk]), *states)
            outs.append(y.numpy())
    return np.concatenate(outs, axis=1)
