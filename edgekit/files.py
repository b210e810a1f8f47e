"""Writing a user's file atomically: readers see the old file or the new one, never half."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from edgekit.errors import EdgekitError


@contextlib.contextmanager
def replacing(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (``.NAME.tmp`` + ``suffix``, for writers that
    insist on an extension); when the block ends it is renamed over ``path``, and removed if
    the block fails. An ``OSError`` becomes one ``EdgekitError`` line naming ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{suffix}")
    try:
        yield tmp
        tmp.replace(path)
    except OSError as exc:
        raise EdgekitError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
