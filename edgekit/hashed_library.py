"""The compiled library as the bytes that were hashed, and TVM's runtime library that loads it.

``read_hashed`` copies ``model.so`` chunk by chunk into a sealed memfd while hashing it, so
what is loaded later is exactly what was checked; ``library_file`` gives those bytes a file
name for the dynamic loader; ``load_library`` loads them with one resident copy of the
weights (the embedded modules read from the hashed bytes). ``runtime_ffi()`` / ``func(name)``
reach ``libtvm_runtime`` without importing the ``tvm`` package.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import mmap
import os
import struct
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from edgekit.manifest import LIBRARY, ArtifactError

# ---- reading an artifact: one pass over exactly the bytes that will be used ----

def read_nofollow(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        return f.read()


Image = bytes | mmap.mmap  # a library's bytes as hashed (read-only map of a sealed memfd)
_CHUNK = 1 << 20


def _sealed_memfd() -> int:
    return os.memfd_create(LIBRARY, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)


def _seal(fd: int) -> None:
    import fcntl

    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)


def read_hashed(path: Path) -> tuple[Image, str]:
    """The bytes of ``path`` (a symlink refused) and their sha256, from one read. Linux: copied
    chunk by chunk into a memfd, sealed, and returned mapped read-only, so the whole file is
    never a Python object (the memfd lives as long as the map) and cannot change after it was
    hashed. Elsewhere: bytes."""
    if not hasattr(os, "memfd_create"):
        data = read_nofollow(path)
        return data, hashlib.sha256(data).hexdigest()
    h, fd = hashlib.sha256(), _sealed_memfd()
    try:
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb", buffering=0) as f:
            buf, at = bytearray(_CHUNK), 0
            with memoryview(buf) as view:
                while n := f.readinto(buf):
                    h.update(view[:n])
                    _write_all(fd, view[:n], at)
                    at += n
        _seal(fd)
        size = os.fstat(fd).st_size
        return (mmap.mmap(fd, size, prot=mmap.PROT_READ) if size else b""), h.hexdigest()
    finally:
        os.close(fd)


def _write_all(fd: int, data: Any, at: int) -> None:
    """``data`` (bytes-like) written to ``fd`` at offset ``at``, in chunks."""
    with memoryview(data) as view:
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:done + _CHUNK], at + done)




@contextlib.contextmanager
def library_file(data: Image, patch: tuple[int, int, bytes] | None = None
                 ) -> Iterator[tuple[Path, int | None]]:
    """A fresh file name whose content is exactly ``data`` (bytes already hashed), for as long
    as the ``with`` lasts: ``(path, fd)``. A file replaced or rewritten after the check cannot
    be what runs, and a reload of a replaced artifact gets the new code (the dynamic loader
    reuses a loaded library when the name or the file, device and inode, matches). Linux: a
    sealed memfd (an anonymous file nobody can write, immune to a noexec /tmp) reached through
    a uniquely named symlink to ``/proc/self/fd/FD``; ``fd`` is its descriptor, and a child
    process that inherits it at the same number (``subprocess``'s ``pass_fds``) reaches the
    same bytes through the same path, since ``/proc/self`` is whoever resolves it. Elsewhere
    (``fd`` None) a private copy in a fresh 0700 directory. Both are removed afterwards.
    ``patch`` ``(start, end, new)``: bytes ``start:end`` become ``new`` then zeros (a hole in
    the memfd: no memory), what ``load_library`` uses to leave out the embedded modules."""
    import tempfile

    start, end, new = patch or (len(data), len(data), b"")
    with tempfile.TemporaryDirectory(prefix="edgekit-lib-") as d:
        name = Path(d) / LIBRARY
        memfd = hasattr(os, "memfd_create")
        fd = _sealed_memfd() if memfd else os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                                                   0o700)
        try:
            os.ftruncate(fd, len(data))
            with memoryview(data) as view:
                _write_all(fd, view[:start], 0)
                _write_all(fd, new, start)
                _write_all(fd, view[end:], end)
            if not memfd:
                os.close(fd)
                fd = -1
                yield name, None
                return
            _seal(fd)
            name.symlink_to(f"/proc/self/fd/{fd}")
            yield name, fd
        finally:
            if fd >= 0:
                os.close(fd)


# ---- loading with one copy of the weights: the embedded modules read from the hashed bytes --

_LIBRARY_BIN = b"__tvm_ffi__library_bin"  # tvm_ffi's symbol::tvm_ffi_library_bin
# (ELF64 struct, ELF32 struct, indices of the fields used) for section headers, symbols and
# program headers: (type, offset, size, link, entsize), (name, value), (type, offset, vaddr,
# filesz)
_SHDR = ("<IIQQQQIIQQ", "<IIIIIIIIII", (1, 4, 5, 6, 9))
_SYM = ("<IBBHQQ", "<IIIBBH", (0, 4), (0, 1))
_PHDR = ("<IIQQQQQQ", "<IIIIIIII", (0, 2, 3, 5), (0, 1, 2, 4))


def _symbol_offset(data: Image, symbol: bytes) -> int | None:
    """File offset of dynamic ``symbol`` in the ELF image ``data`` (``elf_problem`` passed)."""
    wide = data[4] == 2
    phoff, shoff = struct.unpack_from("<QQ" if wide else "<II", data, 32 if wide else 28)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", data, 54 if wide else 42)
    shdr = _SHDR[0 if wide else 1]
    sym_fmt, sym_at = (_SYM[0], _SYM[2]) if wide else (_SYM[1], _SYM[3])
    sections = [struct.unpack_from(shdr, data, shoff + i * shentsize) for i in range(shnum)]
    value = None
    for sec in sections:
        kind, offset, size, link, entsize = (sec[i] for i in _SHDR[2])
        if kind != 11 or not entsize or link >= shnum:  # SHT_DYNSYM, names in section `link`
            continue
        names = sections[link][_SHDR[2][1]]
        for i in range(size // entsize):
            entry = struct.unpack_from(sym_fmt, data, offset + i * entsize)
            at = names + entry[sym_at[0]]
            if data[at:at + len(symbol) + 1] == symbol + b"\0":
                value = entry[sym_at[1]]
    if value is None:
        return None
    ph_fmt, ph_at = (_PHDR[0], _PHDR[2]) if wide else (_PHDR[1], _PHDR[3])
    for i in range(phnum):
        kind, offset, vaddr, filesz = (struct.unpack_from(ph_fmt, data, phoff + i * phentsize)[j]
                                       for j in ph_at)
        if kind == 1 and vaddr <= value < vaddr + filesz:  # PT_LOAD
            return offset + value - vaddr
    return None


def _embedded_modules(data: Image) -> tuple[int, int, list, list[int], list[int]] | None:
    """The library binary tvm_ffi deserializes at load (``library_module.cc``,
    ``ProcessLibraryBin``): ``<u64 n>`` then n bytes: ``<indptr: u64 vec> <children: u64 vec>``
    and per module ``<kind: str>`` plus, except for ``_lib`` (the shared library itself),
    ``<bytes: str>`` (u64 length first). Returns its (start, end) in the file, the modules as
    (kind, (start, end) of their bytes or None) and the import tree (CSR), or None when there
    is none or it is not well formed (then tvm_ffi reads it as usual)."""
    start = _symbol_offset(data, _LIBRARY_BIN)
    if start is None:
        return None
    (n,) = struct.unpack_from("<Q", data, start)
    end, pos = start + 8 + n, start + 8
    if end > len(data):
        return None

    def take(width: int) -> tuple[int, int]:
        """A u64 count, then count items of ``width`` bytes: where the items are."""
        nonlocal pos
        (count,) = struct.unpack_from("<Q", data, pos)
        first, pos = pos + 8, pos + 8 + count * width
        if pos > end:
            raise struct.error("past the end of the library binary")
        return first, pos

    def vector() -> list[int]:
        first, last = take(8)
        return list(struct.unpack_from(f"<{(last - first) // 8}Q", data, first))

    indptr, children = vector(), vector()
    modules = []
    for _ in range(max(len(indptr) - 1, 0)):
        first, last = take(1)
        kind = bytes(data[first:last]).decode()
        modules.append((kind, None if kind == "_lib" else take(1)))
    if not modules or sum(k == "_lib" for k, _ in modules) != 1 or indptr[-1] != len(children) \
            or any(c >= len(modules) for c in children):
        return None
    return start, end, modules, indptr, children


def _library_only_bin() -> bytes:
    """A library binary holding just ``_lib`` (one module, no imports)."""
    body = struct.pack("<QQQ", 2, 0, 0) + struct.pack("<Q", 0) + struct.pack("<Q", 4) + b"_lib"
    return struct.pack("<Q", len(body)) + body


def load_library(data: Image) -> Any:
    """Load a shared library from bytes already hashed (see ``library_file``); a map of a
    sealed memfd (``read_hashed``) is closed once loaded.

    tvm_ffi's loader would copy each embedded module (the Relax VM's executable, weights
    inside) out of the mapped library into a string, copy that into its ``Bytes``, and the VM
    copies the weights out into tensors: with the memfd (which stays mapped while the library
    is loaded) four copies of the weights at the peak and two resident (measured on
    all-MiniLM-L6-v2: 428 and 172 MiB). Here the library is loaded with its library binary
    replaced by one that holds only ``_lib`` (the rest a hole in the memfd), and each embedded
    module is loaded from the hashed bytes by the loader of its kind and imported as tvm_ffi
    would import it (its ``_lib`` in the same place of the import tree): the code that runs
    is still exactly the hashed bytes, three copies of the weights at the peak, one
    resident."""
    try:
        split = _embedded_modules(data)
    except (struct.error, UnicodeDecodeError, IndexError):
        split = None
    load_so = func("ffi.Module.load_from_file.so")
    stub = _library_only_bin()
    if split is None or split[1] - split[0] < len(stub):
        with library_file(data) as (name, _):
            module = load_so(str(name), "so")
        close(data)
        return module
    start, end, modules, indptr, children = split
    blobs = [None if where is None else data[where[0]:where[1]] for _, where in modules]
    with library_file(data, (start, end, stub)) as (name, _):
        lib = load_so(str(name), "so")
    close(data)  # the memfd with the whole library goes: its weights are in `blobs` now
    loaded = []
    for i, (kind, _) in enumerate(modules):
        blob, blobs[i] = blobs[i], None  # each blob freed once its module holds the weights
        loaded.append(lib if blob is None else func(f"ffi.Module.load_from_bytes.{kind}")(blob))
        del blob
    for i, module in enumerate(loaded):
        for child in children[indptr[i]:indptr[i + 1]]:
            module.import_module(loaded[child])
    return loaded[0]


def close(data: Image) -> None:
    if isinstance(data, mmap.mmap):
        data.close()


@functools.cache
def runtime_ffi() -> ModuleType:
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
    load_lib_ctypes("tvm", "tvm_runtime", "RTLD_GLOBAL", extra_lib_paths=tvm_lib_dirs())
    return tvm_ffi


def tvm_lib_dirs() -> list[Path]:
    """Where the apache-tvm wheel keeps its libraries, found without importing ``tvm``
    (the search ``tvm.libinfo.package_lib_paths`` does, so both pick the same file)."""
    dirs = [Path(os.environ["TVM_LIBRARY_PATH"])] if os.environ.get("TVM_LIBRARY_PATH") else []
    spec = importlib.util.find_spec("tvm")
    if spec is None or not spec.submodule_search_locations:
        raise ArtifactError("TVM's runtime is not installed: pip install apache-tvm==0.27.0.post1")
    return dirs + [Path(p) / "lib" for p in spec.submodule_search_locations]


@functools.cache
def func(name: str) -> Callable:
    """A global function registered by TVM's runtime library."""
    return runtime_ffi().get_global_func(name)


def cuda_available() -> bool:
    """Whether TVM's CUDA runtime loads (it links the driver's libcuda) and sees a GPU."""
    tvm_ffi = runtime_ffi()
    from tvm_ffi.libinfo import load_lib_ctypes

    try:  # RTLD_LOCAL, as tvm.backend.cuda does: it only registers the CUDA device API
        load_lib_ctypes("tvm", "tvm_runtime_cuda", "RTLD_LOCAL", extra_lib_paths=tvm_lib_dirs())
        cuda = tvm_ffi.device("cuda", 0)
        exist = func("runtime.GetDeviceAttr")(cuda.dlpack_device_type(), cuda.index, 0)
    except (OSError, RuntimeError):
        return False
    return bool(exist)
