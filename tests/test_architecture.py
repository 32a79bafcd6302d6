"""The layout's rules, checked: import-linter's contracts (pyproject.toml), no import cycle between any two
modules of ``app/`` (lazy imports inside functions included), every carrier folder in the registry, and no module
over ~350 lines without a reason at its top."""
from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path

import grimp
import pytest

import app
import app.carriers
from app.carriers.registry import CARRIERS

REPO = Path(__file__).resolve().parent.parent
APP = REPO / "app"
#: "About 350": a module a few lines over is not worth splitting for the sake of a number.
MAX_MODULE_LINES = 360
#: A longer module says why in the first line of its docstring, e.g. ``"""… (long: <why it is one module>)"""``.
LONG_MODULE_MARK = "(long: "
#: Modules another open issue is splitting right now; each entry names it. Remove an entry once it lands.
SPLITS_IN_PROGRESS: dict[str, str] = {}


def import_cycles(imports: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Every group of modules that import each other in a circle (strongly connected components of more than
    one module, or a module importing itself), found with Tarjan's algorithm, iteratively."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    cycles: list[list[str]] = []
    for root in sorted(imports):
        if root in index:
            continue
        work = [(root, iter(sorted(imports.get(root, ()))))]
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
                    work.append((child, iter(sorted(imports.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1 or node in imports.get(node, ()):
                    cycles.append(sorted(group))
    return cycles


def test_the_cycle_finder_finds_cycles() -> None:
    assert import_cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]
    assert import_cycles({"a": ["a"]}) == [["a"]]
    assert import_cycles({"a": ["b"], "b": ["c"], "c": []}) == []


def test_no_module_of_app_imports_itself_round_a_circle() -> None:
    graph = grimp.build_graph("app", include_external_packages=False)
    imports = {module: graph.find_modules_directly_imported_by(module) for module in graph.modules}
    assert len(imports) > 50  # the whole package was read
    assert "app.extensions" in imports["app.calls.agent"]  # function-level and type-only imports count too
    assert import_cycles(imports) == []


def test_import_linter_contracts_hold() -> None:
    """relay/calls/kallglot/profiles import no carrier; carriers not each other; production never devtools."""
    lint_imports = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint_imports), "--no-cache"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_the_devtools_contract_covers_every_production_room() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    contract = next(c for c in config["tool"]["importlinter"]["contracts"]
                    if c.get("forbidden_modules") == ["app.devtools"])
    rooms = {f"app.{m.name}" for m in pkgutil.iter_modules(app.__path__)} - {"app.devtools"}
    assert set(contract["source_modules"]) == rooms


def test_every_carrier_folder_is_in_the_registry_once() -> None:
    folders = {m.name for m in pkgutil.iter_modules(app.carriers.__path__) if m.ispkg}
    names = [carrier.name for carrier in CARRIERS]
    assert sorted(names) == sorted(folders) and len(set(names)) == len(names)
    for carrier in CARRIERS:
        assert carrier.blueprint.name == carrier.name and carrier.codec().carrier == carrier.name


def first_docstring_line(path: Path) -> str:
    docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
    return docstring.splitlines()[0] if docstring else ""


@pytest.mark.parametrize("path", sorted(APP.rglob("*.py")), ids=lambda p: str(p.relative_to(REPO)))
def test_modules_stay_small_or_say_why(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    name = str(path.relative_to(REPO))
    if lines <= MAX_MODULE_LINES or name in SPLITS_IN_PROGRESS:
        return
    first = first_docstring_line(path)
    assert LONG_MODULE_MARK in first and len(first.split(LONG_MODULE_MARK, 1)[1]) > 10, (
        f"{name} has {lines} lines (over {MAX_MODULE_LINES}): split it, or say why in its docstring's first line "
        f"with {LONG_MODULE_MARK!r}")
