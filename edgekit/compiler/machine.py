"""What the schedules need to know about the CPU a kernel will run on: vector width, vector
register count, data cache sizes.

- Vector width and register count come from the target's LLVM features (never from this
  machine, so a cross build gets the device's): AVX-512 32 registers of 16 fp32 lanes, AVX /
  AVX2 16 of 8, SSE 16 of 4, AArch64 NEON 32 of 4.
- Cache sizes: a native build (the target's ``mtriple`` names this machine's architecture and
  its ``mcpu`` is unset or this machine's CPU) reads them from
  ``/sys/devices/system/cpu/cpu0/cache`` (size divided by the CPUs sharing the cache, so L2
  and L3 are per-core shares). Any other target gets per-CPU values from the table below
  (vendor data sheets), else conservative per-architecture ones.

Sizes are in bytes. The results are hints for tile sizes: a wrong value costs speed, never
correctness.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SYSFS = Path("/sys/devices/system/cpu/cpu0/cache")
_KIB = 1024

# (L1d, L2 per core, L3 per core) for CPUs the repo's targets name (mcpu); the L2 of a
# Cortex-A72 cluster (1 MiB) is shared by 4 cores.
_KNOWN = {
    "cortex-a72": (32 * _KIB, 256 * _KIB, 0),
    "cortex-a76": (64 * _KIB, 512 * _KIB, 512 * _KIB),
    "cortex-a78ae": (64 * _KIB, 256 * _KIB, 512 * _KIB),
    "x86-64-v3": (32 * _KIB, 512 * _KIB, 2048 * _KIB),
    "x86-64-v4": (32 * _KIB, 1024 * _KIB, 1536 * _KIB),
}
# By architecture when the CPU is not known: small enough for most cores of the family.
_BY_ARCH = {"x86_64": (32 * _KIB, 256 * _KIB, 1024 * _KIB),
            "aarch64": (32 * _KIB, 256 * _KIB, 0)}


@dataclass(frozen=True)
class Machine:
    """A CPU as the schedules see it (module docstring for where each value comes from)."""

    lanes: int  # fp32 lanes of one vector register
    vector_registers: int
    l1d: int  # bytes, per core
    l2: int  # bytes, this core's share
    l3: int  # bytes, this core's share (0: none)
    caches_from: str  # "sysfs" or "table:<cpu>" / "defaults:<arch>"


def cores(tvm_target: Any) -> int:
    """Threads the kernels of ``tvm_target`` are scheduled for: its ``num-cores``, else
    several (2), as TVM's runtime assumes. The default schedules and the passes that size
    tiles ahead of them (``matmul_layout``) read it here, so both get the same tiles."""
    return int(tvm_target.attrs.get("num-cores", 0) or 0) or 2


def _features(tvm_target: Any) -> frozenset[str]:
    from edgekit.compiler.int8_intrin import cpu_features

    return cpu_features(tvm_target)


def _arch(tvm_target: Any) -> str:
    triple = str(tvm_target.attrs.get("mtriple", "") or "") if tvm_target is not None else ""
    arch = (triple or platform.machine()).split("-")[0]
    return {"arm64": "aarch64", "amd64": "x86_64"}.get(arch.lower(), arch.lower())


def is_native(tvm_target: Any) -> bool:
    """Whether code for ``tvm_target`` runs on this machine's own CPU model."""
    from tvm.target import codegen

    if _arch(tvm_target) != _arch(None):
        return False
    mcpu = str(tvm_target.attrs.get("mcpu", "") or "")
    return not mcpu or mcpu == str(codegen.llvm_get_system_cpu())


def _shared_by(index: Path) -> int:
    """Number of CPUs in a sysfs ``shared_cpu_list`` such as ``0-3,8``."""
    count = 0
    for part in (index / "shared_cpu_list").read_text().strip().split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return max(count, 1)


def _size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": _KIB, "M": _KIB * _KIB}.get(text[-1:], 1)
    return int(text.rstrip("KM")) * scale


def host_caches(root: Path = _SYSFS) -> tuple[int, int, int] | None:
    """(L1d, L2, L3) of this machine's CPU 0, per-core shares; None when sysfs lacks them."""
    found = {1: 0, 2: 0, 3: 0}
    try:
        for index in sorted(root.glob("index*")):
            kind = (index / "type").read_text().strip()
            level = int((index / "level").read_text())
            if kind in ("Data", "Unified") and level in found:
                found[level] = _size((index / "size").read_text()) // _shared_by(index)
    except (OSError, ValueError):
        return None
    return (found[1], found[2], found[3]) if found[1] and found[2] else None


def describe(tvm_target: Any) -> Machine:
    """The :class:`Machine` for an llvm target."""
    features = _features(tvm_target)
    arch = _arch(tvm_target)
    if arch == "aarch64":
        lanes, registers = 4, 32
    elif "avx512f" in features:
        lanes, registers = 16, 32
    else:
        lanes, registers = (8 if "avx" in features or "avx2" in features else 4), 16
    caches, source = None, ""
    if is_native(tvm_target):
        caches, source = host_caches(), "sysfs"
    if caches is None:
        mcpu = str(tvm_target.attrs.get("mcpu", "") or "")
        if mcpu in _KNOWN:
            caches, source = _KNOWN[mcpu], f"table:{mcpu}"
        else:
            caches = _BY_ARCH.get(arch, _BY_ARCH["aarch64"])
            source = f"defaults:{arch}"
    return Machine(lanes, registers, *caches, caches_from=source)
