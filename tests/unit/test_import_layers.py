"""The dependency rule, checked on every module's imports (ast): emoe <- experts <- router <- cluster <- bench <- cli.

A module may import its own layer and the layers below it, never one above; inside router/ the same holds for
dispatch <- model <- engine. Imports inside functions count too (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ["emoe", "experts", "router", "cluster", "bench", "cli"]
ROUTER_LAYERS = ["router.dispatch", "router.model", "router.engine"]


def rank(module: str, order: list[str]) -> int | None:
    for i, name in enumerate(order):
        if module == name or module.startswith(name + "."):
            return i
    return None


def imported_modules(source: str, module: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `source`, relative ones resolved against `module`."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: -node.level]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            out.append((node.lineno, name))
    return out


def violations(source: str, module: str) -> list[str]:
    """Upward imports of `module`, as 'module:line imports target'."""
    out = []
    for line, target in imported_modules(source, module):
        for order in (LAYERS, ROUTER_LAYERS):
            mine, theirs = rank(module, order), rank(target, order)
            if mine is not None and theirs is not None and theirs > mine:
                out.append(f"{module}:{line} imports {target} (a higher layer)")
    return out


def project_modules() -> list[tuple[str, Path]]:
    mods = []
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            if rel.parts[:2] == ("emoe", "v1"):  # generated gRPC stubs
                continue
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            mods.append((".".join(parts), path))
    return mods


def test_every_package_is_checked():
    names = {m for m, _ in project_modules()}
    assert set(LAYERS) <= names and {"router.engine", "router.model", "router.dispatch"} <= names
    assert len(names) > 60


def test_no_module_imports_a_higher_layer():
    found = [v for module, path in project_modules() for v in violations(path.read_text(), module)]
    assert not found, "imports against the dependency rule:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "module, source, expected",
    [
        (
            "router.dispatch.local",
            "from cluster.launch import ensure_ray\n",
            "router.dispatch.local:1 imports cluster",
        ),
        ("router.engine.offline", "def f():\n    import cluster.launch\n", "imports cluster.launch"),
        ("cluster.app", "from cli.main import main\n", "cluster.app:1 imports cli.main"),
        ("bench.perf", "from cli import main\n", "imports cli"),
        ("emoe.spec", "from router.model import RouterModel\n", "imports router.model"),
        ("router.model.attention", "from router.engine.scheduler import Sequence\n", "imports router.engine"),
        ("router.dispatch.base", "from ..model import kv_cache\n", "imports router.model"),
    ],
)
def test_a_planted_upward_import_is_caught(module, source, expected):
    found = violations(source, module)
    assert len(found) == 1 and expected in found[0], found


@pytest.mark.parametrize(
    "module, source",
    [
        ("cluster.app", "from router.engine import AsyncEngine\nimport emoe.api\nimport ray\n"),
        (
            "router.engine.offline",
            "from router.model import RouterModel\nfrom router.dispatch import get_dispatcher\n",
        ),
        ("cli.main", "from bench.perf import main\nfrom cluster.config import DEFAULT_MODEL_DIR\n"),
        ("experts.store", "from . import ffn\nfrom emoe.checkpoint import Checkpoint\n"),
    ],
)
def test_downward_and_third_party_imports_are_allowed(module, source):
    assert violations(source, module) == []
