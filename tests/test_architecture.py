"""The layout rules of docs/architecture.md, checked on the source tree.

Imports are read with an AST walk of every import statement, those inside functions included:
an import moved into a function to dodge a cycle is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Installed package name -> source folder (pyproject's package-dir mapping).
PACKAGES = {"edgekit": ROOT / "edgekit", "edgekit.graphs": ROOT / "graphs"}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _owner(name: str) -> str | None:
    """The edgekit module that an imported dotted name lives in (None: not edgekit's)."""
    if name.startswith("graphs."):  # the source tree's spelling of edgekit.graphs
        name = "edgekit." + name
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imported_names(module: str) -> set[str]:
    """Every dotted name ``module`` imports; ``from pkg import sub`` names the submodule."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                names.add(sub if sub in MODULES else base)
    return names


def _edges(module: str) -> set[str]:
    return {owner for name in _imported_names(module)
            if (owner := _owner(name)) and owner != module}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = {module: _edges(module) for module in MODULES}
    assert _cycles(graph) == []


def test_the_backend_lives_in_the_compiler_package():
    loose = {"compile", "tune", "tune_check", "tune_budget", "schedules", "_tiling", "_fast_math",
             "_grouped_conv", "tuning_db", "pipeline", "frontend", "build", "tiling"}
    assert not [name for name in loose if f"edgekit.{name}" in MODULES]
    assert "edgekit.compiler" in MODULES
    # TVM's compiler (Relax frontends, TIR scheduling, MetaSchedule) is imported by the compiler
    # package only; elsewhere TVM means its runtime.
    compiler_only = ("tvm.relax.frontend", "tvm.s_tir", "tvm.tirx", "tvm.topi", "tvm.driver")
    outside = {module: sorted(n for n in _imported_names(module) if n.startswith(compiler_only))
               for module in MODULES if not module.startswith("edgekit.compiler")}
    assert {m: names for m, names in outside.items() if names} == {}


def test_the_cli_imports_only_the_api():
    # "edgekit" itself is allowed: its __init__ holds the version and nothing else.
    allowed = ("edgekit.api", "edgekit.errors", "edgekit.cli")
    offenders = {}
    for module in MODULES:
        if module == "edgekit.cli" or module.startswith("edgekit.cli."):
            bad = sorted(owner for owner in _edges(module)
                         if owner != "edgekit" and not owner.startswith(allowed))
            if bad:
                offenders[module] = bad
    assert offenders == {}


# Pass modules: edgekit/passes/*.py but the registry, core.py and the _helper modules.
PASSES = sorted(m for m in MODULES if m.startswith("edgekit.passes.")
                and not m.rpartition(".")[2].startswith("_") and m != "edgekit.passes.core")


@pytest.mark.parametrize("module", PASSES)
def test_a_pass_imports_no_other_pass(module):
    assert not _edges(module) & {*PASSES, "edgekit.passes"}
