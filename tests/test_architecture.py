"""The floor plan of entitylens (docs/design.md), enforced: imports only run downward, rooms stay small.

Every import of an ``entitylens`` module is read from the source with ``ast`` -- at module level and inside
functions alike -- so a cycle cannot hide in a function body. A module may import its own floor or a lower
one; the floor-5 analyses (behavior, probing, patching) share only what sits below them, and the testbed's
training (also above models) may use the behavioural evaluation but nothing below imports it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "entitylens"

FLOORS: dict[str, float] = {
    "entitylens": 1,
    "entitylens.errors": 1,
    "entitylens._io": 1,
    "entitylens.progress": 1,
    "entitylens.stats": 1,
    "entitylens.plots": 1,
    "entitylens.frames": 1,
    "entitylens.task": 2,
    "entitylens.models": 3,
    "entitylens.activations": 4,
    "entitylens.behavior": 5,
    "entitylens.probing": 5,
    "entitylens.patching": 5,
    "entitylens.testbed": 5.5,
    "entitylens.pipelines": 6,
    "entitylens.cli": 7,
    "entitylens.__main__": 7,
}
"""Module prefix -> floor (the longest matching prefix wins)."""

MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
LONG_REASON = "Long because"
"""A function over the limit says why in its docstring, starting a sentence with these words."""


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def floor(name: str) -> tuple[float, str]:
    best = max((p for p in FLOORS if name == p or name.startswith(p + ".")), key=len)
    return FLOORS[best], best


def internal_imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("entitylens")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.startswith("entitylens"):
                out.append((node.lineno, target))
    return out


SOURCES = sorted(SRC.rglob("*.py"))


def test_every_module_has_a_floor() -> None:
    for path in SOURCES:
        floor(module_name(path))  # raises ValueError when no prefix matches


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_only_run_downward(path: Path) -> None:
    me = module_name(path)
    my_floor, my_room = floor(me)
    bad = []
    for line, target in internal_imports(path):
        their_floor, their_room = floor(target)
        if their_floor > my_floor or (their_floor == my_floor == 5 and their_room != my_room):
            bad.append(f"line {line}: {target} (floor {their_floor}, {their_room})")
    assert not bad, f"{me} (floor {my_floor}) imports upward or sideways: " + "; ".join(bad)


def test_no_module_is_an_oversized_room() -> None:
    big = {str(p.relative_to(SRC)): n for p in SOURCES if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not big, f"modules over {MAX_MODULE_LINES} lines: {big}"


def test_long_functions_say_why() -> None:
    long = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_FUNCTION_LINES and LONG_REASON not in (ast.get_docstring(node) or ""):
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines without a reason: {long}"


def test_every_source_folder_is_a_regular_package() -> None:
    # setuptools' find_packages (pyproject) skips a folder without __init__.py: its modules would work in an
    # editable install and be missing from the wheel.
    missing = sorted(str(d.relative_to(SRC)) for d in SRC.rglob("*") if d.is_dir() and d.name != "__pycache__"
                     and any(d.glob("*.py")) and not (d / "__init__.py").is_file())  # fmt: skip
    assert not missing, f"folders with modules but no __init__.py: {missing}"
