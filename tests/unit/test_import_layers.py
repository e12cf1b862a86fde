"""The packages' import rules, read from the source (every import counts, including those
under `if TYPE_CHECKING:` and inside functions): no import cycle among the modules of a
package, `kafkaio/` imports only `schemas/` of ours, `streams/` and `workers/` never import
each other, and `streams/naming.py` imports no Faust."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("schemas", "kafkaio", "streams", "workers")


def imports_of(package: str) -> dict[str, set[str]]:
    """Every module of `package` -> the dotted names it imports (`from a import b` gives both
    `a` and `a.b`)."""
    graph: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).glob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level:
                    module = f"{package}.{module}" if module else package
                names.add(module)
                names.update(f"{module}.{alias.name}" for alias in node.names)
        graph[f"{package}.{path.stem}"] = names
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
    found = cycle(imports_of(package))
    assert found is None, " -> ".join(found or [])


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
