"""The docs' generated parts stay in step with the code: the settings table in
docs/configuration.md, the ACL table in docs/operations.md, the two set-up commands in
README.md."""

from __future__ import annotations

import re
from pathlib import Path

from relata.cli.settings_doc import acl_table, markdown_table

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
CONFIGURATION = ROOT / "docs" / "configuration.md"
OPERATIONS = ROOT / "docs" / "operations.md"


def _between(path: Path, name: str) -> str:
    match = re.search(rf"<!-- {name}:begin -->\n(.*?)<!-- {name}:end -->", path.read_text(), re.S)
    assert match, f"{path.name} lacks the {name} markers"
    return match.group(1)


def test_configuration_table_matches_the_settings() -> None:
    assert _between(CONFIGURATION, "settings") == markdown_table(), (
        "docs/configuration.md settings table is stale: "
        "paste `relata settings --markdown` between the markers"
    )


def test_acl_table_matches_the_declared_access() -> None:
    assert _between(OPERATIONS, "acls") == acl_table(), (
        "docs/operations.md ACL table is stale: paste `acl_table()` of "
        "relata/cli/settings_doc.py (relata settings --acls with no RELATA_* names set) "
        "between the markers"
    )


def test_readme_has_exactly_the_two_setup_commands() -> None:
    quick = _between(README, "quickstart")
    commands = [line for line in quick.splitlines() if line.startswith("make ")]
    assert commands == ["make demo", "make test"]
