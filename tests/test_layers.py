"""The layers of DESIGN.md and docs/architecture.md, read from the code with ``ast``: imports only point
downwards, the torch packages never touch the store, no import cycle, no function a reader cannot hold."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("storage", "gptpipe", "flows")
# what a folder's modules never import (by top-level name, or by module path for gptpipe's own packages)
FORBIDDEN = {
    "storage": {"torch", "torchvision", "prefect", "prefect_dask", "gptpipe", "flows"},
    "gptpipe": {"prefect", "prefect_dask", "flows"},
    # the maths: problems, sweep trainers, G.pt, evaluation; only gptpipe/stages joins them to the store
    "gptpipe/problems": {"storage", "gptpipe.stages"},
    "gptpipe/sweep": {"storage", "gptpipe.stages"},
    "gptpipe/gpt": {"storage", "gptpipe.stages"},
    "gptpipe/evaluation": {"storage", "gptpipe.stages"},
}
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, as written (``from a.b import c`` gives ``a.b`` and ``a.b.c``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def sources() -> list[Path]:
    return sorted(p for layer in LAYERS for p in (REPO / layer).rglob("*.py"))


def forbidden_in(path: Path, rules: set[str]) -> list[str]:
    return sorted(m for m in imports(path) for rule in rules if m == rule or m.startswith(rule + "."))


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_layer_imports_point_downwards(folder):
    files = sorted((REPO / folder).rglob("*.py"))
    assert files
    bad = {str(f.relative_to(REPO)): forbidden_in(f, FORBIDDEN[folder]) for f in files}
    assert {f: m for f, m in bad.items() if m} == {}


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in sources()}
    return {name: {m for m in imports(path) if m in modules and m != name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (module -> the modules it imports), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_function_longer_than_a_reader_holds():
    long = []
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                long.append(f"{path.relative_to(REPO)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long == []
