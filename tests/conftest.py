"""Shared fixtures: small real models exported and compiled once per session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

LIGHT_ZOO = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"

TINY_NET = '''
import torch
from torch import nn

INPUTS = [("x", (1, 8), "float32")]


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
'''


@pytest.fixture(scope="session")
def tiny_net_file(tmp_path_factory) -> Path:
    """A user model file with a factory and INPUTS, plus a saved state dict beside it."""
    import torch

    d = tmp_path_factory.mktemp("user")
    f = d / "net.py"
    f.write_text(TINY_NET)
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    torch.save(net.state_dict(), d / "weights.pt")
    return f


@pytest.fixture(scope="session")
def add_relu_onnx(tmp_path_factory) -> Path:
    """y = relu(x + b), x: 1x4 float — a tiny hand-made ONNX model."""
    b = helper.make_tensor("b", TensorProto.FLOAT, [4], [0.5, -1.0, 2.0, -3.0])
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "b"], ["s"], name="add"),
         helper.make_node("Relu", ["s"], ["y"], name="relu")],
        "add_relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path_factory.mktemp("onnx") / "add_relu.onnx"
    onnx.save(model, path)
    return path


@pytest.fixture(scope="session")
def compiled_default(tmp_path_factory):
    """The default built-in graph exported and compiled for the host, once."""
    from edgekit import api, graphs

    d = tmp_path_factory.mktemp("default")
    exported = api.export(graphs.DEFAULT, d / "m.onnx")
    result = api.compile(d / "m.onnx", "host", d / "m.edgekit", source=exported.source.to_dict())
    return result


def rng_array(shape, dtype="float32", seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)
