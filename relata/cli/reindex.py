"""`relata reindex`, `relata rollback`, `relata model-versions`: the item vectors' model
lifecycle (`workers.store_versions`).

`relata reindex` encodes the compacted item catalog with the configured model into that model's
own version of the store while the current version keeps serving, commits its catalog position
under the version's indexer group (so the new model's workers go on from there), builds the
index, then switches the pointer. `relata rollback` swaps the current and previous versions.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import click

from relata.cli.settings_cli import build_settings, settings_options
from schemas.settings import EncoderSettings, IndexerSettings, KafkaSettings, StoreSettings

logger = logging.getLogger(__name__)

# How long to wait for the catalog's partitions to be assigned before giving up.
ASSIGN_TIMEOUT_S = 60.0
# Progress lines at most this often.
PROGRESS_EVERY_S = 2.0


@dataclass
class ReindexResult:
    """What `reindex` did; `replaced` is the version that was current before the switch."""

    model_name: str
    model_version: str
    records: int
    indexed: int
    retired: int
    dead_letters: int
    points: int
    switched: bool
    replaced: str | None
    seconds: float


def _caught_up(consumer: Any, ends: dict[int, tuple[int, int]]) -> bool:
    """Whether the consumer's position reached the end offsets taken at the start on every
    partition (an empty partition is done; one not assigned yet is not)."""
    from confluent_kafka import TopicPartition

    assigned = {tp.partition: tp for tp in consumer.assignment()}
    if set(assigned) != set(ends):
        return False
    positions = consumer.position(
        [TopicPartition(tp.topic, tp.partition) for tp in assigned.values()]
    )
    for tp in positions:
        low, high = ends[tp.partition]
        if high > low and tp.offset < high:  # a negative offset: nothing consumed yet
            return False
    return True


def reindex(
    *,
    kafka: KafkaSettings,
    encoder: Any,
    versions: Any,
    indexer_settings: IndexerSettings,
    switch: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> ReindexResult:
    """Encode item-catalog up to its current end into `encoder`'s version of `versions`, then
    (with `switch`) make it current. Resumable: a second run goes on from the committed
    position of the version's group. Records that arrive meanwhile are left to the new model's
    indexer, which goes on from the same group's position."""
    from confluent_kafka import TopicPartition
    from prometheus_client import CollectorRegistry

    from kafkaio.consumer import commit
    from relata.cli.run_workers import build_consumer, build_producer
    from relata.runtime.topics import topic_name
    from schemas.topics import DEAD_LETTER, ITEM_CATALOG
    from workers.indexer import IndexerTopics, ItemIndexer
    from workers.metrics import WorkerMetrics
    from workers.model_identity import version_group
    from workers.vector_store import ModelIdentity

    start = time.monotonic()
    model = ModelIdentity.of(encoder)
    topic = topic_name(kafka, ITEM_CATALOG)
    store = versions.open(encoder.dim, model)
    consumer = build_consumer(
        kafka,
        group_id=version_group(indexer_settings.group_id, model.version),
        client_id="relata-indexer",
    )
    producer = build_producer(kafka, client_id="relata-indexer")
    totals = {"records": 0, "indexed": 0, "retired": 0, "dead_letters": 0}
    try:
        partitions = sorted(consumer.list_topics(topic, timeout=30).topics[topic].partitions)
        ends = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)
            for p in partitions
        }
        target = sum(high - low for low, high in ends.values())
        consumer.subscribe([topic])
        indexer = ItemIndexer(
            consumer=consumer,
            producer=producer,
            encoder=encoder,
            store=store,
            metrics=WorkerMetrics.create(CollectorRegistry()),
            topics=IndexerTopics(catalog=topic, dead_letter=topic_name(kafka, DEAD_LETTER)),
            max_batch=indexer_settings.max_batch,
            max_wait_ms=indexer_settings.max_wait_ms,
        )
        assign_deadline = time.monotonic() + ASSIGN_TIMEOUT_S
        next_progress = 0.0
        while not _caught_up(consumer, ends):
            if not consumer.assignment() and time.monotonic() > assign_deadline:
                raise click.ClickException(
                    f"no partition of {topic} was assigned within {ASSIGN_TIMEOUT_S:.0f}s: is "
                    f"another process consuming it under the group "
                    f"{version_group(indexer_settings.group_id, model.version)!r}?"
                )
            result = indexer.poll_once()
            for name in totals:
                totals[name] += getattr(result, name)
            if progress is not None and time.monotonic() >= next_progress:
                progress(totals["records"], target)
                next_progress = time.monotonic() + PROGRESS_EVERY_S
        # Dead letters acknowledged, then the position committed synchronously: the new model's
        # workers start from it.
        indexer.producer.flush()
        commit(consumer, asynchronous=False)
        # Build the HNSW index before the version serves its first query.
        store.optimize()
        points = store.count()
    finally:
        store.close()
        consumer.close()
        producer.flush(10)
    replaced = versions.switch(model) if switch else None
    logger.info(
        "reindexed model=%s points=%d switched=%s replaced=%s", model, points, switch, replaced
    )
    return ReindexResult(
        model_name=model.name,
        model_version=model.version,
        points=points,
        switched=switch,
        replaced=replaced.version if replaced else None,
        seconds=round(time.monotonic() - start, 3),
        **totals,
    )


