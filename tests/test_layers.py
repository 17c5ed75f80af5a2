"""The layers of DESIGN.md: imports only point downwards."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "storage": {"torch", "torchvision", "prefect", "prefect_dask", "gptpipe", "flows"},
    "gptpipe": {"prefect", "prefect_dask", "flows"},
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_point_downwards(layer):
    files = sorted((REPO / layer).rglob("*.py"))
    assert files
    bad = {str(f.relative_to(REPO)): sorted(imported_modules(f) & FORBIDDEN[layer]) for f in files}
    assert {f: m for f, m in bad.items() if m} == {}
