"""The package's layout rules, read from the source (ast), so a violation fails CI:

- one import root, `mara_serve`;
- the engine imports nothing from the server, the CLI, training or the benchmarks;
- training does not import the server or the CLI; the server does not import the CLI;
- no import cycles between modules (lazy imports inside functions included).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "mara_serve"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The mara_serve modules `path` imports (any depth, resolved to existing modules)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        out |= {n for n in names if n.split(".")[0] == "mara_serve" and n in MODULES}
    return out


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: imports(path) - {name} for name, path in MODULES.items()}


def test_one_import_root() -> None:
    roots = {
        p.parent.name
        for p in REPO.glob("*/__init__.py")
        if p.parent.name not in ("tests", "bench", "scripts", "docs", "deploy")
    }
    assert roots == {"mara_serve"}


def layer(name: str) -> str:
    return name.split(".")[1] if name.count(".") >= 1 else ""


def test_layering() -> None:
    forbidden = {
        "engine": {"server", "cli", "training"},
        "training": {"server", "cli"},
        "server": {"cli", "training"},
    }
    bad = [
        (a, b)
        for a, deps in GRAPH.items()
        for b in deps
        if layer(b) in forbidden.get(layer(a), set())
    ]
    assert not bad, f"imports across layers: {bad}"


def test_no_import_cycles() -> None:
    # Packages import their children by name only for re-exports; a cycle through a package's
    # __init__ is still a cycle, so every module counts.
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(GRAPH[node]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(GRAPH):
        if node not in state:
            visit(node)
    assert not cycles, f"import cycles: {cycles}"
