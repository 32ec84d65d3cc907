"""Import structure the refactor promises: stages import each other without cycles (function-level imports
included); train imports only core (+ errors, device); core imports only core (+ errors, device)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "stratalign"


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stratalign"):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("stratalign"))
    return out


def _modules(package: str) -> dict[str, Path]:
    return {f"stratalign.{package}.{p.stem}": p for p in (ROOT / package).glob("*.py") if p.stem != "__init__"}


def test_stages_import_graph_is_acyclic() -> None:
    mods = _modules("stages")
    graph = {m: {i for i in _imports(p) if i in mods and i != m} for m, p in mods.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        if state.get(m) == 2:
            return
        assert state.get(m) != 1, "import cycle: " + " -> ".join(path + [m])
        state[m] = 1
        for n in sorted(graph[m]):
            visit(n, path + [m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])
    assert "stratalign.stages.train" not in graph["stratalign.stages.evaluate"]


@pytest.mark.parametrize("package,allowed", [("train", ("core", "train")), ("core", ("core",))])
def test_layer_imports(package: str, allowed: tuple[str, ...]) -> None:
    ok = ("stratalign.errors", "stratalign.device") + tuple(f"stratalign.{a}" for a in allowed)
    for path in list((ROOT / package).glob("*.py")):
        bad = sorted(i for i in _imports(path) if i != "stratalign" and not i.startswith(ok))
        assert not bad, f"{path.name} imports {bad}"
