"""Compilation targets as data: one TOML file per target, resolved to a TVM 0.27 target dict.

A target spec is a built-in name (``rpi4``; see ``targets/*.toml``), a path to a ``.toml`` file,
or inline JSON: either a bare TVM target dict (``{"kind": "llvm", "mcpu": "cortex-a72"}``) or
the file schema with an optional ``name`` (``{"name": "pi", "base": "rpi4", "tvm": {...}}``).

File schema: ``description``, ``base`` (a built-in name, or a ``.toml`` path relative to the
file; its fields are inherited, ``[tvm]`` keys are shallow-updated), ``device`` (``cpu`` or
``cuda``, defaults from ``tvm.kind``), ``cross_compiler``, ``cross_package``, ``cross_hint``
(how to install the package; defaults to ``apt-get install <cross_package>``) and ``[tvm]``,
exactly a TVM target dict (``[tvm.host]`` for GPU targets). ``mcpu = "detect"`` and
``num-cores = "detect"`` are resolved on the machine that loads the target.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import MappingProxyType
from typing import Any

from edgekit.errors import EdgekitError

_FILE_KEYS = {"description", "base", "device", "cross_compiler", "cross_package", "cross_hint",
              "tvm"}
_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}
# LLVM feature -> /proc/cpuinfo flag, for the ISA extensions that make code fail with SIGILL.
_CPUINFO_FLAG = {
    "sse4.1": "sse4_1", "sse4.2": "sse4_2", "avx": "avx", "avx2": "avx2", "fma": "fma",
    "f16c": "f16c", "bmi": "bmi1", "bmi2": "bmi2", "avx512f": "avx512f", "avx512bw": "avx512bw",
    "avx512cd": "avx512cd", "avx512dq": "avx512dq", "avx512vl": "avx512vl",
    "avx512ifma": "avx512ifma", "avx512vbmi": "avx512vbmi", "avx512vbmi2": "avx512_vbmi2",
    "avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16", "avx512fp16": "avx512_fp16",
    "avx512bitalg": "avx512_bitalg", "avx512vpopcntdq": "avx512_vpopcntdq",
    "avxvnni": "avx_vnni", "amx-tile": "amx_tile", "amx-int8": "amx_int8", "amx-bf16": "amx_bf16",
    "neon": "asimd", "dotprod": "asimddp", "fullfp16": "asimdhp", "i8mm": "i8mm", "bf16": "bf16",
    "sve": "sve", "sve2": "sve2", "sme": "sme",
}


@dataclass(frozen=True)
class Target:
    """A resolved, validated compilation target."""

    name: str
    description: str
    device: str  # "cpu" or "cuda"
    tvm: Mapping[str, Any]  # TVM 0.27 target dict (read-only view)
    cross_compiler: str | None
    cross_package: str | None
    source: str  # file path or "inline"
    cross_hint: str | None = None

    @property
    def machine(self) -> str:
        """The CPU architecture the compiled library runs on (``platform.machine()`` spelling):
        from ``mtriple``, or the host dict's for GPU targets, else this machine's."""
        host = self.tvm.get("host")
        triple = self.tvm.get("mtriple") or (host.get("mtriple") if host else None)
        return _arch((triple or platform.machine()).split("-")[0])

    @property
    def runs_on_host(self) -> bool:
        """True when code built for this target can run on this machine's CPU."""
        if self.device != "cpu" or self.cross_compiler:
            return False
        if self.machine != _arch(platform.machine()):
            return False
        return not _missing_on_host(_thaw(self.tvm))

    def tvm_target(self) -> Any:
        """The ``tvm.target.Target`` for this target (imports tvm)."""
        import tvm

        return tvm.target.Target(_thaw(self.tvm))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable form, for manifests and ``--json`` output."""
        return {"name": self.name, "description": self.description, "device": self.device,
                "tvm": _thaw(self.tvm), "cross_compiler": self.cross_compiler,
                "cross_package": self.cross_package, "cross_hint": self.cross_hint,
                "source": self.source}

    def find_cross_compiler(self) -> str | None:
        """Absolute path of the cross compiler; None if none is needed; EdgekitError if missing."""
        if not self.cross_compiler:
            return None
        found = shutil.which(self.cross_compiler)
        if found:
            return os.path.abspath(found)
        msg = f"target '{self.name}' needs the cross compiler {self.cross_compiler}: install "
        msg += self.cross_package or "it"
        hint = self.cross_hint or (self.cross_package and f"apt-get install {self.cross_package}")
        raise EdgekitError(msg + (f" ({hint})" if hint else ""))


def load_target(spec: str) -> Target:
    """Load a target from a built-in name, a ``.toml`` path or inline JSON."""
    spec = spec.strip()
    if spec.startswith("{"):
        try:
            data = json.loads(spec)
        except json.JSONDecodeError as e:
            raise EdgekitError(f"inline target: invalid JSON: {e}") from None
        if not isinstance(data, dict):
            raise EdgekitError("inline target: expected a JSON object")
        if "tvm" not in data:
            data = {"tvm": data}
        name = str(data.pop("name", "inline"))
        return _build(name, _resolve(data, "inline target", Path.cwd(), ()), "inline")
    if spec.endswith(".toml") or os.sep in spec or "/" in spec:
        path = Path(spec)
    else:
        path = _data_dir() / f"{spec}.toml"
        if not path.is_file():
            raise EdgekitError(f"unknown target '{spec}'; available: {', '.join(_builtin_names())}"
                               " (or give a .toml path or inline JSON)")
    key = str(path.resolve())
    return _build(path.stem, _resolve(_read_toml(path), str(path), path.parent, (key,)), str(path))


def list_targets() -> list[Target]:
    """All built-in targets, sorted by name."""
    return [load_target(name) for name in _builtin_names()]


def _data_dir() -> Path:
    try:
        from importlib.resources import files

        return Path(str(files("edgekit.targets_data")))
    except ModuleNotFoundError:  # source checkout, not installed
        return Path(__file__).resolve().parent.parent / "targets"


def _builtin_names() -> list[str]:
    return sorted(p.stem for p in _data_dir().glob("*.toml"))


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise EdgekitError(f"target file {path} not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise EdgekitError(f"{path}: invalid TOML: {e}") from None


def _resolve(data: dict[str, Any], where: str, base_dir: Path, stack: tuple[str, ...]) -> dict:
    """Check the keys of one file's data and merge in its ``base`` chain."""
    unknown = sorted(set(data) - _FILE_KEYS)
    if unknown:
        raise EdgekitError(f"{where}: unknown key(s) {', '.join(unknown)}; "
                           f"allowed: {', '.join(sorted(_FILE_KEYS))}")
    if not isinstance(data.get("tvm", {}), dict):
        raise EdgekitError(f"{where}: 'tvm' must be a table (a TVM target dict)")
    base = data.get("base")
    if base is None:
        return dict(data)
    if not isinstance(base, str):
        raise EdgekitError(f"{where}: 'base' must be a target name or a .toml path")
    base_path = base_dir / base if base.endswith(".toml") else _data_dir() / f"{base}.toml"
    if not base.endswith(".toml") and not base_path.is_file():
        raise EdgekitError(f"{where}: unknown base target '{base}'; "
                           f"available: {', '.join(_builtin_names())}")
    key = str(base_path.resolve())
    if key in stack:
        chain = " -> ".join(Path(p).stem for p in (*stack, key))
        raise EdgekitError(f"{where}: target base cycle: {chain}")
    parent = _resolve(_read_toml(base_path), str(base_path), base_path.parent, (*stack, key))
    merged = {**parent, **{k: v for k, v in data.items() if k not in ("base", "tvm")}}
    merged["tvm"] = {**parent.get("tvm", {}), **data.get("tvm", {})}
    return merged


