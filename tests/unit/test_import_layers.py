"""The packages' import rules, read from the source (every import counts, including those
under `if TYPE_CHECKING:` and inside functions): no import cycle among the modules of a
package (sub-packages included), `kafkaio/` imports only `schemas/` of ours, `streams/` and `workers/` never import
each other, and `streams/naming.py` imports no Faust."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("schemas", "kafkaio", "streams", "workers", "relata")


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(package: str) -> dict[str, set[str]]:
    """Every module of `package` (sub-packages included) -> the dotted names it imports
    (`from a import b` gives both `a` and `a.b`)."""
    graph: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        module_name = _module(path)
        # The package a relative import starts from: the module's own for an __init__.
        here = module_name.split(".") if path.name == "__init__.py" else module_name.split(".")[:-1]
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level:
                    base = ".".join(here[: len(here) - node.level + 1])
                    module = f"{base}.{module}" if module else base
                names.add(module)
                names.update(f"{module}.{alias.name}" for alias in node.names)
        graph[module_name] = names
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle among the modules of `graph`, or None."""
    edges = {
        module: {n for n in names if n in graph and n != module} for module, names in graph.items()
    }
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for nxt in sorted(edges[module]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[module] = 2
        return None

    for module in sorted(edges):
        if module not in state and (found := visit(module, [module])):
            return found
    return None


@pytest.mark.parametrize("package", PACKAGES)
def test_no_two_modules_of_a_package_import_each_other(package: str) -> None:
    graph = imports_of(package)
    assert len(graph) > 1
    found = cycle(graph)
    assert found is None, " -> ".join(found or [])


def test_the_cycle_finder_finds_a_cycle_through_a_sub_package() -> None:
    graph = {"p.a": {"p.sub.b"}, "p.sub.b": {"p.sub.c"}, "p.sub.c": {"p.a"}, "p.d": set()}
    assert cycle(graph) == ["p.a", "p.sub.b", "p.sub.c", "p.a"]


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("schemas", {"kafkaio", "streams", "workers", "relata"}),
        ("kafkaio", {"streams", "workers", "relata", "faust", "mode", "aiokafka"}),
        ("streams", {"workers", "relata"}),
        ("workers", {"streams", "relata"}),
    ],
)
def test_packages_import_only_what_their_layer_allows(package: str, forbidden: set[str]) -> None:
    bad = {
        module: sorted(tops & forbidden)
        for module, names in imports_of(package).items()
        if (tops := {name.split(".")[0] for name in names}) & forbidden
    }
    assert bad == {}


def test_the_stream_processors_names_need_no_faust() -> None:
    tops = {name.split(".")[0] for name in imports_of("streams")["streams.naming"]}
    assert tops <= {"__future__", "schemas"}
