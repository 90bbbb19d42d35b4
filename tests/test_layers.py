"""The layers of doc/architecture.md: imports run one way, aiagentserver → orchestration → agents →
balancer → llm_engines, never back up, not even inside a function."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["aiagentserver", "orchestration", "agents", "balancer", "llm_engines"]


def _imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("layer", LAYERS[1:])
def test_no_module_imports_a_layer_above_its_own(layer):
    above = set(LAYERS[: LAYERS.index(layer)])
    found = {
        str(path.relative_to(ROOT)): sorted(_imported(path) & above)
        for path in sorted((ROOT / layer).rglob("*.py"))
        if _imported(path) & above
    }
    assert found == {}