def _build(name: str, raw: dict[str, Any], source: str) -> Target:
    """Resolve ``detect`` values, check the fields, validate with TVM and freeze."""
    import tvm
    from tvm.target import codegen

    tvm_dict = dict(raw.get("tvm") or {})
    dicts = [tvm_dict]
    if isinstance(tvm_dict.get("host"), dict):
        tvm_dict["host"] = dict(tvm_dict["host"])
        dicts.append(tvm_dict["host"])
    for d in dicts:
        if d.get("num-cores") == "detect":
            d["num-cores"] = _cpu_count()
        if d.get("mcpu") == "detect":
            d["mcpu"] = codegen.llvm_get_system_cpu()
            # LLVM names the CPU model; drop the ISA extensions a VM or kernel has disabled.
            if "mtriple" not in d and (missing := _missing_on_host(d)):
                d["mattr"] = [*d.get("mattr", []), *(f"-{f}" for f in missing)]
    kind = tvm_dict.get("kind")
    device = raw.get("device", "cuda" if kind == "cuda" else "cpu")
    if device not in ("cpu", "cuda") or (device == "cuda") != (kind == "cuda"):
        raise EdgekitError(f"target '{name}': device '{device}' does not fit TVM kind '{kind}' "
                           "(use device 'cuda' with kind 'cuda', 'cpu' with 'llvm')")
    for key in ("description", "cross_compiler", "cross_package", "cross_hint"):
        if not isinstance(raw.get(key, ""), str):
            raise EdgekitError(f"target '{name}': '{key}' must be a string")
    try:
        tvm.target.Target(tvm_dict)
    except Exception as e:  # TVM raises ValueError/TVMError with a multi-line message
        reason = (str(e).strip() or type(e).__name__).splitlines()[0]
        reason = reason.split(" Target creation from config dict failed")[0]
        raise EdgekitError(f"target '{name}': TVM rejects the target dict "
                           f"{json.dumps(tvm_dict, default=str)}: {reason}") from None
    for d in dicts:
        mcpu = d.get("mcpu")
        triple = d.get("mtriple") or codegen.llvm_get_system_triple()
        if d.get("kind") == "llvm" and mcpu and not codegen.llvm_is_valid_cpu(mcpu, triple):
            raise EdgekitError(f"target '{name}': LLVM does not know mcpu '{mcpu}' for {triple}")
    description = raw.get("description") or f"TVM target {json.dumps(tvm_dict, default=str)}"
    return Target(name=name, description=description, device=device, tvm=_freeze(tvm_dict),
                  cross_compiler=raw.get("cross_compiler") or None,
                  cross_package=raw.get("cross_package") or None, source=source,
                  cross_hint=raw.get("cross_hint") or None)


def _cpu_count() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _arch(name: str) -> str:
    return _ARCH_ALIASES.get(name.lower(), name.lower())


@cache
def _cpu_flags() -> frozenset[str] | None:
    """ISA flags from /proc/cpuinfo (x86 ``flags``, ARM ``Features``); None if unreadable."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        field, _, value = line.partition(":")
        if field.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return None


def _missing_on_host(tvm_dict: dict[str, Any]) -> list[str]:
    """LLVM features the target enables that this CPU lacks (empty if unknown)."""
    flags = _cpu_flags()
    if flags is None:
        return []
    import tvm
    from tvm.target import codegen

    feats = codegen.llvm_get_cpu_features(tvm.target.Target(tvm_dict))
    return sorted(f for f in feats if f in _CPUINFO_FLAG and _CPUINFO_FLAG[f] not in flags)


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_thaw(v) for v in value]
    return value
