"""load-catalog → replay → tail round trip on the real embedded broker."""

from __future__ import annotations

import gzip
import itertools
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from relata.cli.main import main
from relata.runtime.replay import iter_jsonl, make_producer, replay_events
from relata.runtime.tail import assign_all, make_consumer, tail_records
from relata.runtime.topics import ensure_topics
from schemas.settings import KafkaSettings
from schemas.topics import BEHAVIOR_EVENTS, ITEM_CATALOG

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _first(path: Path, n: int) -> list[bytes]:
    return [raw for _, raw in itertools.islice(iter_jsonl(path), n)]


def _kafka_args(settings: KafkaSettings) -> list[str]:
    return [
        "--kafka-bootstrap-servers",
        settings.bootstrap_servers,
        "--kafka-topic-prefix",
        settings.topic_prefix,
        # The tools check the topic they write against the deployment's partitions.
        "--kafka-partitions",
        str(settings.partitions),
    ]


def _tail_json(settings: KafkaSettings, topic: str, limit: int) -> list[dict[str, object]]:
    result = CliRunner().invoke(
        main,
        [
            "tail",
            topic,
            "--from-beginning",
            "--json",
            "--limit",
            str(limit),
            "--idle-timeout",
            "20",
            *_kafka_args(settings),
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def test_load_catalog_validates_publishes_and_reports_invalid_lines(
    kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    ensure_topics(kafka_settings, [ITEM_CATALOG])
    real = _first(REPO / "data/online-retail/items.jsonl.gz", 5)
    bad = [b"{not json", b'{"item_id": "x", "price": -3}']
    path = tmp_path / "items.jsonl.gz"
    path.write_bytes(gzip.compress(b"\n".join([real[0], bad[0], *real[1:], bad[1]]) + b"\n"))

    result = CliRunner().invoke(
        main, ["load-catalog", str(path), *_kafka_args(kafka_settings)], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    assert "published 5 items" in result.stderr
    assert "2 invalid lines" in result.stderr
    assert "line 2: malformed_json" in result.stderr
    assert "line 7: invalid_fields" in result.stderr

    strict = CliRunner().invoke(
        main, ["load-catalog", str(path), "--strict", *_kafka_args(kafka_settings)]
    )
    assert strict.exit_code == 1

    records = _tail_json(kafka_settings, ITEM_CATALOG.name, limit=10)
    first_five = {json.loads(raw)["item_id"] for raw in real}
    assert {r["key"] for r in records} == first_five
    for record in records:
        value = record["value"]
        assert isinstance(value, dict)
        assert value["item_id"] == record["key"]
        assert value["available"] is True


def test_replay_sends_lines_verbatim_keyed_by_user_and_tail_reads_them(
    kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    ensure_topics(kafka_settings, [BEHAVIOR_EVENTS])
    events = _first(REPO / "data/online-retail/events.jsonl.gz", 40)
    malformed = b'{"user_id": "u-bad", "event_type": "teleport"'
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join([*events[:20], malformed, *events[20:]]) + b"\n")

    result = CliRunner().invoke(
        main,
        ["replay", str(path), "--rate", "200", "--limit", "30", *_kafka_args(kafka_settings)],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert "sent 30 events" in result.stderr
    assert "1 unparsable" in result.stderr

    records = _tail_json(kafka_settings, BEHAVIOR_EVENTS.name, limit=30)
    assert len(records) == 30
    by_value = {
        json.dumps(r["value"]) if isinstance(r["value"], dict) else r["value"]: r for r in records
    }
    # The malformed line arrives verbatim, without a key (so streams can dead-letter it).
    assert by_value[malformed.decode()]["key"] is None
    sent = [json.loads(raw) for raw in [*events[:20], *events[20:29]]]
    keyed = [r for r in records if r["key"] is not None]
    assert sorted(r["value"]["event_id"] for r in keyed) == sorted(e["event_id"] for e in sent)
    for record in keyed:
        assert record["key"] == record["value"]["user_id"]


def test_replay_events_records_send_times_matching_kafka_timestamps(
    kafka_settings: KafkaSettings,
) -> None:
    ensure_topics(kafka_settings, [BEHAVIOR_EVENTS])
    topic = kafka_settings.topic(BEHAVIOR_EVENTS.name)
    sent_at: dict[str, float] = {}
    progress = replay_events(
        iter_jsonl(REPO / "data/online-retail/events.jsonl.gz"),
        producer=make_producer(kafka_settings),
        topic=topic,
        rate=0,
        limit=500,
        sent_at=sent_at,
    )
    assert progress.sent == 500
    assert len(sent_at) == 500
    consumer = make_consumer(kafka_settings)
    try:
        assign_all(consumer, topic, from_beginning=True)
        records = list(tail_records(consumer, limit=500, idle_timeout_s=20))
    finally:
        consumer.close()
    assert len(records) == 500
    for record in records:
        assert record.value is not None
        event_id = json.loads(record.value)["event_id"]
        assert record.timestamp_ms == int(sent_at[event_id] * 1000)


def test_lag_monitor_reads_end_and_committed_offsets_of_every_partition(
    kafka_settings: KafkaSettings, unique_id: str
) -> None:
    """The bench's lag: end offsets of all partitions in one request, minus a group's commits."""
    from confluent_kafka import Producer, TopicPartition

    from relata.runtime.probes import LagMonitor
    from relata.runtime.tail import make_consumer

    ensure_topics(kafka_settings, [BEHAVIOR_EVENTS], partitions=3)
    topic = kafka_settings.topic(BEHAVIOR_EVENTS.name)
    producer = Producer(kafka_settings.librdkafka_config())
    for n in range(3):  # 2, 3 and 4 records in partitions 0, 1 and 2
        for _ in range(n + 2):
            producer.produce(topic, partition=n, value=b"{}")
    assert producer.flush(30) == 0
    group = f"lag-{unique_id}"
    committer = make_consumer(kafka_settings, group_id=group)
    committer.commit(
        offsets=[TopicPartition(topic, 0, 1), TopicPartition(topic, 2, 4)], asynchronous=False
    )
    committer.close()
    monitor = LagMonitor(kafka_settings)
    try:
        assert monitor.end_offsets(topic) == {0: 2, 1: 3, 2: 4}
        assert monitor.committed(group, topic) == {0: 1, 2: 4}
        assert monitor.lag(group, topic) == (2 - 1) + 3 + 0
        producer.produce(topic, partition=1, value=b"{}")
        assert producer.flush(30) == 0
        assert monitor.lag(group, topic) == 5  # partitions cached, offsets read afresh
    finally:
        monitor.close()
