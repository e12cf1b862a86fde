"""`relata kafka`: the embedded single-node Apache Kafka in the foreground, plain or secured
(`--security sasl_ssl`: TLS, a SCRAM user and ACLs per component, an mTLS listener; the
client settings of each component are printed)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Literal

import click

from relata.cli.settings_cli import build_settings, settings_options
from relata.runtime.kafka_broker import EmbeddedKafka
from relata.runtime.kafka_jars import resolve_jars
from relata.runtime.kafka_security import ADMIN, KafkaSecurity
from relata.runtime.process import stop_on_signals
from schemas.access import COMPONENT_COMMANDS, component_access
from schemas.settings import (
    EmbeddedKafkaSettings,
    IndexerSettings,
    KafkaSettings,
    RecommenderSettings,
    StreamsSettings,
)


def _security(topic_prefix: str) -> KafkaSecurity:
    """Every component's principal and ACLs, named after the topic prefix and the app and
    group ids of the environment (RELATA_STREAMS_APP_ID, RELATA_*_GROUP_ID)."""
    kafka = KafkaSettings.model_construct(topic_prefix=topic_prefix)
    accesses = component_access(
        kafka,
        streams=StreamsSettings(),
        indexer=IndexerSettings(),
        recommender=RecommenderSettings(),
    )
    return KafkaSecurity(tuple(accesses.values()))


def _clients_text(kafka: EmbeddedKafka, security: KafkaSecurity) -> str:
    """One block of settings per principal, ready to `export`."""
    blocks = []
    for access in security.accesses:
        env = kafka.client_env(access.principal)
        lines = [f"# {COMPONENT_COMMANDS[access.component]}: User:{access.principal}"]
        lines += [f"export {name}='{value}'" for name, value in env.items()]
        blocks.append("\n".join(lines))
    admin = kafka.client_env(ADMIN)
    blocks.append(
        "\n".join(
            [f"# the admin (super user): User:{ADMIN}"]
            + [f"export {name}='{value}'" for name, value in admin.items()]
        )
    )
    any_user = security.accesses[0].principal
    mtls = kafka.client_env(any_user, mtls=True)
    blocks.append(
        f"# mTLS listener {kafka.mtls_bootstrap_servers} (client certificates required; a "
        f"certificate's CN is its principal), e.g. as User:{any_user}:\n"
        + "\n".join(f"export {name}='{value}'" for name, value in mtls.items())
    )
    return "\n\n".join(blocks)


@click.command("kafka")
@click.option(
    "--resolve-only", is_flag=True, help="Only resolve the jars into the cache; print the dir."
)
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help=(
        "Keep the broker's data (topics, records, offsets) in DIR across restarts; formatted "
        "when new. Same as --broker-data-dir. [env: RELATA_EMBEDDED_KAFKA_DATA_DIR]"
    ),
)
@click.option(
    "--security",
    type=click.Choice(["none", "sasl_ssl"]),
    default="none",
    show_default=True,
    envvar="RELATA_EMBEDDED_KAFKA_SECURITY",
    show_envvar=True,
    help=(
        "sasl_ssl: TLS (a CA made at start), SCRAM-SHA-512 users and ACLs per component, an "
        "mTLS listener; prints each component's client settings."
    ),
)
@click.option(
    "--topic-prefix",
    default="",
    envvar="RELATA_KAFKA_TOPIC_PREFIX",
    show_envvar=True,
    help="With --security: the topic prefix the ACLs name (as the clients' setting).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the settings as one JSON object.")
@settings_options(EmbeddedKafkaSettings, group="broker")
def command(
    resolve_only: bool,
    data_dir: Path | None,
    security: Literal["none", "sasl_ssl"],
    topic_prefix: str,
    as_json: bool,
    **params: object,
) -> None:
    """Run the embedded single-node Apache Kafka in the foreground; Ctrl-C stops it."""
    if data_dir is not None:
        params["broker__data_dir"] = data_dir
    settings = build_settings(EmbeddedKafkaSettings, group="broker", params=params)
    if resolve_only:
        click.echo(str(resolve_jars(settings)))
        return
    secured = _security(topic_prefix) if security == "sasl_ssl" else None
    stop = threading.Event()
    with EmbeddedKafka(settings, security=secured) as kafka:
        stop_on_signals(stop)
        if as_json:
            out: dict[str, object] = {"bootstrap_servers": kafka.bootstrap_servers}
            if secured is not None:
                out["mtls_bootstrap_servers"] = kafka.mtls_bootstrap_servers
                out["clients"] = {
                    access.principal: kafka.client_env(access.principal)
                    for access in secured.accesses
                } | {ADMIN: kafka.client_env(ADMIN)}
            click.echo(json.dumps(out))
        else:
            click.echo(kafka.bootstrap_servers)
            if secured is not None:
                click.echo(_clients_text(kafka, secured))
        kept = f"data kept in {kafka.data_dir}" if kafka.data_dir else "data removed on stop"
        click.echo(f"broker log: {kafka.log_path}; {kept}  (Ctrl-C stops)", err=True)
        while not stop.is_set():
            if not kafka.running:
                raise click.ClickException(f"embedded kafka exited:\n{kafka._log_tail()}")
            stop.wait(1.0)
        click.echo("stopping embedded kafka", err=True)
