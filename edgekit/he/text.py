"""Real English sentences that ship with installed packages, for offline accuracy checks.

The sources are scikit-learn's dataset descriptions and the Python standard library's module
and function docstrings: deterministic, present on every machine with the environment, and
ordinary prose (no model hub or download needed).
"""

from __future__ import annotations

import importlib
import re
import warnings
from pathlib import Path

_MODULES = ("argparse", "asyncio", "collections", "csv", "dataclasses", "decimal", "email",
            "fractions", "functools", "heapq", "http.client", "inspect", "json", "logging",
            "multiprocessing", "pathlib", "pickle", "random", "shutil", "socket", "sqlite3",
            "statistics", "string", "subprocess", "tarfile", "tempfile", "threading",
            "unittest", "uuid", "zipfile", "textwrap", "difflib", "calendar", "datetime")
_SENTENCE = re.compile(r"[A-Z][A-Za-z0-9 ,;:'()\-]+[.!?]")


def _texts() -> list[str]:
    import sklearn

    descr = Path(sklearn.__file__).parent / "datasets" / "descr"
    texts = [f.read_text() for f in sorted(descr.glob("*.rst"))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in _MODULES:
            module = importlib.import_module(name)
            texts.append(module.__doc__ or "")
            for attr in sorted(dir(module)):
                doc = getattr(getattr(module, attr, None), "__doc__", None)
                if not attr.startswith("_") and isinstance(doc, str):
                    texts.append(doc)
    return texts


def sentences(limit: int | None = None) -> list[str]:
    """Distinct prose sentences of 30–200 characters, in a fixed order."""
    out: list[str] = []
    seen: set[str] = set()
    for text in _texts():
        for s in re.split(r"(?<=[.!?]) ", re.sub(r"\s+", " ", text)):
            s = s.strip()
            if 30 <= len(s) <= 200 and _SENTENCE.fullmatch(s) and s not in seen:
                seen.add(s)
                out.append(s)
    return out[:limit]
