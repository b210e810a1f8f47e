"""Load and run an edgekit artifact. Apps embed this module: it needs numpy and TVM's runtime
(the ``apache-tvm`` and ``apache-tvm-ffi`` wheels), nothing else from edgekit or beyond.

An artifact is a directory ``NAME.edgekit/`` holding ``manifest.json``, the compiled
library ``model.so`` and the ONNX model it was compiled from. ``load`` refuses an artifact
whose files do not match the sha256 digests in its manifest.

"TVM's runtime" means ``libtvm_runtime.so`` driven through ``tvm_ffi``: this module never
imports the ``tvm`` package, whose ``__init__`` loads the compiler library
(``libtvm_compiler.so``, LLVM inside) and imports Relax and its frontends, seconds of start-up
an app does not need. It loads the runtime library itself and calls the functions that
library registers (the Relax VM's ``vm_load_executable`` / ``vm_initialization``, the
``runtime.TVMTensor*`` copies). The same process may import the full ``tvm`` before or after:
both load the same library file, which the dynamic loader maps once.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import importlib.util
import json
import os
import platform
import struct
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
LIBRARY = "model.so"
_POOLED_ALLOCATOR = 2  # the Relax VM's allocator kinds: 1 naive, 2 pooled (what tvm uses)


class ArtifactError(ValueError):
    """The artifact is missing, malformed, tampered with, or built for another machine (or
    TVM's runtime, which runs it, is not installed)."""


class RangeWarning(UserWarning):
    """An input left the range the model's approximate (fitted) passes were calibrated on."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---- the manifest's schema: every problem named, never a KeyError or TypeError later ----

_HEX = frozenset("0123456789abcdef")


def _is_int(v: Any) -> bool:
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
        if not (isinstance(shape, list) and all(_is_int(d) and d >= min_dim for d in shape)):
            out.append(f"{where}.shape must be a list of integers >= {min_dim}")
        try:
            if not isinstance(t.get("dtype"), str):
                raise TypeError
            if min_dim >= 0:  # inputs and states are built and checked with numpy
                np.dtype(t["dtype"])
        except (TypeError, ValueError):
            out.append(f"{where}.dtype must name a numpy dtype, not {t.get('dtype')!r}")
        if t.get("high") is not None and not _is_int(t["high"]):
            out.append(f"{where}.high must be an integer")
    return out


def _streaming_problems(s: Any) -> list[str]:
    if not isinstance(s, dict):
        return ["streaming must be an object"]
    out = [f"streaming.{k} must be an integer >= 0" for k in ("chunk", "delay", "time_axis")
           if (k in s or k != "time_axis") and not (_is_int(s.get(k)) and s[k] >= 0)]
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
    """Every way ``manifest`` breaks the artifact schema (version 1), one line each."""
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
    mem = m.get("memory")
    if mem is not None and not (isinstance(mem, dict) and all(
            _is_int(mem.get(k)) and mem[k] >= 0 for k in MEMORY_PARTS)):
        out.append(f"memory must be an object of {', '.join(MEMORY_PARTS)}: integers >= 0")
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
    mem, free = manifest.get("memory"), available_memory()
    if not mem or free is None:
        return None
    need = sum(mem[k] for k in MEMORY_PARTS)
    if need <= free:
        return None
    return (f"{what} needs an estimated {human_bytes(need)} (inputs "
            f"{human_bytes(mem['inputs'])}, weights {human_bytes(mem['weights'])}, largest "
            f"activations {human_bytes(mem['activations'])}; recorded at compile time) but "
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


# ---- reading an artifact: one pass over exactly the bytes that will be used ----

def _read_nofollow(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _check(root: Path, sha256: str | None, check_hashes: bool) -> tuple[dict, bytes | None]:
    """The validated manifest and (with ``check_hashes``) the library's bytes, hashed."""
    if not root.is_dir():
        raise ArtifactError(f"{root} is not an edgekit artifact directory")
    try:
        raw = _read_nofollow(root / MANIFEST)
    except FileNotFoundError:
        raise ArtifactError(f"{root} has no {MANIFEST}: not an edgekit artifact") from None
    except OSError as exc:
        raise ArtifactError(f"{root / MANIFEST} cannot be read (a symlink is refused): "
                            f"{exc.strerror or exc}") from None
    digest = hashlib.sha256(raw).hexdigest()
    if sha256 is not None and digest != sha256.strip().lower():
        raise ArtifactError(f"{root}: artifact digest {digest} is not the pinned {sha256} "
                            "(a different or modified artifact)")
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{root / MANIFEST} is not valid JSON: {exc}") from None
    problems = manifest_problems(manifest)
    if problems:
        raise ArtifactError(f"{root / MANIFEST} is malformed: {'; '.join(problems)}")
    if not check_hashes:
        return manifest, None
    files = manifest["files"]
    present = set()
    for entry in os.scandir(root):
        if entry.is_symlink() or not entry.is_file(follow_symlinks=False):
            raise ArtifactError(f"{root}: {entry.name} is a symlink or not a regular file; "
                                "an artifact holds only the files its manifest lists")
        present.add(entry.name)
    unlisted = sorted(present - set(files) - {MANIFEST})
    if unlisted:
        raise ArtifactError(f"{root}: {unlisted[0]} is not listed in the manifest "
                            "(added or tampered with)")
    library = None
    for name, want in files.items():
        if name not in present:
            raise ArtifactError(f"artifact file {name} is missing")
        data = _read_nofollow(root / name) if name == LIBRARY else None
        got = hashlib.sha256(data).hexdigest() if data is not None else sha256_file(root / name)
        if got != want:
            raise ArtifactError(f"artifact file {name} does not match its sha256 in the "
                                "manifest (modified or corrupted)")
        library = data if data is not None else library
    problem = elf_problem(library, manifest["target"].get("machine"))
    if problem:
        raise ArtifactError(f"{root / LIBRARY} {problem}")
    return manifest, library


def manifest_digest(path: str | Path) -> str:
    """The sha256 of ``manifest.json``: it lists every file's sha256, so it pins the whole
    artifact (``edgekit verify`` prints it; ``load(path, sha256=...)`` checks it)."""
    try:
        return hashlib.sha256(_read_nofollow(Path(path) / MANIFEST)).hexdigest()
    except OSError as exc:
        raise ArtifactError(f"{path} has no readable {MANIFEST}: {exc.strerror or exc}") from None


def read_artifact(path: str | Path, sha256: str | None = None) -> tuple[dict[str, Any], bytes]:
    """The validated manifest and the bytes of ``model.so`` that were hashed, with every check
    ``load`` makes before loading. What runs the library elsewhere (per-op timing, the
    device runner, a remote device) runs these bytes (``library_file``), never a second read
    of the path, which may have changed since the check."""
    manifest, library = _check(Path(path), sha256, True)
    assert library is not None  # check_hashes=True always returns the library
    return manifest, library


def read_manifest(path: str | Path, check_hashes: bool = True,
                  sha256: str | None = None) -> dict[str, Any]:
    """Read and validate ``manifest.json``; by default also check that the directory holds
    exactly the listed files (no symlinks), each matching its digest, and that the library
    is a complete ELF file for the target's machine. ``sha256``: the digest the manifest
    must have (see ``manifest_digest``)."""
    return _check(Path(path), sha256, check_hashes)[0]


@contextlib.contextmanager
def library_file(data: bytes) -> Iterator[tuple[Path, int | None]]:
    """A fresh file name whose content is exactly ``data`` (bytes already hashed), for as long
    as the ``with`` lasts: ``(path, fd)``. A file replaced or rewritten after the check cannot
    be what runs, and a reload of a replaced artifact gets the new code (the dynamic loader
    reuses a loaded library when the name or the file, device and inode, matches). Linux: a
    sealed memfd (an anonymous file nobody can write, immune to a noexec /tmp) reached through
    a uniquely named symlink to ``/proc/self/fd/FD``; ``fd`` is its descriptor, and a child
    process that inherits it at the same number (``subprocess``'s ``pass_fds``) reaches the
    same bytes through the same path, since ``/proc/self`` is whoever resolves it. Elsewhere
    (``fd`` None) a private copy in a fresh 0700 directory. Both are removed afterwards."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="edgekit-lib-") as d:
        name = Path(d) / LIBRARY
        if not hasattr(os, "memfd_create"):
            name.write_bytes(data)
            yield name, None
            return
        fd = os.memfd_create(LIBRARY, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            import fcntl

            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                        | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
            name.symlink_to(f"/proc/self/fd/{fd}")
            yield name, fd
        finally:
            os.close(fd)


def _load_library(data: bytes) -> Any:
    """Load a shared library from bytes already hashed (see ``library_file``)."""
    with library_file(data) as (name, _):
        return _func("ffi.Module.load_from_file.so")(str(name), "so")


@functools.cache
def _tvm_ffi() -> ModuleType:
    """``tvm_ffi`` with ``libtvm_runtime`` loaded, without torch unless the app imported it.

    tvm_ffi's ``__init__`` (and its ``core``, ``_convert`` and ``stream`` modules) run
    ``try: import torch`` for torch-tensor interop: seconds of start-up that running an
    artifact never needs. While tvm_ffi is first imported, a ``None`` entry in
    ``sys.modules`` makes that import fail as if torch were absent; the entry is removed
    afterwards, so the app (or edgekit's compiler) can still import torch. tvm_ffi then
    passes torch tensors through the DLPack protocol instead of its torch fast path."""
    block = "tvm_ffi" not in sys.modules and "torch" not in sys.modules
    if block:
        sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        import tvm_ffi
        from tvm_ffi.libinfo import load_lib_ctypes
    except ImportError as exc:
        raise ArtifactError(f"TVM's runtime is not installed ({exc}): pip install "
                            "apache-tvm==0.27.0.post1 'apache-tvm-ffi<0.1.15'") from None
    finally:
        if block and "torch" in sys.modules and sys.modules["torch"] is None:
            del sys.modules["torch"]
    # RTLD_GLOBAL, as tvm.base does: compiled libraries resolve TVMBackend* symbols from it
    load_lib_ctypes("tvm", "tvm_runtime", "RTLD_GLOBAL", extra_lib_paths=_tvm_lib_dirs())
    return tvm_ffi


def _tvm_lib_dirs() -> list[Path]:
    """Where the apache-tvm wheel keeps its libraries, found without importing ``tvm``
    (the search ``tvm.libinfo.package_lib_paths`` does, so both pick the same file)."""
    dirs = [Path(os.environ["TVM_LIBRARY_PATH"])] if os.environ.get("TVM_LIBRARY_PATH") else []
    spec = importlib.util.find_spec("tvm")
    if spec is None or not spec.submodule_search_locations:
        raise ArtifactError("TVM's runtime is not installed: pip install apache-tvm==0.27.0.post1")
    return dirs + [Path(p) / "lib" for p in spec.submodule_search_locations]


@functools.cache
def _func(name: str) -> Callable:
    """A global function registered by TVM's runtime library."""
    return _tvm_ffi().get_global_func(name)


def _cuda_available() -> bool:
    """Whether TVM's CUDA runtime loads (it links the driver's libcuda) and sees a GPU."""
    tvm_ffi = _tvm_ffi()
    from tvm_ffi.libinfo import load_lib_ctypes

    try:  # RTLD_LOCAL, as tvm.backend.cuda does: it only registers the CUDA device API
        load_lib_ctypes("tvm", "tvm_runtime_cuda", "RTLD_LOCAL", extra_lib_paths=_tvm_lib_dirs())
        cuda = tvm_ffi.device("cuda", 0)
        exist = _func("runtime.GetDeviceAttr")(cuda.dlpack_device_type(), cuda.index, 0)
    except (OSError, RuntimeError):
        return False
    return bool(exist)


def set_threads(threads: int) -> int:
    """Use ``threads`` TVM worker threads (env var for a fresh runtime, pool reset otherwise)."""
    os.environ["TVM_NUM_THREADS"] = str(threads)
    _func("runtime.config_threadpool")(1, threads)
    return threads


def _to_device(a: np.ndarray, device: Any) -> Any:
    """A TVM tensor on ``device`` holding a copy of the C-contiguous array ``a``."""
    ffi = _tvm_ffi()
    t = _func("runtime.TVMTensorAllocWithScope")(ffi.Shape(a.shape), ffi.dtype(str(a.dtype)),
                                                 device, None)
    _func("runtime.TVMTensorCopyFromBytes")(t, a.ctypes.data_as(ctypes.c_void_p), a.nbytes)
    return t


def _to_numpy(t: Any) -> np.ndarray:
    """A host copy of a TVM tensor (from any device)."""
    out = np.empty(tuple(t.shape), dtype=np.dtype(str(t.dtype)))
    _func("runtime.TVMTensorCopyToBytes")(t, out.ctypes.data_as(ctypes.c_void_p), out.nbytes)
    return out


class CompiledModel:
    """A loaded artifact: ``run(inputs)`` with inputs checked against the manifest."""

    def __init__(self, path: str | Path, manifest: dict[str, Any], library: bytes | None = None,
                 warn_ranges: bool = True):
        """``library``: the bytes of ``model.so`` already checked against the manifest (what
        ``load`` passes); without it the artifact is read and checked here. ``warn_ranges``:
        see ``run``."""
        self.path = Path(path)
        self.warn_ranges = warn_ranges
        self._range_warned: set[str] = set()
        if library is None:
            manifest, library = _check(self.path, None, True)
        self.manifest = manifest
        self.inputs: list[dict] = manifest["inputs"]
        self.outputs: list[dict] = manifest["outputs"]
        target = manifest["target"]
        machine = platform.machine()
        if target.get("machine") not in (None, machine):
            raise ArtifactError(
                f"artifact was built for {target.get('name')!r} ({target.get('machine')}); "
                f"this machine is {machine}: run it on the device")
        tvm_ffi = _tvm_ffi()
        cuda = target.get("device") == "cuda"
        if cuda:
            if not _cuda_available():
                raise ArtifactError(f"artifact was built for {target.get('name')!r} (a CUDA "
                                    "GPU); this machine has no CUDA GPU or driver: run it on "
                                    "the device")
            from edgekit.devices.cuda import register_ptx

            register_ptx(self.path, manifest)  # load the artifact's PTX, not nvcc's output
        self.device = tvm_ffi.device("cuda" if cuda else "cpu", 0)
        problem = elf_problem(library, machine)  # the manifest may name no machine
        if problem:
            raise ArtifactError(f"{self.path / LIBRARY} {problem}")
        self.library = _load_library(library)  # the hashed bytes (per-op timing reuses it)
        self._vm = self.library["vm_load_executable"]()
        # (device type, index, allocator) per device; the VM runs shape functions on the CPU
        devices = [self.device, *([tvm_ffi.device("cpu", 0)] if cuda else [])]
        self._vm["vm_initialization"](*(v for d in devices for v in
                                        (d.dlpack_device_type(), d.index, _POOLED_ALLOCATOR)))
        self._main = self._vm["main"]
        self._sync = functools.partial(_func("runtime.Device_StreamSync"), self.device, 0)

    def _check(self, args: tuple, kwargs: Mapping[str, Any]) -> list[np.ndarray]:
        names = [i["name"] for i in self.inputs]
        if args and kwargs:
            raise ValueError("give inputs either positionally or by name, not both")
        if len(args) == 1 and isinstance(args[0], Mapping):
            kwargs, args = args[0], ()
        if args:
            if len(args) != len(names):
                raise ValueError(f"expected {len(names)} inputs ({', '.join(names)}), "
                                 f"got {len(args)}")
            kwargs = dict(zip(names, args, strict=True))
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise ValueError(f"unknown input {unknown[0]!r}; expected {', '.join(names)}")
        arrays = []
        for spec in self.inputs:
            name = spec["name"]
            if name not in kwargs:
                raise ValueError(f"missing input {name!r}")
            a = np.asarray(kwargs[name])
            if tuple(a.shape) != tuple(spec["shape"]):
                raise ValueError(f"input {name!r}: expected shape {tuple(spec['shape'])}, "
                                 f"got {tuple(a.shape)}")
            if a.dtype != np.dtype(spec["dtype"]):
                raise ValueError(f"input {name!r}: expected dtype {spec['dtype']}, got {a.dtype}")
            high = spec.get("high")  # an index into a table: out of range would read wild memory
            if high and a.size and (a.max() >= high or a.min() < -high):
                raise ValueError(f"input {name!r}: values index a table of {high} rows, got "
                                 f"{a.min()}..{a.max()}")
            arrays.append(np.ascontiguousarray(a))
        return arrays

    def _to_device(self, arrays: list[np.ndarray]) -> list:
        return [_to_device(a, self.device) for a in arrays]

    def _collect(self, result) -> dict[str, np.ndarray]:
        flat = [result] if isinstance(result, _tvm_ffi().Tensor) else list(result)
        names = [o["name"] for o in self.outputs]
        return {n: _to_numpy(t) for n, t in zip(names, flat, strict=True)}

    def run(self, *args: Any, **kwargs: Any) -> dict[str, np.ndarray]:
        """Run once. Inputs: one dict, keyword arrays, or positional arrays in input order.
        Returns ``{output name: array}`` in output order.

        When the manifest records ``calibrated_ranges`` (the min/max of each input over the
        real calibration samples its fitted passes were fitted on) and ``warn_ranges`` is
        on, an input with a value outside its range, or a NaN, gives one ``RangeWarning``
        line, once per input for the life of this object: the polynomial approximations are
        only fitted inside the range, and may be far off (or non-finite) outside it."""
        arrays = self._check(args, kwargs)
        if self.warn_ranges:
            self._warn_ranges(arrays)
        return self._collect(self._main(*self._to_device(arrays)))

    def _warn_ranges(self, arrays: list[np.ndarray]) -> None:
        ranges = self.manifest.get("calibrated_ranges") or {}
        for spec, a in zip(self.inputs, arrays, strict=True):
            name, r = spec["name"], ranges.get(spec["name"])
            if r is None or name in self._range_warned or not a.size:
                continue
            lo, hi = a.min(), a.max()  # a NaN makes both NaN, and both compares false
            if lo >= r["min"] and hi <= r["max"]:
                continue
            self._range_warned.add(name)
            seen = "NaN" if np.isnan(lo) else f"values in [{lo:.6g}, {hi:.6g}]"
            warnings.warn(f"input {name!r} has {seen}, outside [{r['min']:.6g}, "
                          f"{r['max']:.6g}], the range its approximate passes were calibrated "
                          "on: outputs may be inaccurate (warned once per input; "
                          "warn_ranges=False turns this off)", RangeWarning, stacklevel=3)

    def prepare(self, *args: Any, **kwargs: Any) -> Callable[[], None]:
        """A zero-argument callable that runs on pre-staged inputs and waits for the device
        (what the profiler times)."""
        tensors = self._to_device(self._check(args, kwargs))
        main, sync = self._main, self._sync

        def call() -> None:
            main(*tensors)
            sync()

        return call

    def stream(self) -> StreamSession:
        """A stateful session for a step artifact (raises ArtifactError otherwise)."""
        return StreamSession(self)


class StreamSession:
    """Frame-by-frame execution of a step artifact (``edgekit export --streaming``).

    The manifest's ``streaming`` section names the frame input/output and every state tensor
    with its shape, dtype and initial value. The session keeps the states on the device
    between calls, feeding each call's state outputs to the next call; ``reset()`` starts a
    new stream. Output ``t`` belongs to input frame ``t - delay`` (``delay`` > 0 only when the
    model looks ahead)."""

    def __init__(self, model: CompiledModel):
        spec = model.manifest.get("streaming")
        if not spec:
            raise ArtifactError(f"{model.path} is not a step artifact (export the model with "
                                "`edgekit export MODEL --streaming`)")
        self.model = model
        self.chunk, self.delay = int(spec["chunk"]), int(spec["delay"])
        self.time_axis = int(spec.get("time_axis", 1))
        self.states: list[dict] = spec["states"]
        ins = [spec["frame_input"], *(s["input"] for s in self.states)]
        outs = [spec["frame_output"], *(s["output"] for s in self.states)]
        if [i["name"] for i in model.inputs] != ins or [o["name"] for o in model.outputs] != outs:
            raise ArtifactError(f"{model.path}: the manifest's streaming section does not match "
                                "the model's inputs and outputs")
        self.frame_spec = model.inputs[0]
        self.reset()

    def reset(self) -> None:
        """Back to the initial state (a new stream)."""
        self._state = self.model._to_device(
            [np.full(s["shape"], s["init"], dtype=s["dtype"]) for s in self.states])
        self.frames = 0

    @property
    def state(self) -> dict[str, np.ndarray]:
        """A copy of the current state, by state input name."""
        return {s["input"]: _to_numpy(t) for s, t in zip(self.states, self._state, strict=True)}

    def _frame(self, frame: Any):
        a = np.asarray(frame)
        spec = self.frame_spec
        if tuple(a.shape) != tuple(spec["shape"]) or a.dtype != np.dtype(spec["dtype"]):
            raise ValueError(f"frame {spec['name']!r}: expected {tuple(spec['shape'])} "
                             f"{spec['dtype']}, got {tuple(a.shape)} {a.dtype}")
        return self.model._to_device([np.ascontiguousarray(a)])[0]

    def _advance(self, frame) -> Any:
        flat = list(self.model._main(frame, *self._state))
        self._state = flat[1:]
        self.frames += self.chunk
        return flat[0]

    def step(self, frame: Any) -> np.ndarray:
        """Feed the next chunk of frames; returns the output for it."""
        return _to_numpy(self._advance(self._frame(frame)))

    def run(self, sequence: Any) -> np.ndarray:
        """Feed a whole sequence (time on ``time_axis``) chunk by chunk, continuing from the
        current state; returns every step's output concatenated along time."""
        seq = np.asarray(sequence)
        steps = seq.shape[self.time_axis] if seq.ndim > self.time_axis else 0
        if steps == 0 or steps % self.chunk:
            raise ValueError(f"sequence of shape {seq.shape}: expected a positive multiple of "
                             f"{self.chunk} frame(s) on axis {self.time_axis}")
        outs = [self.step(np.take(seq, range(i, i + self.chunk), axis=self.time_axis))
                for i in range(0, steps, self.chunk)]
        return np.concatenate(outs, axis=self.time_axis)

    def prepare(self, frame: Any) -> Callable[[], None]:
        """A zero-argument callable that advances the stream by one staged chunk and waits
        for the device (what the profiler times: per-frame latency with state carried)."""
        staged, sync = self._frame(frame), self.model._sync

        def call() -> None:
            self._advance(staged)
            sync()

        return call


def load(path: str | Path, sha256: str | None = None, warn_ranges: bool = True
         ) -> CompiledModel:
    """Load an artifact directory after checking its manifest (schema, and ``sha256``, the
    digest ``edgekit verify`` prints, when given), that it holds exactly the listed files with
    their digests, that its library is a complete ELF file for this machine, and that its
    recorded memory estimate fits in the memory available (``memory_problem``).
    The library runs from the bytes that were hashed, never from a second read of the file.
    ``warn_ranges``: warn when an input leaves its calibrated range (``CompiledModel.run``)."""
    manifest, library = _check(Path(path), sha256, True)
    problem = memory_problem(manifest, f"running {path}")
    if problem:
        raise ArtifactError(problem)
    return CompiledModel(path, manifest, library, warn_ranges)
