"""`relata tail`: print the records of a topic as they arrive (and the readers tests use)."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import click
import orjson

from relata.cli.settings_cli import build_settings, settings_options
from relata.runtime.preflight import require_kafka
from relata.runtime.replay import ReplayError
from schemas.decoding import key_text
from schemas.settings import KafkaSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TailRecord:
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: str | None
    value: bytes | None

    def as_json(self) -> dict[str, Any]:
        """The record as a JSON-able dict; a JSON value is embedded, anything else as text."""
        value: Any = None
        if self.value is not None:
            try:
                # orjson, not json: it refuses deep nesting where json.loads would recurse
                # until RecursionError (a hostile record must not stop `relata tail`).
                value = orjson.loads(self.value)
            except orjson.JSONDecodeError:
                value = self.value.decode("utf-8", errors="replace")
        return {
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "timestamp_ms": self.timestamp_ms,
            "key": self.key,
            "value": value,
        }

    def as_text(self) -> str:
        value = "<null>" if self.value is None else self.value.decode("utf-8", errors="replace")
        return f"{self.topic}[{self.partition}]@{self.offset} key={self.key} {value}"


def make_consumer(kafka: KafkaSettings, *, group_id: str | None = None, **overrides: Any) -> Any:
    """A confluent-kafka Consumer that does not commit (readers of output topics)."""
    from confluent_kafka import Consumer

    config = {
        **kafka.librdkafka_config("relata-tail"),
        "group.id": group_id or f"relata-tail-{uuid.uuid4().hex[:12]}",
        "enable.auto.commit": False,
        "enable.partition.eof": False,
        "fetch.wait.max.ms": 500,
        **overrides,
    }
    return Consumer(config)


def assign_all(consumer: Any, topic: str, *, from_beginning: bool, timeout_s: float = 10.0) -> int:
    """Assign every partition of `topic` at its start or end; return the partition count.

    Manual assignment (no group join) starts reading at once, with no rebalance delay.
    """
    from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, TopicPartition

    metadata = consumer.list_topics(topic, timeout=timeout_s)
    info = metadata.topics.get(topic)
    if info is None or info.error is not None or not info.partitions:
        reason = info.error if info is not None else "not found"
        raise ReplayError(f"topic {topic!r} is not available: {reason}")
    offset = OFFSET_BEGINNING if from_beginning else OFFSET_END
    partitions = [TopicPartition(topic, p, offset) for p in sorted(info.partitions)]
    consumer.assign(partitions)
    return len(partitions)


def tail_records(
    consumer: Any,
    *,
    limit: int | None = None,
    idle_timeout_s: float | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[TailRecord]:
    """Yield records from an assigned consumer until `limit`, an idle timeout, or a stop."""
    count = 0
    last = time.monotonic()
    while limit is None or count < limit:
        if should_stop is not None and should_stop():
            return
        msg = consumer.poll(0.2)
        if msg is None:
            if idle_timeout_s is not None and time.monotonic() - last > idle_timeout_s:
                return
            continue
        if msg.error() is not None:
            logger.warning("consumer error error=%s", msg.error())
            continue
        last = time.monotonic()
        count += 1
        _ts_type, ts = msg.timestamp()
        yield TailRecord(
            msg.topic(), msg.partition(), msg.offset(), ts, key_text(msg.key()), msg.value()
        )


@click.command(name="tail")
@click.argument("topic")
@click.option("--from-beginning", is_flag=True, help="Start at the oldest record, not the newest.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per record.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Stop after N records.")
@click.option(
    "--idle-timeout",
    type=click.FloatRange(min=0),
    default=None,
    help="Stop after this many seconds without a record.",
)
@settings_options(KafkaSettings, group="kafka")
def tail_command(
    topic: str,
    from_beginning: bool,
    as_json: bool,
    limit: int | None,
    idle_timeout: float | None,
    **params: Any,
) -> None:
    """Print the records of TOPIC (name without the deployment prefix) as they arrive."""
    kafka = build_settings(KafkaSettings, group="kafka", params=params)
    full_topic = kafka.topic(topic)
    require_kafka(kafka, needs={full_topic: frozenset({"READ", "DESCRIBE"})})
    consumer = make_consumer(kafka)
    try:
        assign_all(consumer, full_topic, from_beginning=from_beginning)
        for record in tail_records(consumer, limit=limit, idle_timeout_s=idle_timeout):
            line = orjson.dumps(record.as_json()).decode() if as_json else record.as_text()
            click.echo(line)
    except ReplayError as exc:
        raise click.ClickException(str(exc)) from exc
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
