"""Write artifacts atomically: stage in a sibling temp directory, then rename into place.

Layout of ``NAME.edgekit/``: ``manifest.json``, ``model.so`` (the compiled library, for the
target's machine), ``model.onnx`` (exactly what was compiled, for baselines and rebuilds).
The manifest lists the sha256 of every other file; ``edgekit.runtime.load`` checks them.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edgekit.errors import EdgekitError
from edgekit.runtime import LIBRARY, MANIFEST, SCHEMA_VERSION, sha256_file

ONNX_FILE = "model.onnx"


def versions() -> dict[str, str]:
    """Versions of the tools that made an artifact."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("edgekit", "apache-tvm", "onnx", "onnxruntime", "torch", "numpy"):
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    return out


@contextlib.contextmanager
def staging(out: Path) -> Iterator[Path]:
    """Yield an empty directory beside ``out``; it is removed unless ``publish`` moved it."""
    out = Path(out)
    if out.exists() and not (out / MANIFEST).is_file():
        raise EdgekitError(f"{out} exists and is not an edgekit artifact; not overwriting it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as exc:
        raise EdgekitError(f"cannot write to {out.parent}: {exc.strerror or exc}") from exc
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp: Path, out: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Add digests and the manifest to the staged directory and move it to ``out``."""
    files = sorted(p.name for p in tmp.iterdir() if p.is_file())
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": versions(),
        **manifest,
        "files": {name: sha256_file(tmp / name) for name in files},
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    out = Path(out)
    old = None
    if out.exists():  # an earlier artifact: swap, then delete it
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return manifest


__all__ = ["LIBRARY", "MANIFEST", "ONNX_FILE", "publish", "staging", "versions"]
