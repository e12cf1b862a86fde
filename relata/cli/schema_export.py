"""`relata schemas`: write one JSON Schema per topic, the contract subscribers code against."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from schemas.topics import ALL_TOPICS, TopicSpec

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "schemas" / "json"


def topic_schema(spec: TopicSpec) -> dict[str, Any]:
    """The JSON Schema of one topic's values, with the key and cleanup policy noted."""
    schema = spec.model.model_json_schema(mode="serialization")
    schema["$id"] = f"https://relata.dev/schemas/{spec.name}.json"
    schema["description"] = (
        f"{spec.description} Key: {spec.key}. cleanup.policy: {spec.cleanup_policy}."
    )
    return schema


def render_all() -> dict[str, str]:
    """File name -> JSON text, for every topic."""
    return {
        f"{spec.name}.schema.json": json.dumps(topic_schema(spec), indent=2, sort_keys=True) + "\n"
        for spec in ALL_TOPICS
    }


@click.command(name="schemas")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    default=DEFAULT_DIR,
    show_default=True,
    help="Directory to write the schemas into.",
)
@click.option("--check", is_flag=True, help="Exit 1 if the files differ from the models.")
def command(out_dir: Path, check: bool) -> None:
    """Write (or with --check, verify) one JSON Schema per topic."""
    rendered = render_all()
    stale = [
        name
        for name, text in rendered.items()
        if not (out_dir / name).exists() or (out_dir / name).read_text() != text
    ]
    if check:
        if stale:
            raise click.ClickException(
                f"schemas drifted from the models: {', '.join(stale)}; run `relata schemas`"
            )
        click.echo(f"{len(rendered)} schemas up to date in {out_dir}")
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in rendered.items():
        (out_dir / name).write_text(text)
    click.echo(f"wrote {len(rendered)} schemas to {out_dir} ({len(stale)} changed)")