def _versions_json(versions: Any) -> dict[str, Any]:
    current, previous = versions.current(), versions.previous()
    return {
        "collection": versions.collection,
        "current": asdict(current) if current else None,
        "previous": asdict(previous) if previous else None,
        "versions": [asdict(v) for v in versions.versions()],
    }


def _fail(exc: Exception) -> click.ClickException:
    return click.ClickException(str(exc))


@click.command(name="reindex")
@click.option(
    "--switch/--no-switch",
    default=True,
    show_default=True,
    help="Make the new version current once built (--no-switch: build only).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@settings_options(IndexerSettings, group="indexer")
@settings_options(StoreSettings, group="store")
@settings_options(EncoderSettings, group="encoder")
@settings_options(KafkaSettings, group="kafka")
def command(switch: bool, as_json: bool, **params: Any) -> None:
    """Build the item vectors of the configured model beside the serving version, then switch.

    Run it with the encoder settings the workers will run with (an adapter, a model path);
    then restart the workers with those settings. Nothing to do when that model's version is
    already current."""
    from relata.runtime.preflight import require_kafka
    from schemas.access import component_access
    from workers.encoder import TransformerEncoder
    from workers.store_versions import build_versions
    from workers.vector_store import ModelIdentity, VectorStoreError

    kafka = build_settings(KafkaSettings, group="kafka", params=params)
    encoder_settings = build_settings(EncoderSettings, group="encoder", params=params)
    store_settings = build_settings(StoreSettings, group="store", params=params)
    indexer_settings = build_settings(IndexerSettings, group="indexer", params=params)
    require_kafka(
        kafka, needs=component_access(kafka, indexer=indexer_settings)["indexer"].topics()
    )
    encoder = TransformerEncoder.from_settings(encoder_settings)
    model = ModelIdentity.of(encoder)
    versions = build_versions(store_settings)
    try:
        current = versions.current()
        if current == model:
            message = f"{model} is already the current version of {versions.collection}"
            click.echo(
                json.dumps({"current": asdict(model), "reindexed": False}) if as_json else message
            )
            return

        def progress(records: int, target: int) -> None:
            click.echo(f"reindex {model.version}: {records}/{target} catalog records", err=True)

        click.echo(f"building {model} beside {current or 'no version'}", err=True)
        result = reindex(
            kafka=kafka,
            encoder=encoder,
            versions=versions,
            indexer_settings=indexer_settings,
            switch=switch,
            progress=progress,
        )
    except VectorStoreError as exc:
        raise _fail(exc) from exc
    finally:
        versions.close()
        encoder.close()
    if as_json:
        click.echo(json.dumps(asdict(result)))
    elif switch:
        click.echo(
            f"{versions.collection}: now {model} ({result.points} items, "
            f"{result.seconds:.0f}s); was {result.replaced or 'none'}. Restart the workers with "
            "these encoder settings; `relata rollback` switches back."
        )
    else:
        click.echo(
            f"built {model} ({result.points} items); not switched: run `relata reindex` again "
            "with the same settings to switch"
        )


@click.command(name="rollback")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@settings_options(StoreSettings, group="store")
def rollback_command(as_json: bool, **params: Any) -> None:
    """Make the previous version of the item vectors current again (and the current one
    previous, so a second rollback undoes the first). Then restart the workers with the
    encoder settings of that version."""
    from workers.store_versions import build_versions
    from workers.vector_store import VectorStoreError

    versions = build_versions(build_settings(StoreSettings, group="store", params=params))
    try:
        replaced = versions.current()
        back = versions.rollback()
        state = _versions_json(versions)
    except VectorStoreError as exc:
        raise _fail(exc) from exc
    finally:
        versions.close()
    if as_json:
        click.echo(json.dumps(state))
    else:
        click.echo(f"{versions.collection}: now {back}; was {replaced}")


@click.command(name="model-versions")
@click.option("--json", "as_json", is_flag=True, help="Print the versions as JSON.")
@settings_options(StoreSettings, group="store")
def versions_command(as_json: bool, **params: Any) -> None:
    """List the versions of the item vectors, and which is current and previous."""
    from workers.store_versions import build_versions
    from workers.vector_store import VectorStoreError

    versions = build_versions(build_settings(StoreSettings, group="store", params=params))
    try:
        state = _versions_json(versions)
    except VectorStoreError as exc:
        raise _fail(exc) from exc
    finally:
        versions.close()
    if as_json:
        click.echo(json.dumps(state))
        return
    marks = {
        (state["current"] or {}).get("version"): "current",
        (state["previous"] or {}).get("version"): "previous",
    }
    for version in state["versions"]:
        mark = marks.get(version["version"], "")
        click.echo(f"{version['version']}  {version['name']}  {mark}".rstrip())
    if not state["versions"]:
        click.echo(f"{state['collection']}: no version yet", err=True)
