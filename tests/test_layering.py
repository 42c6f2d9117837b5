"""Dependencies point one way (DESIGN.md): bench -> models -> worker -> schemas, and tests beside them.

Inside ``worker/`` the Kafka half (``worker/kafka/``) and the model half (``worker/serving/``) never
import each other; no module imports itself round a circle; a name has one import path, the module
that defines it (package ``__init__`` files, which gather their package's names, aside).

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
#: Where no module may import another round a circle.
ACYCLIC = ("schemas", "worker", "bench")
#: The worker's two halves, which meet only in the shell above them.
HALVES = ("worker.kafka", "worker.serving")
#: The edges both halves may use (typed settings and their slices, metrics, the error classes, the arrival
#: rate both the batcher and the fetch loop size their waits by); the shell and faces sit above.
EDGE_MODULES = {
    "worker.settings",
    "worker.settings_kafka",
    "worker.settings_fetching",
    "worker.settings_batching",
    "worker.settings_media",
    "worker.settings_operations",
    "worker.metrics",
    "worker.errors",
    "worker.arrivals",
}


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


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


#: Every project module (dotted name -> file).
MODULES = {
    _module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))
}


def _imported_modules(path: Path) -> set[str]:
    """The project modules ``path`` imports: ``from package import module`` names the module itself."""
    found = {name for name in _imports(path) if name in MODULES}
    # `from p import m` yields p and p.m: p's __init__ is a dependency only for a name it defines there.
    only_modules: set[str] = set()
    needed: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            needed.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module in found and node.level == 0:
            modules = all(f"{node.module}.{alias.name}" in MODULES for alias in node.names)
            (only_modules if modules else needed).add(node.module)
    return found - (only_modules - needed)


def _bound_by_import(path: Path) -> set[str]:
    """Names a module binds at its top level by importing them from another project module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {
        alias.asname or alias.name
        for node in tree.body
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES
        for alias in node.names
        if f"{node.module}.{alias.name}" not in MODULES
    }


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


def test_the_kafka_and_the_serving_halves_never_import_each_other() -> None:
    crossing = sorted(
        (module, imported)
        for module, path in MODULES.items()
        for half, other in (HALVES, HALVES[::-1])
        if module == half or module.startswith(half + ".")
        for imported in _imported_modules(path)
        if imported == other or imported.startswith(other + ".")
    )
    assert crossing == [], f"worker/kafka and worker/serving meet only in the shell: {crossing}"


def test_no_module_imports_itself_round_a_circle() -> None:
    graph = {
        module: {m for m in _imported_modules(path) if m != module}
        for module, path in MODULES.items()
        if module.split(".")[0] in ACYCLIC
    }
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import circle: {' -> '.join((*path[path.index(module) :], module))}"
        if module in done:
            return
        for imported in sorted(graph.get(module, ())):
            visit(imported, (*path, module))
        done.add(module)

    for module in sorted(graph):
        visit(module, ())


def test_a_name_is_imported_from_the_module_that_defines_it() -> None:
    passed_on = {
        module: _bound_by_import(path)
        for module, path in MODULES.items()
        if module.split(".")[0] in ACYCLIC and path.name != "__init__.py"
    }
    second_paths = sorted(
        (importer, f"{node.module}.{alias.name}")
        for importer, path in MODULES.items()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.ImportFrom) and node.module in passed_on
        for alias in node.names
        if alias.name in passed_on[node.module]
    )
    assert second_paths == [], f"import these from the module that defines them: {second_paths}"


def test_the_checks_see_circles_across_lazy_imports_and_names_passed_on(tmp_path: Path) -> None:
    module = tmp_path / "sample.py"
    module.write_text(
        "from worker.serving.inputs import Prepared\ndef f():\n    from worker.kafka import commits\n"
    )
    assert _imported_modules(module) == {"worker.serving.inputs", "worker.kafka.commits"}
    assert _bound_by_import(module) == {"Prepared"}


@pytest.mark.parametrize("half", HALVES)
def test_a_half_imports_only_itself_the_edges_and_schemas(half: str) -> None:
    above = sorted(
        (module, imported)
        for module, path in MODULES.items()
        if module == half or module.startswith(half + ".")
        for imported in _imported_modules(path)
        if imported.startswith("worker")
        and imported not in EDGE_MODULES
        and not any(imported == h or imported.startswith(h + ".") for h in HALVES)
    )
    assert above == [], f"{half} may not reach up into the shell or the faces: {above}"


def test_the_serving_half_is_configured_by_slices_not_the_whole_settings() -> None:
    readers = sorted(
        module
        for module, path in MODULES.items()
        if module.startswith("worker.serving.") and "worker.settings" in _imported_modules(path)
    )
    assert readers == [], (
        f"worker/serving takes MediaLimits, EngineOptions and the like, not Settings: {readers}"
    )
