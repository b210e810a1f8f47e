"""Swapping an artifact's library between its hash check and its load (the TOCTOU race),
deterministically: a hook on ``runtime._check``, the one check every loader goes through."""

from __future__ import annotations

import os
from pathlib import Path

from edgekit import runtime


def swap_after_check(monkeypatch, art: Path, swap_in: bytes) -> dict[str, int]:
    """Make ``art/model.so`` become ``swap_in`` (atomically, as a racing writer would) right
    after each hash check of ``art``; returns {"swaps": how many happened}."""
    state = {"swaps": 0}
    check = runtime._check

    def check_then_swap(root, sha256, check_hashes):
        result = check(root, sha256, check_hashes)
        if Path(root).resolve() == art.resolve():
            tmp = art / ".swap"
            tmp.write_bytes(swap_in)
            os.replace(tmp, art / runtime.LIBRARY)  # what a racing writer does
            state["swaps"] += 1
        return result

    monkeypatch.setattr(runtime, "_check", check_then_swap)
    return state
