"""Small helpers on onnx NodeProtos shared by the modules that walk plain ONNX graphs."""

from __future__ import annotations

import onnx


def attr(node: onnx.NodeProto, name: str, default=None):
    """The Python value of attribute ``name`` of ``node``, or ``default`` when it is absent."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default
