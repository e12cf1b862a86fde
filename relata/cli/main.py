"""The `relata` command: one entry point, sub-commands loaded lazily.

Each sub-command lives in its own module as a `click.Command` named `command`, so that
`relata --help` stays fast and heavy imports (torch, faust) happen only when needed.
"""

from __future__ import annotations

import importlib

import click

# name -> (module, one-line help). Modules export `command: click.Command`.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": (
        "relata.runtime.demo",
        "Run the whole pipeline on embedded Kafka and Qdrant, on real data.",
    ),
    "streams": (
        "relata.cli.run_streams",
        "Run the Faust stream processor (profiles, associations, HTTP).",
    ),
    "workers": (
        "relata.cli.run_workers",
        "Run the encoder workers (item indexer and recommender).",
    ),
    "load-catalog": (
        "relata.runtime.replay",
        "Publish a catalog file (items.jsonl[.gz]) to item-catalog.",
    ),
    "replay": (
        "relata.runtime.replay",
        "Replay an events file (events.jsonl[.gz]) into behavior-events.",
    ),
    "tail": ("relata.runtime.tail", "Print the records of a topic as they arrive."),
    "erase": ("relata.runtime.replay", "Erase a user from everything relata keeps."),
    "settings": (
        "relata.cli.settings_doc",
        "List every RELATA_* setting with its default and meaning.",
    ),
    "schemas": ("relata.cli.schema_export", "Write one JSON Schema per topic into schemas/json/."),
    "deploy-manifests": (
        "relata.cli.deploy_manifests",
        "Write the generated parts of deploy/: Strimzi topics and users, the dashboard.",
    ),
    "kafka": (
        "relata.runtime.kafka_command",
        "Run the embedded single-node Apache Kafka (KRaft), plain or secured.",
    ),
    "bench": ("relata.lab.bench", "Measure event-to-recommendation latency and throughput."),
    "evaluate": (
        "relata.lab.evaluate_command",
        "Offline evaluation of recommendation quality on a data set.",
    ),
    "train": ("relata.lab.train", "Fit the adaptive parts (adapter, blend weights) on histories."),
    "reindex": (
        "relata.cli.reindex",
        "Build the item vectors of a new model beside the serving ones, then switch to them.",
    ),
    "rollback": ("relata.cli.reindex", "Switch the item vectors back to the previous model."),
    "model-versions": (
        "relata.cli.reindex",
        "List the item vectors' model versions (current, previous).",
    ),
}

_ATTRS = {
    "load-catalog": "load_catalog_command",
    "replay": "replay_command",
    "tail": "tail_command",
    "erase": "erase_command",
    "rollback": "rollback_command",
    "model-versions": "versions_command",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in SUBCOMMANDS:
            return None
        module_name, _ = SUBCOMMANDS[cmd_name]
        module = importlib.import_module(module_name)
        command: click.Command = getattr(module, _ATTRS.get(cmd_name, "command"))
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, SUBCOMMANDS[name][1]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--log-level",
    envvar="RELATA_LOG_LEVEL",
    default="INFO",
    show_default=True,
    show_envvar=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]),
)
def main(log_level: str) -> None:
    """relata: real-time product association and recommendation on Kafka and Qdrant."""
    import logging

    logging.basicConfig(
        level=log_level,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
