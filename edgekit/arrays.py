"""Arrays from and to the user's files: ``.npy`` inputs, ``.npz`` calibration sets and outputs.

Reading never unpickles, and it reads a header before its data: a 192-byte ``.npy`` declaring
1x3x64x64000000 float32 made ``np.load`` ask for 47 GiB and die with a MemoryError. An array
whose declared size is not all in the file (truncated, or a forged header) is refused with
one line naming both sizes; so is a dtype holding Python objects. Writing is atomic.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
from numpy.lib import format as npy

from edgekit.errors import EdgekitError
from edgekit.files import replacing

_MAX_HEADER = 1 << 20


def _check_header(f: IO[bytes], size: int, what: str) -> None:
    """Read the ``.npy`` header at ``f``'s position; refuse what cannot be a complete array of
    ``size`` bytes (header included)."""
    try:
        version = npy.read_magic(f)
        reader = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        shape, _fortran, dtype = reader(f, max_header_size=_MAX_HEADER)
    except (ValueError, EOFError) as exc:
        raise EdgekitError(f"cannot read {what}: not a .npy array "
                           f"({type(exc).__name__}: {exc})") from None
    if dtype.hasobject:
        raise EdgekitError(f"cannot read {what}: its dtype {dtype} holds Python objects")
    need = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    have = size - f.tell()
    if need > have:
        dims = "x".join(str(d) for d in shape) or "a scalar"
        raise EdgekitError(
            f"cannot read {what}: its header declares {dims} {dtype} ({_size(need)}) but the "
            f"file holds {_size(have)} of data (truncated or a forged header)")


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def load_npy(path: str | Path) -> np.ndarray:
    """One array from a ``.npy`` file, header checked first."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            _check_header(f, path.stat().st_size, str(path))
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise EdgekitError(f"input file not found: {path}") from None
    except (ValueError, OSError, EOFError) as exc:
        raise EdgekitError(f"cannot read {path}: not a .npy array "
                           f"({type(exc).__name__})") from None


def load_npz(path: str | Path, what: str = "arrays") -> dict[str, np.ndarray]:
    """Every array of a ``.npz`` archive, each member's header checked first."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                with archive.open(info) as f:
                    _check_header(f, info.file_size, f"{path} member {info.filename}")
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise EdgekitError(f"{what} file not found: {path}") from None
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise EdgekitError(f"cannot read {what} {path}: not an .npz archive of arrays "
                           f"({type(exc).__name__})") from None


def save_npz(path: str | Path, arrays: Mapping[str, Any]) -> None:
    """Write ``arrays`` to an ``.npz`` atomically (temp file, then rename)."""
    with replacing(path, ".npz") as tmp:  # np.savez adds .npz to a name without it
        np.savez(tmp, **arrays)
