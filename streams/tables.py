"""The stream processor's Faust tables: changelog records through the `Sender`, one-partition
tables, value schemas, and reading stored values back."""

from __future__ import annotations

import json
from typing import Any

import faust

from .ports import Sender

# Keys are str; values raw JSON bytes (pydantic models) or JSON dicts (association records).
RAW_VALUES: faust.Schema[str, bytes] = faust.Schema(
    key_type=str, value_type=bytes, key_serializer="raw", value_serializer="raw"
)
JSON_VALUES: faust.Schema[str, Any] = faust.Schema(
    key_type=str, key_serializer="raw", value_serializer="json"
)


class ChangelogTable(faust.Table[Any, Any]):
    """A Faust table whose changelog records go through the stream processor's `Sender`.

    Faust's own send path (FutureMessage, producer buffer, aiokafka) cost ~0.3 ms of the event
    loop per table write; the writes of a batch now queue in librdkafka and are acknowledged
    by the batch's `flush`, before its input offsets are. Same topic, partition (the current
    event's, as Faust does), key and value encoding, so Faust's recovery and standby replicas
    read them as their own. Not done: the RocksDB store's persisted-offset bookkeeping, so a
    restart with rocksdb:// replays the changelog from its start (correct, slower).
    """

    sender: Sender
    # The changelog topic's name; None: Faust's `<app id>-<table>-changelog`.
    changelog_name: str | None = None

    def _changelog_topic_name(self) -> str:
        return self.changelog_name or super()._changelog_topic_name()

    def on_key_set(self, key: Any, value: Any) -> None:
        partition = self.partition_for_key(key)
        topic = self.changelog_topic
        raw_key, _ = topic.prepare_key(key, self.key_serializer)
        raw_value, _ = topic.prepare_value(value, self.value_serializer)
        self.sender.produce(
            topic.get_topic_name(), key=raw_key, value=raw_value, partition=partition
        )
        if partition is not None:
            self._maybe_set_key_ttl(key, partition)
        self._sensor_on_set(self, key, value)

    def on_key_del(self, key: Any) -> None:
        partition = self.partition_for_key(key)
        topic = self.changelog_topic
        raw_key, _ = topic.prepare_key(key, self.key_serializer)
        self.sender.produce(topic.get_topic_name(), key=raw_key, value=None, partition=partition)
        if partition is not None:
            self._maybe_del_key_ttl(key, partition)
        self._sensor_on_del(self, key)


class SinglePartitionTable(ChangelogTable):
    """A table of one partition: every key is in partition 0.

    Faust finds a key's partition from the current event, which is not set where an agent
    consumes `stream.take` batches; with one partition the answer needs no event.
    """

    def partition_for_key(self, key: Any) -> int | None:
        return 0


def changelog_table(
    app: Any,
    name: str,
    *,
    partitions: int,
    schema: Any,
    sender: Sender,
    changelog: str | None = None,
) -> Any:
    """Add a table to `app` whose changelog records go through `sender`."""
    table_class = SinglePartitionTable if partitions == 1 else ChangelogTable
    table = table_class(
        app, name=name, default=None, beacon=app.tables.beacon, partitions=partitions, schema=schema
    )
    table.sender = sender
    table.changelog_name = changelog
    return app.tables.add(table)


def local_size(table: Any) -> int:
    """The number of keys this worker holds in `table` (0 when the store cannot say cheaply)."""
    try:
        return len(table)
    except Exception:  # a store without a cheap len: skip this sample
        return 0


def stored_json(stored: bytes | str | dict[str, Any]) -> bytes:
    """A raw-JSON table value as bytes, whatever the store handed back.

    The memory store keeps the bytes written; the RocksDB store serialises with the table's
    own (JSON) serializer and hands back the parsed object.
    """
    if isinstance(stored, bytes):
        return stored
    if isinstance(stored, str):
        return stored.encode("utf-8")
    return json.dumps(stored).encode("utf-8")
