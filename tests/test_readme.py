"""README.md stays a front page: its Quick start is exactly two commands (CI runs the second
verbatim), it is at most 300 lines, and no relative link in it or in docs/*.md is broken."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]

# [text](target) and ![alt](target); the target ends at whitespace or ")" (no titles used).
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def quick_start() -> list[str]:
    section = README.read_text().split("## Quick start", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "Quick start has no ```sh block"
    return [ln for ln in block.group(1).splitlines() if ln.strip()]


def relative_links(page: Path) -> list[str]:
    """Link targets that are files in this repository (not URLs, not in-page anchors), without
    their #fragment. Code blocks are skipped: `a[i](x)` in code is not a link."""
    text = FENCE.sub("", page.read_text())
    targets = (m.group(1).split("#", 1)[0] for m in LINK.finditer(text))
    return [t for t in targets if t and not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def test_quick_start_is_two_commands_and_ci_runs_the_second():
    lines = quick_start()
    assert len(lines) == 2 and lines[0].endswith("edgekit demo")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert lines[1] in ci


def test_readme_is_a_front_page():
    n = len(README.read_text().splitlines())
    assert n <= 300, f"README.md has {n} lines; move sections to docs/"


def test_relative_link_pattern_finds_links_and_skips_urls_and_code(tmp_path: Path):
    page = tmp_path / "page.md"
    page.write_text("[a](docs/a.md#x) ![b](img/b.svg) [c](https://x.org) [d](#top)\n"
                    "```sh\nx[0](y)\n```\n")
    assert relative_links(page) == ["docs/a.md", "img/b.svg"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_point_to_existing_files(page: Path):
    broken = [t for t in relative_links(page) if not (page.parent / t).exists()]
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"
