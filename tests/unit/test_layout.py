"""The shape of the code a newcomer relies on: short files with one job each, no import
cycles, the stages apart, and a README short enough to read."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("schemas", "kafkaio", "streams", "workers", "relata")
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> Iterator[str]:
    """The project modules `path` imports, at any depth of its code (a function-level import
    is still a dependency)."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if full in modules:
                    yield full
                elif node.module in modules:
                    yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name in modules)


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: set(_imports(path, modules)) - {name} for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph`, or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_module_is_longer_than_the_limit() -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for p in _modules().values()
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, f"split these by concern (at most {MAX_LINES} lines): {long}"


def test_no_import_cycles() -> None:
    assert _cycle(_graph()) is None


def test_the_cycle_finder_finds_one() -> None:
    # The check above is only as good as this search.
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_stages_meet_only_through_shared_layers() -> None:
    graph = _graph()

    def crossing(source: str, *targets: str) -> list[tuple[str, str]]:
        return [
            (m, dep)
            for m, deps in graph.items()
            if m.split(".")[0] == source
            for dep in deps
            if dep.split(".")[0] in targets
        ]

    assert not crossing("streams", "workers", "relata")
    assert not crossing("workers", "streams", "relata")
    assert not crossing("kafkaio", "streams", "workers", "relata")
    assert not crossing("schemas", "kafkaio", "streams", "workers", "relata")


def test_readme_is_short_enough_to_read() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 300, "README.md is for users: move detail into docs/"
