"""PTX for CUDA artifacts, so that a GPU machine needs only the driver to run them.

Built on a machine without a CUDA driver, TVM 0.27 stores each CUDA module as CUDA C source
(format "cuda") and compiles it when the library is loaded, through the global callback
``tvm_callback_cuda_compile``: the device would need nvcc or NVRTC. At compile time edgekit
therefore compiles each module's source to PTX with nvcc (``tvm.support.nvcc.compile_cuda``)
for the target's ``arch`` and writes ``cuda-<sha>.cu`` and ``cuda-<sha>.ptx`` into the
artifact (``<sha>``: the first 16 hex digits of the source's sha256). At load time
``register_ptx`` installs a callback that hands TVM the stored PTX for a source it knows,
and defers to any earlier callback (nvcc/NVRTC) for a source it does not.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgekit.errors import EdgekitError, last_line

PREFIX = "cuda-"
_KNOWN: dict[str, Path] = {}  # source digest -> PTX file, for every loaded CUDA artifact
_state: dict[str, Any] = {"previous": None, "installed": False}


def source_digest(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def _modules(mod) -> Iterator[Any]:
    yield mod
    for sub in mod.imports:
        yield from _modules(sub)


def write_ptx(executable, target, out_dir: Path) -> list[str]:
    """Compile every CUDA module of ``executable`` to PTX with nvcc for the ``arch`` of
    ``target`` (an ``edgekit.targets.Target``) and write the source and PTX into ``out_dir``;
    returns the PTX file names."""
    from tvm.support import nvcc

    tvm_target = target.tvm_target()
    arch = str(tvm_target.arch)

    if not shutil.which("nvcc"):
        raise EdgekitError("CUDA targets need nvcc (the CUDA toolkit) to build the artifact's "
                           "PTX; install it or put it on PATH")
    written = []
    for mod in _modules(executable.mod):
        if mod.kind != "cuda":
            continue
        source = mod.inspect_source("cuda")
        if not source:
            raise EdgekitError("TVM's CUDA module holds no CUDA source to compile to PTX")
        try:
            with tvm_target:  # nvcc reads the compute version from the current target
                ptx = bytes(nvcc.compile_cuda(source, target_format="ptx", arch=arch,
                                              compiler="nvcc"))
        except Exception as exc:
            raise EdgekitError(f"nvcc could not compile the CUDA kernels to PTX for {arch}: "
                               f"{last_line(exc)}") from None
        if not ptx.startswith(b"//"):
            raise EdgekitError("nvcc did not produce PTX text")
        name = PREFIX + source_digest(source)
        (out_dir / f"{name}.cu").write_text(source)
        (out_dir / f"{name}.ptx").write_bytes(ptx)
        written.append(f"{name}.ptx")
    return written


def ptx_files(root: Path, manifest: dict[str, Any]) -> dict[str, Path]:
    """{source digest: PTX path} for the PTX files an artifact's manifest lists."""
    return {name[len(PREFIX):-len(".ptx")]: root / name for name in manifest.get("files", {})
            if name.startswith(PREFIX) and name.endswith(".ptx")}


def register_ptx(root: Path, manifest: dict[str, Any]) -> None:
    """Make TVM use the artifact's PTX when it loads the artifact's CUDA modules."""
    import tvm_ffi

    _KNOWN.update(ptx_files(Path(root), manifest))
    if _state["installed"]:
        return
    _state["previous"] = tvm_ffi.get_global_func("tvm_callback_cuda_compile", allow_missing=True)

    @tvm_ffi.register_global_func("tvm_callback_cuda_compile", override=True)
    def _compile(code, *rest):
        ptx = _KNOWN.get(source_digest(str(code)))
        if ptx is not None:
            return ptx.read_bytes()
        if _state["previous"] is None:
            raise RuntimeError("no PTX in the artifact for this CUDA module, and no CUDA "
                               "compiler callback to build it")
        return _state["previous"](code, *rest)

    _state["installed"] = True
