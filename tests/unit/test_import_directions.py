"""The package map's import directions (docs/architecture.md), checked on every import statement
of the package, function-level imports included."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "posttrain"

# Top-level package -> the packages (or single modules) of ours it may import besides itself.
ALLOWED: dict[str, set[str]] = {
    "ops": set(),
    "config": {"ops", "models.hub"},  # tile-size defaults; bundled model names (never weights)
    "models": set(),
    "data": {"config", "models.hub"},  # `data inspect` resolves a bundled model's directory
    "parallel": {"config", "models"},
    "tracking": {"config"},
    "cluster": {"config"},  # launches functions; never model, data or recipe code
    "train": {"config", "data", "models", "ops", "parallel", "tracking", "cluster.dist_env",
              "cluster.tensor_channel"},
    "rollout": {"models", "parallel", "config", "cluster.child_process"},
    "evaluation": {"config", "data", "models", "ops", "rollout", "rl", "train"},
    "rl": {"config", "data", "models", "ops", "parallel", "rollout", "train", "evaluation", "cluster"},
    "recipes": {"config", "data", "models", "ops", "parallel", "tracking", "cluster", "train", "rollout",
                "evaluation", "rl"},
    "pipeline": {"config", "cluster", "evaluation", "recipes"},
}
ENTRY_POINTS = {"cli", "__main__", "__init__", "demo", "demo_task"}  # may import anything


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]  # a module or a name
    return [(line, name) for line, name in out if name.startswith("posttrain.")]


def _allowed(package: str, target: str) -> bool:
    parts = target.split(".")[1:]
    if parts[0] == package:
        return True
    rules = ALLOWED[package]
    return parts[0] in rules or ".".join(parts[:2]) in rules


def test_every_package_imports_only_what_the_map_allows():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if len(parts) == 1:
            assert parts[0] in ENTRY_POINTS, f"top-level module {parts[0]} is not in the package map"
            continue
        package = parts[0]
        assert package in ALLOWED, f"package {package} is not in the package map (docs/architecture.md)"
        for line, target in _imports(path):
            if not _allowed(package, target):
                violations.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    assert not violations, "imports against the package map:\n" + "\n".join(violations)
