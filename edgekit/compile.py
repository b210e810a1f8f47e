"""ONNX -> Relax -> TVM executable for a target, linked to a shared library.

Steps: list every op TVM's ONNX frontend cannot convert (all of them, with node names,
before trying); import with static input shapes; ``tvm.compile`` for the target dict;
``export_library`` with the native compiler or the target's cross compiler.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import onnx

from edgekit.errors import EdgekitError, last_line
from edgekit.targets import Target
from edgekit.verify import TensorSpec


def unsupported_nodes(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """(op_type, node name) of every node TVM's ONNX frontend has no converter for."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    known = set(_get_convert_map()) | {"Constant", "If"}
    missing = []
    for i, node in enumerate(model.graph.node):
        if node.domain not in ("", "ai.onnx") or node.op_type not in known:
            missing.append((node.op_type, node.name or f"node #{i}"))
        elif node.op_type == "Constant" and any(
                a.name in ("value_ints", "value_floats", "value_strings") for a in node.attribute):
            missing.append((f"Constant({node.attribute[0].name})", node.name or f"node #{i}"))
    return missing


def _lift_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Turn Constant nodes into initializers: TVM cannot read Constant(value_ints)."""
    import onnx_ir as ir
    from onnx_ir.passes.common import LiftConstantsToInitializersPass

    work = ir.from_proto(model)
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(work)
    return ir.to_proto(work)


def to_relax(model: onnx.ModelProto, specs: Sequence[TensorSpec]):
    """Import an ONNX model into a Relax IRModule with static input shapes."""
    from tvm.relax.frontend import onnx as relax_onnx

    model = _lift_constants(model)
    missing = unsupported_nodes(model)
    if missing:
        ops = sorted({op for op, _ in missing})
        where = ", ".join(f"{name} ({op})" for op, name in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise EdgekitError(
            f"TVM cannot convert {len(missing)} node(s), ops {', '.join(ops)}: {where}{more}")
    try:
        return relax_onnx.from_onnx(
            model,
            shape_dict={s.name: list(s.shape) for s in specs},
            dtype_dict={s.name: s.dtype for s in specs},
        )
    except Exception as exc:
        raise EdgekitError(f"TVM's ONNX import failed: {last_line(exc)}") from exc


def build(mod, target: Target, tuning=None, progress=None, info: dict | None = None):
    """Compile a Relax module for ``target`` and return the executable. On CPU targets the
    kernels are scheduled first (``edgekit.tune.prepare``: tuning when ``tuning.tune``,
    records from the tuning database, default schedules); ``info`` receives that record."""
    import tvm

    if target.device == "cpu":
        from edgekit import tune

        mod, record = tune.prepare(mod, target, tuning, progress or (lambda _msg: None))
        if info is not None:
            info.update(record)
    try:
        return tvm.compile(mod, target=target.tvm_target())
    except Exception as exc:
        raise EdgekitError(f"TVM compile for target {target.name!r} failed: "
                           f"{last_line(exc)}") from exc


def export_library(executable, target: Target, path: Path) -> None:
    """Link the executable into a shared library, cross-compiling when the target needs it."""
    from tvm.support import cc

    compiler = target.find_cross_compiler()
    try:
        if compiler:
            executable.export_library(str(path), fcompile=cc.cross_compiler(compiler))
        else:
            executable.export_library(str(path))
    except Exception as exc:
        raise EdgekitError(f"linking the library for {target.name!r} failed: "
                           f"{last_line(exc)}") from exc
    if target.device == "cuda":  # PTX beside the library: the GPU machine needs no nvcc
        from edgekit.devices.cuda import write_ptx

        write_ptx(executable, target, path.parent)
