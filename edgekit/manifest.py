"""What an artifact's files must be before anything of them runs: the manifest's schema (every
problem named, never a KeyError later), the memory estimate against what this machine has
free, and the library's ELF header (what would crash the loader refused first). Pure Python:
the embeddable runtime (``edgekit.runtime``) and the compiler side (``edgekit.artifact``) share
it.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
LIBRARY = "model.so"


class ArtifactError(ValueError):
    """The artifact is missing, malformed, tampered with, or built for another machine (or
    TVM's runtime, which runs it, is not installed)."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---- the manifest's schema: every problem named, never a KeyError or TypeError later ----

_HEX = frozenset("0123456789abcdef")
_DIM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*$")  # a symbolic dim (edgekit.shapes)


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _tensor_problems(field: str, items: Any, min_dim: int) -> list[str]:
    if not isinstance(items, list):
        return [f"{field} must be a list"]
    out = []
    for i, t in enumerate(items):
        where = f"{field}[{i}]"
        if not isinstance(t, dict):
            out.append(f"{where} must be an object")
            continue
        if not isinstance(t.get("name"), str):
            out.append(f"{where}.name must be a string")
        shape = t.get("shape")
        if not (isinstance(shape, list) and all(
                (is_int(d) and d >= min_dim) or (isinstance(d, str) and _DIM_NAME.match(d))
                for d in shape)):
            out.append(f"{where}.shape must be a list of integers >= {min_dim} or dim names")
        try:
            if not isinstance(t.get("dtype"), str):
                raise TypeError
            if min_dim >= 0:  # inputs and states are built and checked with numpy
                np.dtype(t["dtype"])
        except (TypeError, ValueError):
            out.append(f"{where}.dtype must name a numpy dtype, not {t.get('dtype')!r}")
        if t.get("high") is not None and not is_int(t["high"]):
            out.append(f"{where}.high must be an integer")
    return out


def _streaming_problems(s: Any) -> list[str]:
    if not isinstance(s, dict):
        return ["streaming must be an object"]
    out = [f"streaming.{k} must be an integer >= 0" for k in ("chunk", "delay", "time_axis")
           if (k in s or k != "time_axis") and not (is_int(s.get(k)) and s[k] >= 0)]
    out += [f"streaming.{k} must be a string" for k in ("frame_input", "frame_output")
            if not isinstance(s.get(k), str)]
    states = s.get("states")
    if not isinstance(states, list) or not all(isinstance(st, dict) for st in states):
        return [*out, "streaming.states must be a list of objects"]
    out += _tensor_problems("streaming.states", [{**st, "name": st.get("input")}
                                                 for st in states], 0)
    for i, st in enumerate(states):
        if not isinstance(st.get("output"), str):
            out.append(f"streaming.states[{i}].output must be a string")
        if not isinstance(st.get("init"), int | float) or isinstance(st.get("init"), bool):
            out.append(f"streaming.states[{i}].init must be a number")
    return out


def manifest_problems(manifest: Any) -> list[str]:
    """Every way ``manifest`` breaks the artifact schema (version 1), one line each. Symbolic
    inputs (names in ``inputs[].shape``, bounds in ``dims``, the compiler's ``shapes``) are
    optional fields: a static artifact has none, and older manifests load unchanged."""
    if not isinstance(manifest, dict):
        return ["the manifest must be a JSON object"]
    m, out = manifest, []
    if m.get("schema_version") != SCHEMA_VERSION:
        return [f"unsupported schema version {m.get('schema_version')!r}"]
    files = m.get("files")
    if not isinstance(files, dict) or LIBRARY not in files:
        out.append(f"files must be an object of file name -> sha256 that lists {LIBRARY}")
    else:
        for name, digest in files.items():
            if "/" in name or "\\" in name or name in ("", ".", "..", MANIFEST):
                out.append(f"manifest lists a file outside the artifact: {name}")
            if not (isinstance(digest, str) and len(digest) == 64 and set(digest) <= _HEX):
                out.append(f"files[{name!r}] must be a sha256 (64 lowercase hex digits)")
    target = m.get("target")
    if not (isinstance(target, dict) and isinstance(target.get("name"), str)):
        out.append("target must be an object with a string name")
    else:
        out += [f"target.{k} must be a string" for k in ("machine", "device")
                if target.get(k) is not None and not isinstance(target[k], str)]
    out += _tensor_problems("inputs", m.get("inputs"), 0)
    out += _tensor_problems("outputs", m.get("outputs"), -1)
    for key, kind in (("created", str), ("versions", dict), ("source", dict),
                      ("verification", dict), ("passes", list), ("tuning", dict)):
        if m.get(key) is not None and not isinstance(m[key], kind):
            out.append(f"{key} must be a{'n' if kind is dict else ''} "
                       f"{ {str: 'string', dict: 'object', list: 'list'}[kind]}")
    src = m.get("source")
    if isinstance(src, dict):
        out += [f"source.{k} must be a string" for k in ("kind", "spec", "weights")
                if src.get(k) is not None and not isinstance(src[k], str)]
    if "streaming" in m:
        out += _streaming_problems(m["streaming"])
    out += _ranges_problems(m.get("calibrated_ranges"), m.get("inputs"))
    out += _dims_problems(m.get("dims"), m.get("inputs"))
    if m.get("shapes") is not None and not isinstance(m["shapes"], dict):
        out.append("shapes must be an object")
    mem = m.get("memory")
    if mem is not None and not (isinstance(mem, dict) and all(
            is_int(mem.get(k)) and mem[k] >= 0 for k in MEMORY_PARTS)):
        out.append(f"memory must be an object of {', '.join(MEMORY_PARTS)}: integers >= 0")
    return out


def _dims_problems(dims: Any, inputs: Any) -> list[str]:
    """``dims``: name -> [lo, hi] (1 <= lo <= hi) for every symbolic name the inputs use
    (optional: an artifact with static inputs has none)."""
    used = {d for t in inputs if isinstance(t, dict) and isinstance(t.get("shape"), list)
            for d in t["shape"] if isinstance(d, str)} if isinstance(inputs, list) else set()
    if dims is None:
        dims = {}
    elif not isinstance(dims, dict):
        return ["dims must be an object of dim name -> [lo, hi]"]
    out = [f"dims[{name!r}] must be [lo, hi]: integers, 1 <= lo <= hi"
           for name, pair in dims.items()
           if not (isinstance(pair, list) and len(pair) == 2 and all(map(is_int, pair))
                   and 1 <= pair[0] <= pair[1])]
    out += [f"inputs use the dim {name!r}, which dims does not bound"
            for name in sorted(used - set(dims))]
    return out


def _ranges_problems(ranges: Any, inputs: Any) -> list[str]:
    if ranges is None:
        return []
    names = {t.get("name") for t in inputs if isinstance(t, dict)} if isinstance(
        inputs, list) else set()
    if not isinstance(ranges, dict):
        return ["calibrated_ranges must be an object of input name -> {min, max}"]
    out = []
    for name, r in ranges.items():
        if name not in names:
            out.append(f"calibrated_ranges names {name!r}, which is not an input")
        elif not (isinstance(r, dict) and all(
                isinstance(r.get(k), int | float) and not isinstance(r.get(k), bool)
                for k in ("min", "max")) and r["min"] <= r["max"]):
            out.append(f"calibrated_ranges[{name!r}] must be {{min, max}}: numbers, min <= max")
    return out


# ---- memory: the compile-time estimate against what this machine has free now ----

MEMORY_PARTS = ("inputs", "weights", "activations")  # bytes, ``intake.MemoryEstimate``


def available_memory() -> int | None:
    """``MemAvailable`` from ``/proc/meminfo`` in bytes; None where there is none (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def human_bytes(n: float) -> str:
    """``1.5 GiB``-style sizes for messages."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def memory_problem(manifest: dict[str, Any], what: str) -> str | None:
    """Why running the artifact would not fit in the memory available now, or None: the
    manifest's ``memory`` (inputs + weights + the two largest activations, estimated from
    ONNX shapes at compile time) against ``MemAvailable``. An artifact without the estimate
    (compiled before it was recorded) or a machine without ``/proc/meminfo`` passes."""
    mem = manifest.get("memory")
    return memory_shortfall(mem, what, "recorded at compile time") if mem else None


def memory_shortfall(parts: Mapping[str, int], what: str, source: str) -> str | None:
    """Why ``parts`` (bytes per ``MEMORY_PARTS``) do not fit in ``MemAvailable``, naming each
    part and where the estimate came from (``source``); None when they fit or the machine has
    no ``/proc/meminfo``. The one check of compile time (``intake``) and load time."""
    free = available_memory()
    need = sum(parts[k] for k in MEMORY_PARTS)
    if free is None or need <= free:
        return None
    return (f"{what} needs an estimated {human_bytes(need)} (inputs "
            f"{human_bytes(parts['inputs'])}, weights {human_bytes(parts['weights'])}, largest "
            f"activations {human_bytes(parts['activations'])}; {source}) but "
            f"{human_bytes(free)} is available")


# ---- the shared library's ELF header: refuse what would crash the loader ----

_ELF_MACHINES = {"x86_64": (62, 64), "aarch64": (183, 64), "riscv64": (243, 64),
                 "armv7l": (40, 32), "armv7": (40, 32), "arm": (40, 32), "i686": (3, 32)}


def elf_problem(data: bytes, machine: str | None) -> str | None:
    """Why ``data`` is not a complete little-endian shared library for ``machine``
    (``platform.machine()`` spelling; None: any), or None. A library truncated after its
    hash was recomputed would otherwise be mapped past its end and crash with SIGBUS."""
    if data[:4] != b"\x7fELF" or len(data) < 52:
        return "is not an ELF shared library"
    bits = {1: 32, 2: 64}.get(data[4])
    if bits is None or data[5] != 1:
        return "is not a little-endian 32- or 64-bit ELF file"
    if bits == 64 and len(data) < 64:
        return "is truncated (ELF header)"
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    if e_type != 3:
        return "is not an ELF shared object (ET_DYN)"
    want = _ELF_MACHINES.get({"amd64": "x86_64", "arm64": "aarch64"}.get(
        (machine or "").lower(), (machine or "").lower()))
    if want and (e_machine, bits) != want:
        return (f"is ELF machine {e_machine} ({bits}-bit), not {machine} "
                f"({want[0]}, {want[1]}-bit)")
    if bits == 64:
        phoff, shoff = struct.unpack_from("<QQ", data, 32)
        phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", data, 54)
        word, ph_at, sh_at = "<Q", (8, 32), (24, 32)
    else:
        phoff, shoff = struct.unpack_from("<II", data, 28)
        phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", data, 42)
        word, ph_at, sh_at = "<I", (4, 16), (16, 20)
    size = len(data)
    if phoff + phnum * phentsize > size or shoff + shnum * shentsize > size:
        return f"is truncated ({size} bytes; its headers reach past the end)"
    for i in range(phnum):
        at = phoff + i * phentsize
        (p_type,) = struct.unpack_from("<I", data, at)
        (offset,) = struct.unpack_from(word, data, at + ph_at[0])
        (filesz,) = struct.unpack_from(word, data, at + ph_at[1])
        if p_type == 1 and offset + filesz > size:  # PT_LOAD: mapped from the file
            return f"is truncated ({size} bytes; a loadable segment ends at {offset + filesz})"
    for i in range(shnum):
        at = shoff + i * shentsize
        (sh_type,) = struct.unpack_from("<I", data, at + 4)
        (offset,) = struct.unpack_from(word, data, at + sh_at[0])
        (sh_size,) = struct.unpack_from(word, data, at + sh_at[1])
        if sh_type not in (0, 8) and offset + sh_size > size:  # NULL and NOBITS hold no bytes
            return f"is truncated ({size} bytes; a section ends at {offset + sh_size})"
    return None


