"""`relata rollback` and `relata model-versions` on an embedded store's versions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from relata.cli.reindex import rollback_command, versions_command
from workers.store_versions import EdgeVersions
from workers.vector_store import ModelIdentity

OLD = ModelIdentity("all-MiniLM-L6-v2", "0123456789ab")
NEW = ModelIdentity("all-MiniLM-L6-v2+adapter", "ba9876543210")


def _store(tmp_path: Path) -> EdgeVersions:
    versions = EdgeVersions(tmp_path, "items")
    for model in (OLD, NEW):
        store = versions.open(4, model)
        store.upsert(["a"], np.eye(4, dtype=np.float32)[:1], [{"title": "A"}])
        store.close()
        versions.switch(model)
    return versions


def _options(tmp_path: Path) -> list[str]:
    return ["--store-kind", "edge", "--store-path", str(tmp_path), "--store-collection", "items"]


def test_rollback_switches_to_the_previous_version_and_back(tmp_path: Path) -> None:
    versions = _store(tmp_path)
    runner = CliRunner()
    result = runner.invoke(rollback_command, _options(tmp_path))
    assert result.exit_code == 0, result.output
    assert f"now {OLD}; was {NEW}" in result.output
    assert (versions.current(), versions.previous()) == (OLD, NEW)

    listed = runner.invoke(versions_command, [*_options(tmp_path), "--json"])
    assert json.loads(listed.output) == {
        "collection": "items",
        "current": {"name": OLD.name, "version": OLD.version},
        "previous": {"name": NEW.name, "version": NEW.version},
        "versions": [
            {"name": OLD.name, "version": OLD.version},
            {"name": NEW.name, "version": NEW.version},
        ],
    }
    assert runner.invoke(rollback_command, _options(tmp_path)).exit_code == 0
    assert versions.current() == NEW


def test_rollback_without_a_previous_version_fails_with_the_reason(tmp_path: Path) -> None:
    result = CliRunner().invoke(rollback_command, _options(tmp_path))
    assert result.exit_code == 1
    assert "no previous version" in result.output
