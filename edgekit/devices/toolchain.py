"""Build ``edgekit-runner`` (``runner.cc``) for this machine or for aarch64 Linux.

The runner links the TVM runtime of the same release that compiled the artifact. For this
machine that is the installed ``apache-tvm`` / ``apache-tvm-ffi`` wheels. For aarch64 it is
PyPI's aarch64 builds of the same versions: ``pip download`` fetches them once into
``~/.cache/edgekit/wheels`` (``EDGEKIT_CACHE`` or ``XDG_CACHE_HOME`` move it), and only the two
runtime libraries and the tvm_ffi headers are unpacked. No TVM source is needed: the runner
includes only headers that the apache-tvm-ffi wheel ships.

Binaries are cached by a hash of the source, compiler and runtime, so a rebuild happens only
when one of them changes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from edgekit.errors import EdgekitError

SOURCE = Path(__file__).with_name("runner.cc")
ARCHES = ("host", "aarch64")
QEMU = {"aarch64": ("qemu-aarch64", "/usr/aarch64-linux-gnu", "qemu-user")}
_CROSS = {"aarch64": ("aarch64-linux-gnu-g++", "g++-aarch64-linux-gnu")}
_WHEEL_PLATFORM = {"aarch64": "manylinux_2_28_aarch64"}


@dataclass(frozen=True)
class Runtime:
    """Where a TVM runtime for one architecture lives."""

    arch: str
    include: Path  # tvm_ffi/include
    dlpack: Path  # the dlpack include directory
    lib_dirs: tuple[Path, ...]  # directories of libtvm_runtime.so and libtvm_ffi.so


def cache_dir() -> Path:
    """edgekit's cache directory (``EDGEKIT_CACHE``, else ``$XDG_CACHE_HOME/edgekit``)."""
    if os.environ.get("EDGEKIT_CACHE"):
        return Path(os.environ["EDGEKIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edgekit"


def tvm_versions() -> tuple[str, str]:
    """The installed (apache-tvm, apache-tvm-ffi) versions: the runtime must match them."""
    return version("apache-tvm"), version("apache-tvm-ffi")


def host_runtime() -> Runtime:
    import tvm
    import tvm_ffi

    tvm_lib = Path(tvm.__file__).parent / "lib"
    ffi_root = Path(tvm_ffi.__file__).parent
    return Runtime("host", ffi_root / "include", ffi_root / "include",
                   (tvm_lib, ffi_root / "lib"))


def wheel_command(arch: str, dest: Path) -> list[str]:
    """The ``pip download`` command that fetches the aarch64 wheels into ``dest``."""
    tvm_v, ffi_v = tvm_versions()
    return [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
            "--only-binary=:all:", "--platform", _WHEEL_PLATFORM[arch], "--python-version",
            "3.11", f"apache-tvm=={tvm_v}", f"apache-tvm-ffi=={ffi_v}", "-d", str(dest)]


def _find_wheel(wheels: Path, dist: str, ver: str, arch: str) -> Path | None:
    prefix = f"{dist.replace('-', '_')}-{ver}-"
    found = [p for p in wheels.glob(f"{prefix}*.whl") if arch in p.name]
    return found[0] if found else None


def cross_runtime(arch: str) -> Runtime:
    """The TVM runtime for ``arch`` from PyPI's wheels (downloaded and unpacked once)."""
    if arch not in _WHEEL_PLATFORM:
        raise EdgekitError(f"no runner for architecture {arch!r} (supported: aarch64, host)")
    tvm_v, ffi_v = tvm_versions()
    root = cache_dir() / "tvm-runtime" / f"{arch}-tvm{tvm_v}-ffi{ffi_v}"
    rt = Runtime(arch, root / "include", root / "dlpack", (root / "lib",))
    if (root / "lib" / "libtvm_runtime.so").is_file():
        return rt
    wheels = cache_dir() / "wheels"
    tvm_whl = _find_wheel(wheels, "apache-tvm", tvm_v, arch)
    ffi_whl = _find_wheel(wheels, "apache-tvm-ffi", ffi_v, arch)
    if tvm_whl is None or ffi_whl is None:
        wheels.mkdir(parents=True, exist_ok=True)
        cmd = wheel_command(arch, wheels)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        tvm_whl = _find_wheel(wheels, "apache-tvm", tvm_v, arch)
        ffi_whl = _find_wheel(wheels, "apache-tvm-ffi", ffi_v, arch)
        if proc.returncode != 0 or tvm_whl is None or ffi_whl is None:
            why = (proc.stderr.strip().splitlines() or ["no wheel found"])[-1]
            raise EdgekitError(f"cannot fetch the {arch} TVM runtime wheels ({why}); run "
                               f"`{' '.join(cmd[2:])}` where PyPI is reachable")
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(tvm_whl) as z:
        _extract(z, "tvm/lib/libtvm_runtime.so", tmp / "lib")
    with zipfile.ZipFile(ffi_whl) as z:
        _extract(z, "tvm_ffi/lib/libtvm_ffi.so", tmp / "lib")
        for name in z.namelist():
            for src, dst in (("tvm_ffi/include/", "include"),
                             ("tvm_ffi/3rdparty/dlpack/include/", "dlpack")):
                if name.startswith(src) and not name.endswith("/"):
                    _extract(z, name, tmp / dst / Path(name[len(src):]).parent)
    try:
        tmp.rename(root)  # atomic: a concurrent build may have won the race, which is fine
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (root / "lib" / "libtvm_runtime.so").is_file():
            raise
    return rt


def _extract(z: zipfile.ZipFile, name: str, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    with z.open(name) as src, open(dest / Path(name).name, "wb") as dst:
        shutil.copyfileobj(src, dst)


def compiler_for(arch: str) -> str:
    if arch == "host":
        found = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
        if not found:
            raise EdgekitError("building the runner needs a C++ compiler (g++): "
                               "apt-get install g++")
        return found
    name, package = _CROSS[arch]
    found = shutil.which(name)
    if not found:
        raise EdgekitError(f"building the {arch} runner needs {name}: apt-get install {package}")
    return found


def compile_command(rt: Runtime, cxx: str, out: Path) -> list[str]:
    """The compiler command line for the runner (also what examples/cpp documents)."""
    rpath = ":".join(["$ORIGIN", *(str(d) for d in rt.lib_dirs)])  # $ORIGIN: libs copied beside
    return [cxx, "-std=c++17", "-O2", str(SOURCE), "-I", str(rt.include), "-I", str(rt.dlpack),
            *(f"-L{d}" for d in rt.lib_dirs), "-Wl,--no-as-needed", "-ltvm_runtime",
            "-ltvm_ffi", f"-Wl,-rpath,{rpath}", "-o", str(out)]


def build_runner(arch: str = "host") -> tuple[Path, Runtime]:
    """Build (or reuse) ``edgekit-runner`` for ``arch``; returns its path and its runtime."""
    if arch not in ARCHES:
        raise EdgekitError(f"unknown runner architecture {arch!r} (choose from "
                           f"{', '.join(ARCHES)})")
    cxx = compiler_for(arch)
    rt = host_runtime() if arch == "host" else cross_runtime(arch)
    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    key.update(" ".join(compile_command(rt, cxx, Path("x"))).encode())
    for d in rt.lib_dirs:
        for lib in sorted(d.glob("lib*.so")):
            key.update(f"{lib.name}:{lib.stat().st_size}".encode())
    out = cache_dir() / "runner" / f"{arch}-{key.hexdigest()[:16]}" / "edgekit-runner"
    if out.is_file():
        return out, rt
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".edgekit-runner.{os.getpid()}")
    proc = subprocess.run(compile_command(rt, cxx, tmp), capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        errors = [ln for ln in proc.stderr.splitlines() if "error" in ln] or [proc.stderr]
        raise EdgekitError(f"building the {arch} runner failed: {errors[0].strip()}")
    tmp.replace(out)
    return out, rt


def launcher(arch: str, rt: Runtime) -> list[str]:
    """The command prefix that runs an ``arch`` binary here: qemu-user for foreign CPUs."""
    if arch == "host":
        return []
    qemu, sysroot, package = QEMU[arch]
    found = shutil.which(qemu)
    if not found:
        raise EdgekitError(f"running the {arch} runner here needs {qemu}: "
                           f"apt-get install {package}")
    libs = ":".join(str(d) for d in rt.lib_dirs)
    return [found, "-L", sysroot, "-E", f"LD_LIBRARY_PATH={libs}"]
