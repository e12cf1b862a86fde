"""`relata settings`: every setting with its environment name, default and meaning."""

from __future__ import annotations

import json
from typing import Any

import click
from pydantic_settings import BaseSettings

from schemas.access import COMPONENT_COMMANDS, component_access
from schemas.fit_settings import FitSettings
from schemas.quality_settings import QualitySettings, ShadowSettings
from schemas.settings import (
    EmbeddedKafkaSettings,
    EncoderSettings,
    IndexerSettings,
    KafkaSettings,
    RecommenderSettings,
    ReliabilitySettings,
    StoreSettings,
    StreamsSettings,
)

SETTINGS_CLASSES: tuple[type[BaseSettings], ...] = (
    KafkaSettings,
    StreamsSettings,
    ReliabilitySettings,
    EncoderSettings,
    StoreSettings,
    IndexerSettings,
    RecommenderSettings,
    ShadowSettings,
    QualitySettings,
    FitSettings,
    EmbeddedKafkaSettings,
)


def rows() -> list[dict[str, Any]]:
    """One row per setting: class, env name, default, description."""
    out = []
    for cls in SETTINGS_CLASSES:
        prefix = str(cls.model_config.get("env_prefix", ""))
        for name, field in cls.model_fields.items():
            default = field.get_default(call_default_factory=True)
            out.append(
                {
                    "group": cls.__name__.removesuffix("Settings"),
                    "env": f"{prefix}{name}".upper(),
                    "default": "" if default is None else str(default),
                    "description": field.description or "",
                }
            )
    return out


def markdown_table() -> str:
    """The configuration table the README carries (a test keeps them in step)."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for row in rows():
        default = f"`{row['default']}`" if row["default"] else "—"
        lines.append(f"| `{row['env']}` | {default} | {row['description'].replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def acl_table(
    kafka: KafkaSettings | None = None,
    *,
    streams: StreamsSettings | None = None,
    indexer: IndexerSettings | None = None,
    recommender: RecommenderSettings | None = None,
    quality: QualitySettings | None = None,
) -> str:
    """The ACLs of every component's principal (`schemas.access`), one row per resource;
    with no arguments, under the default names (no topic prefix), as docs/operations.md
    carries it (a test keeps them in step)."""
    kafka = kafka or KafkaSettings.model_construct(topic_prefix="")
    accesses = component_access(
        kafka, streams=streams, indexer=indexer, recommender=recommender, quality=quality
    )
    lines = [
        "| principal | runs | resource | pattern | operations |",
        "|---|---|---|---|---|",
    ]
    for access in accesses.values():
        runs = COMPONENT_COMMANDS[access.component]
        for grant in access.grants:
            pattern = "PREFIXED" if grant.prefixed else "LITERAL"
            operations = ", ".join(sorted(grant.operations))
            lines.append(
                f"| `User:{access.principal}` | {runs} | {grant.resource} `{grant.name}` "
                f"| {pattern} | {operations} |"
            )
            runs = ""  # said once per principal
    return "\n".join(lines) + "\n"


@click.command(name="settings")
@click.option("--markdown", is_flag=True, help="Print the README's configuration table.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option(
    "--acls",
    is_flag=True,
    help=(
        "Print the ACLs each component's principal needs, named after this environment's "
        "RELATA_KAFKA_TOPIC_PREFIX, RELATA_STREAMS_APP_ID and RELATA_*_GROUP_ID (Markdown)."
    ),
)
def command(markdown: bool, as_json: bool, acls: bool) -> None:
    """List every RELATA_* setting with its default and meaning."""
    if acls:
        click.echo(
            acl_table(
                KafkaSettings(),
                streams=StreamsSettings(),
                indexer=IndexerSettings(),
                recommender=RecommenderSettings(),
                quality=QualitySettings(),
            ),
            nl=False,
        )
    elif as_json:
        click.echo(json.dumps(rows(), indent=2))
    elif markdown:
        click.echo(markdown_table(), nl=False)
    else:
        for row in rows():
            click.echo(f"{row['env']:<44} {row['default'] or '-':<28} {row['description']}")
