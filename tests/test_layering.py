"""Dependencies point one way (DESIGN.md): bench -> models -> worker -> schemas, and tests beside them.

Read from the source with ``ast``, not by importing: every ``import``/``from`` anywhere in a file
(inside functions too: a lazy import is still a dependency) and every module named by a string
to ``importlib.import_module``, ``importlib.util.find_spec`` or ``__import__``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("schemas", "worker", "models", "bench", "tests")
#: What each package may import of the others (everything else is forbidden).
ALLOWED = {
    "schemas": set(),
    "worker": {"schemas"},
    "models": {"schemas", "worker"},
    "bench": {"schemas", "worker", "models"},
    "tests": {"schemas", "worker", "models", "bench"},
}
_BY_STRING = {"import_module", "find_spec", "__import__"}


def _imports(path: Path) -> Iterator[str]:
    """Every module name ``path`` imports, statically or by a constant string."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in _BY_STRING and isinstance(node.args[0].value, str):
                yield node.args[0].value


def _edges() -> dict[str, set[tuple[str, str]]]:
    """Per package: (file, imported project module) pairs that cross into another package."""
    found: dict[str, set[tuple[str, str]]] = {package: set() for package in PACKAGES}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for module in _imports(path):
                top = module.split(".", 1)[0]
                if top in PACKAGES and top != package:
                    found[package].add((str(path.relative_to(ROOT)), module))
    return found


EDGES = _edges()


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_imports_only_what_lies_below_it(package: str) -> None:
    forbidden = sorted(
        (where, module) for where, module in EDGES[package] if module.split(".")[0] not in ALLOWED[package]
    )
    assert not forbidden, f"{package}/ may import only {sorted(ALLOWED[package])}; found {forbidden}"


def test_the_packages_import_no_circle() -> None:
    graph = {package: {module.split(".")[0] for _, module in EDGES[package]} for package in PACKAGES}
    done: set[str] = set()

    def visit(package: str, path: tuple[str, ...]) -> None:
        assert package not in path, f"import circle: {' -> '.join((*path, package))}"
        if package in done:
            return
        for imported in sorted(graph[package]):
            visit(imported, (*path, package))
        done.add(package)

    for package in PACKAGES:
        visit(package, ())


def test_only_the_entry_point_imports_the_cli_module() -> None:
    users = {
        str(path.relative_to(ROOT))
        for package in ("worker", "models", "bench")
        for path in sorted((ROOT / package).rglob("*.py"))
        if any(module.split(".")[:2] == ["worker", "cli"] for module in _imports(path))
    }
    users -= {"worker/__main__.py", "worker/cli.py"}
    assert users == set(), f"only `python -m worker` should import worker.cli: {sorted(users)}"


def test_the_check_sees_lazy_and_string_imports(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import importlib\n"
        "def f():\n"
        "    from models.minilm import package_folder\n"
        "    return importlib.import_module('bench.run')\n"
    )
    assert {"models.minilm", "bench.run"} <= set(_imports(sample))
