"""The data package's rooms: one job each, no import circle (imports inside functions count), small functions and
modules, and no name that means something else elsewhere in robustopt."""

from __future__ import annotations

import ast
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "src" / "robustopt" / "data"
SRC = DATA.parents[1]


def _trees() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text()) for p in sorted(DATA.glob("*.py")) if p.stem != "__init__"}


def _data_imports(tree: ast.Module) -> set[str]:
    """The robustopt.data modules imported anywhere in a module, functions included."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("robustopt.data."):
            found.add(node.module.split(".")[2])  # type: ignore[union-attr]
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[2] for a in node.names if a.name.startswith("robustopt.data.")}
    return found


def test_no_import_circle_inside_data() -> None:
    graph = {name: _data_imports(tree) for name, tree in _trees().items()}
    order: list[str] = []
    while len(order) < len(graph):  # peel modules whose imports are all placed: fails to progress on a circle
        ready = [m for m in graph if m not in order and graph[m] <= set(order)]
        assert ready, f"import circle among {sorted(set(graph) - set(order))}: {graph}"
        order += sorted(ready)


def test_data_depends_only_on_errors_and_files_outside_itself() -> None:
    for name, tree in _trees().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("robustopt."):
                assert node.module.startswith(("robustopt.data.", "robustopt.errors", "robustopt.files")), (name, node.module)


def test_functions_and_modules_are_small() -> None:
    for path in DATA.glob("*.py"):
        assert len(path.read_text().splitlines()) <= 400, path.name
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno + 1 <= 60, f"{path.name}:{node.name}"  # type: ignore[operator]


def test_public_data_names_do_not_collide_with_other_meanings_elsewhere() -> None:
    """``check_batch``/``check_inputs`` mean attack budgets and tensor checks elsewhere: data must not reuse them."""
    ours = {n.name for tree in _trees().values() for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert not ours & {"check_batch", "check_inputs"}
    elsewhere = set()
    for path in SRC.rglob("*.py"):
        if DATA not in path.parents:
            elsewhere |= {n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)}
    shared = {n for n in ours & elsewhere if not n.startswith("_")}
    assert not shared, f"data functions whose names are defined elsewhere too: {sorted(shared)}"
