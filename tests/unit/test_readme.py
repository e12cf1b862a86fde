"""The README's generated parts stay in step with the code."""

from __future__ import annotations

import re
from pathlib import Path

from relata.cli.settings_doc import markdown_table

README = Path(__file__).resolve().parents[2] / "README.md"


def _between(text: str, name: str) -> str:
    match = re.search(rf"<!-- {name}:begin -->\n(.*?)<!-- {name}:end -->", text, re.S)
    assert match, f"README lacks the {name} markers"
    return match.group(1)


def test_configuration_table_matches_the_settings() -> None:
    assert _between(README.read_text(), "settings") == markdown_table(), (
        "README configuration table is stale: paste `relata settings --markdown` between the markers"
    )


def test_readme_has_exactly_the_two_setup_commands() -> None:
    text = README.read_text()
    quick = _between(text, "quickstart")
    commands = [line for line in quick.splitlines() if line.startswith("make ")]
    assert commands == ["make demo", "make test"]
