"""The README's Quick start is exactly two commands, and CI runs the second one verbatim."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quick_start() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "Quick start has no ```sh block"
    return [ln for ln in block.group(1).splitlines() if ln.strip()]


def test_quick_start_is_two_commands_and_ci_runs_the_second():
    lines = quick_start()
    assert len(lines) == 2 and lines[0].endswith("edgekit demo")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert lines[1] in ci
