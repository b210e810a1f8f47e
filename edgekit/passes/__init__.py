"""The passes edgekit knows, as one explicit tuple (no registration by import side effect)."""

from __future__ import annotations

from edgekit.passes.core import Pass

ALL: tuple[Pass, ...] = (
)


def available() -> dict[str, Pass]:
    return {p.name: p for p in ALL}
