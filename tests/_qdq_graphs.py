"""Small QDQ ONNX graphs for the int8 compile tests and bench: QuantizeLinear/DequantizeLinear
around MatMul, Gemm and Conv, written with ``onnx.helper`` (weights seeded, symmetric int8 per
output channel unless asked otherwise)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

_ELEM = {"uint8": TensorProto.UINT8, "int8": TensorProto.INT8}


class _Builder:
    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def name(self, stem: str) -> str:
        self.n += 1
        return f"{stem}{self.n}"

    def init(self, array: np.ndarray, stem: str) -> str:
        name = self.name(stem)
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def qdq(self, x: str, scale: float, dtype: str = "uint8", zero: int | None = None) -> str:
        """QuantizeLinear + DequantizeLinear of activation ``x`` (per tensor)."""
        zero = (128 if dtype == "uint8" else 0) if zero is None else zero
        s = self.init(np.array(scale, np.float32), "s")
        z = self.init(np.array(zero, dtype), "z")
        q, d = self.name("q"), self.name("dq")
        self.nodes += [helper.make_node("QuantizeLinear", [x, s, z], [q]),
                       helper.make_node("DequantizeLinear", [q, s, z], [d])]
        return d

    def weight(self, shape: tuple[int, ...], axis: int, per_channel: bool = True,
               zero_point: int = 0) -> str:
        """DequantizeLinear of a seeded int8 weight, scales along ``axis``."""
        w = self.rng.integers(-127, 128, size=shape).astype(np.int8)
        n = shape[axis] if per_channel else 1
        fan_in = int(np.prod(shape)) // shape[axis]
        # float weights ~ 1/sqrt(fan_in) (int8 uniform: std 73): unit-variance outputs
        s = ((self.rng.random(n) * 0.5 + 0.75) / (73 * np.sqrt(fan_in))).astype(np.float32)
        z = np.full(n, zero_point, np.int8)
        if not per_channel:
            s, z = s.reshape(()), z.reshape(())
        d = self.name("w")
        self.nodes.append(helper.make_node(
            "DequantizeLinear", [self.init(w, "wq"), self.init(s, "ws"), self.init(z, "wz")],
            [d], axis=axis))
        return d

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def model(self, inputs: dict[str, list[int]], output: str, shape: list[int],
              opset: int = 17) -> onnx.ModelProto:
        self.nodes[-1].output[0] = "y"
        graph = helper.make_graph(
            self.nodes, "qdq",
            [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in inputs.items()],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        onnx.checker.check_model(model)
        return model


def matmul(m: int = 8, k: int = 64, n: int = 32, act: str = "uint8", per_channel: bool = True,
           weight_zero: int = 0, act_scale: float = 0.03) -> onnx.ModelProto:
    """y = DQ(Q(x)) @ DQ(W) + b, x [1, m, k]."""
    b = _Builder()
    y = b.node("MatMul", [b.qdq("x", act_scale, act),
                          b.weight((k, n), 1, per_channel, weight_zero)])
    y = b.node("Add", [y, b.init(b.rng.normal(size=n).astype(np.float32), "b")])
    return b.model({"x": [1, m, k]}, y, [1, m, n])


def gemm(m: int = 8, k: int = 48, n: int = 24, act: str = "int8") -> onnx.ModelProto:
    """y = Gemm(DQ(Q(x)), DQ(W [n, k]), b, transB=1), x [m, k]."""
    b = _Builder(1)
    y = b.node("Gemm", [b.qdq("x", 0.03, act), b.weight((n, k), 0),
                        b.init(b.rng.normal(size=n).astype(np.float32), "b")], transB=1)
    return b.model({"x": [m, k]}, y, [m, n])


def conv(c: int = 8, o: int = 16, hw: int = 10, act: str = "uint8", pads: int = 1,
         group: int = 1) -> onnx.ModelProto:
    """y = Relu(Conv(DQ(Q(x)), DQ(W [o, c/group, 3, 3]), b)), NCHW, stride 1."""
    b = _Builder(2)
    y = b.node("Conv", [b.qdq("x", 0.03, act), b.weight((o, c // group, 3, 3), 0),
                        b.init(b.rng.normal(size=o).astype(np.float32), "b")],
               pads=[pads] * 4, group=group)
    y = b.node("Relu", [y])
    size = hw + 2 * pads - 2
    return b.model({"x": [1, c, hw, hw]}, y, [1, o, size, size])


def mlp(m: int = 16, d: int = 64, hidden: int = 128, out: int = 32) -> onnx.ModelProto:
    """Two QDQ linear layers with a requantized ReLU between them (uint8 activations)."""
    b = _Builder(3)
    h = b.node("MatMul", [b.qdq("x", 0.03), b.weight((d, hidden), 1)])
    h = b.node("Relu", [b.node("Add", [h, b.init(np.zeros(hidden, np.float32), "b")])])
    y = b.node("MatMul", [b.qdq(h, 0.016, "uint8", 0), b.weight((hidden, out), 1)])
    return b.model({"x": [1, m, d]}, y, [1, m, out])


def stack(m: int = 64, d: int = 384, ffn: int = 1536) -> onnx.ModelProto:
    """MiniLM-sized matmuls: d -> d -> ffn -> d, each on a requantized uint8 activation."""
    b = _Builder(4)
    y = b.qdq("x", 0.03)
    for k, n in ((d, d), (d, ffn), (ffn, d)):
        y = b.node("MatMul", [y, b.weight((k, n), 1)])
        y = b.qdq(y, 0.03)
    y = b.node("Identity", [y])
    return b.model({"x": [1, m, d]}, y, [1, m, d])


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, path)
    return path


def _integer_model(node: onnx.NodeProto, inits: list[onnx.TensorProto], x_shape: list[int],
                   x_type: int, y_type: int, y_shape: list[int]) -> onnx.ModelProto:
    graph = helper.make_graph([node], "qop", [helper.make_tensor_value_info("x", x_type, x_shape)],
                              [helper.make_tensor_value_info("y", y_type, y_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    return model


def _scales(rng, n: int, fan_in: int) -> np.ndarray:
    return ((rng.random(n) * 0.5 + 0.75) / (73 * np.sqrt(fan_in))).astype(np.float32)


def qlinear_matmul(m: int = 8, k: int = 64, n: int = 32, per_column: bool = True):
    """One QLinearMatMul: uint8 x [m, k] (scale 1/32, zero 128), int8 W [k, n], uint8 y."""
    rng = np.random.default_rng(5)
    sb = _scales(rng, n if per_column else 1, k)
    inits = [numpy_helper.from_array(a, nm) for a, nm in (
        (np.array(1 / 32, np.float32), "sa"), (np.array(128, np.uint8), "za"),
        (rng.integers(-127, 128, (k, n)).astype(np.int8), "b"),
        (sb if per_column else sb.reshape(()), "sb"),
        (np.zeros(n if per_column else (), np.int8), "zb"),
        (np.array(0.02, np.float32), "sy"), (np.array(128, np.uint8), "zy"))]
    node = helper.make_node("QLinearMatMul", ["x", "sa", "za", "b", "sb", "zb", "sy", "zy"],
                            ["y"])
    return _integer_model(node, inits, [m, k], TensorProto.UINT8, TensorProto.UINT8, [m, n])


def qlinear_conv(c: int = 8, o: int = 16, hw: int = 9):
    """One QLinearConv (pads 1, int32 bias): uint8 x, int8 per-channel W, uint8 y."""
    rng = np.random.default_rng(6)
    sw = _scales(rng, o, c * 9)
    inits = [numpy_helper.from_array(a, nm) for a, nm in (
        (np.array(1 / 32, np.float32), "sx"), (np.array(128, np.uint8), "zx"),
        (rng.integers(-127, 128, (o, c, 3, 3)).astype(np.int8), "w"), (sw, "sw"),
        (np.zeros(o, np.int8), "zw"), (np.array(0.02, np.float32), "sy"),
        (np.array(100, np.uint8), "zy"),
        (rng.integers(-2000, 2000, o).astype(np.int32), "B"))]
    node = helper.make_node("QLinearConv", ["x", "sx", "zx", "w", "sw", "zw", "sy", "zy", "B"],
                            ["y"], pads=[1, 1, 1, 1])
    return _integer_model(node, inits, [1, c, hw, hw], TensorProto.UINT8, TensorProto.UINT8,
                          [1, o, hw, hw])


def conv_integer(c: int = 4, o: int = 8, hw: int = 7):
    """One ConvInteger (pads 1): uint8 x with zero point 3, int8 W, int32 y."""
    rng = np.random.default_rng(7)
    inits = [numpy_helper.from_array(rng.integers(-127, 128, (o, c, 3, 3)).astype(np.int8), "w"),
             numpy_helper.from_array(np.array(3, np.uint8), "zx")]
    node = helper.make_node("ConvInteger", ["x", "w", "zx"], ["y"], pads=[1, 1, 1, 1])
    return _integer_model(node, inits, [1, c, hw, hw], TensorProto.UINT8, TensorProto.INT32,
                          [1, o, hw, hw])
