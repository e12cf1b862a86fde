"""kafkaio's consume side and dead letters: the consume-error policy (one function, the same
for the stream processor and the workers), commits, consumer lag and the dead-letter route."""

from __future__ import annotations

import json
import logging
from typing import Any, ClassVar

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition
from prometheus_client import CollectorRegistry, Counter, Gauge

import kafkaio.consumer
import streams.event_consumer
import workers.indexer
import workers.recommender
from kafkaio.consumer import LagReporter, commit, usable
from kafkaio.dead_letters import DeadLetters
from schemas.decoding import Rejection
from schemas.messages import DeadLetter
from streams.event_consumer import EventBatchConsumer, ProfileStore
from tests.unit.worker_fakes import FakeConsumer, FakeEncoder, FakeMessage, FakeProducer
from workers.client_store import ClientVectorStore
from workers.indexer import IndexerTopics, ItemIndexer
from workers.metrics import WorkerMetrics

TOPIC = "in"
ITEM = json.dumps({"item_id": "a", "title": "red lipstick", "categories": ["Beauty"]}).encode()


def good(offset: int = 0) -> FakeMessage:
    return FakeMessage(TOPIC, ITEM, b"a", 0, offset)


def failed(error: KafkaError) -> FakeMessage:
    return FakeMessage(TOPIC, None, None, 0, -1, error)


EOF_ERROR = KafkaError(KafkaError._PARTITION_EOF)
TRANSIENT = KafkaError(KafkaError._TRANSPORT, "broker down")
FATAL = KafkaError(KafkaError._FENCED, "fenced", fatal=True)


def test_eof_is_skipped_other_errors_are_logged_and_skipped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    first, second = good(0), good(1)
    with caplog.at_level(logging.WARNING, logger="kafkaio.consumer"):
        assert usable([first, failed(EOF_ERROR), failed(TRANSIENT), second]) == [first, second]
    assert [r.getMessage() for r in caplog.records] == [
        f"consume error topic={TOPIC} error={TRANSIENT}"
    ]


def test_a_fatal_error_raises() -> None:
    with pytest.raises(KafkaException):
        usable([good(), failed(FATAL)])


# ---- the same policy for both users --------------------------------------------------------


class BatchClient:
    """A librdkafka consumer as the profile agent's batch consumer uses it."""

    def __init__(self, messages: list[Any]) -> None:
        self.messages = messages

    def consume(self, num_messages: int, timeout: float) -> list[Any]:
        out, self.messages = self.messages, []
        return out


def streams_usable(messages: list[FakeMessage]) -> list[bytes | None]:
    """The records the stream processor's event consumer hands to its handler."""

    async def handle(records: list[Any]) -> None: ...

    consumer = EventBatchConsumer(
        consumer_config={},
        restore_config={},
        topic=TOPIC,
        store=ProfileStore(changelog_topic="c", changelog=FakeProducer()),
        handle=handle,
        to_record=lambda message: message,
        batch_max=100,
        window_s=0.0,
    )
    consumer._consumer = BatchClient(messages)
    return [m.value() for m in consumer._next_batch(0.0)]


def workers_usable(messages: list[FakeMessage]) -> list[bytes | None]:
    """The records the item indexer applies (each good one is indexed)."""
    store = ClientVectorStore(collection="items", path=":memory:")
    store.ensure_collection(FakeEncoder.dim)
    source = FakeConsumer(TOPIC, queue=messages)
    indexer = ItemIndexer(
        consumer=source,
        producer=FakeProducer(),
        encoder=FakeEncoder(),
        store=store,
        metrics=WorkerMetrics.create(CollectorRegistry()),
        topics=IndexerTopics(catalog=TOPIC, dead_letter="dead-letter"),
        max_wait_ms=1,
    )
    try:
        result = indexer.poll_once()
    finally:
        store.close()
    assert result.dead_letters == 0  # client-side errors are never dead-lettered
    return [ITEM] * result.indexed


def test_both_users_apply_the_one_consume_error_policy() -> None:
    assert (
        streams.event_consumer.usable
        is workers.indexer.usable
        is workers.recommender.usable
        is kafkaio.consumer.usable
    )
    messages = [failed(EOF_ERROR), good(0), failed(TRANSIENT)]
    assert streams_usable(list(messages)) == workers_usable(list(messages)) == [ITEM]
    for user in (streams_usable, workers_usable):
        with pytest.raises(KafkaException):
            user([good(0), failed(FATAL)])


# ---- commits, lag, dead letters ------------------------------------------------------------


class Committer:
    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.calls: list[bool] = []

    def commit(self, *, asynchronous: bool) -> None:
        self.calls.append(asynchronous)
        if self.error is not None:
            raise self.error

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Any]:
        return []

    def close(self) -> None: ...


def test_commit_with_nothing_to_commit_is_fine_and_other_failures_raise() -> None:
    consumer = Committer(KafkaException(KafkaError(KafkaError._NO_OFFSET)))
    commit(consumer, asynchronous=False)
    assert consumer.calls == [False]
    with pytest.raises(KafkaException):
        commit(Committer(KafkaException(KafkaError(KafkaError._TRANSPORT))))


class Positions:
    """Assigned partitions at positions, with cached high watermarks."""

    def __init__(self, positions: dict[tuple[str, int], tuple[int, int]]) -> None:
        self.positions = positions  # (topic, partition) -> (position, high watermark)

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition(t, p) for t, p in self.positions]

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        return [
            TopicPartition(tp.topic, tp.partition, self.positions[tp.topic, tp.partition][0])
            for tp in partitions
        ]

    def get_watermark_offsets(self, tp: TopicPartition, *, cached: bool) -> tuple[int, int]:
        assert cached  # never a broker round trip
        return 0, self.positions[tp.topic, tp.partition][1]


def test_lag_is_summed_per_topic_at_most_every_interval_and_zero_once_unassigned() -> None:
    registry = CollectorRegistry()
    gauge = Gauge("lag_records", "lag", ["topic"], registry=registry)
    consumer = Positions({("a", 0): (3, 10), ("a", 1): (5, 6), ("b", 0): (-1001, 4)})
    reporter = LagReporter(consumer, gauge, interval_s=3600)
    reporter.maybe_report()
    assert registry.get_sample_value("lag_records", {"topic": "a"}) == 8
    assert registry.get_sample_value("lag_records", {"topic": "b"}) == 0  # no position yet
    consumer.positions = {("b", 0): (1, 4)}
    reporter.maybe_report()  # within the interval: nothing
    assert registry.get_sample_value("lag_records", {"topic": "a"}) == 8
    reporter._next = 0.0
    reporter.maybe_report()
    assert registry.get_sample_value("lag_records", {"topic": "a"}) == 0
    assert registry.get_sample_value("lag_records", {"topic": "b"}) == 3


def test_a_dead_letter_carries_input_reason_and_position_and_is_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = CollectorRegistry()
    counter = Counter("dead_letter", "dl", ["stage", "error_type"], registry=registry)
    sink = FakeProducer()
    letters = DeadLetters(sink, topic="dead-letter", stage="test", counter=counter)
    with caplog.at_level(logging.WARNING, logger="kafkaio.dead_letters"):
        letters.send(FakeMessage(TOPIC, b"{not json", b"k", 2, 7), Rejection("malformed_json", "x"))
    ((topic, key, value),) = sink.records
    record = DeadLetter.model_validate_json(value or b"")
    assert (topic, key) == ("dead-letter", b"k")
    assert (record.source_topic, record.partition, record.offset) == (TOPIC, 2, 7)
    assert (record.stage, record.error_type, record.reason) == ("test", "malformed_json", "x")
    assert (
        registry.get_sample_value(
            "dead_letter_total", {"stage": "test", "error_type": "malformed_json"}
        )
        == 1
    )
    assert caplog.records[0].getMessage() == (
        f"dead letter {TOPIC}[2] offset=7 stage=test error_type=malformed_json reason=x"
    )


def test_a_commit_that_failed_is_kept_for_another_try_until_a_later_one_succeeds() -> None:
    from confluent_kafka import KafkaError, TopicPartition

    from kafkaio.consumer import CommitRetry

    retry = CommitRetry()
    failed = KafkaError(KafkaError.REBALANCE_IN_PROGRESS)
    retry.on_commit(failed, [TopicPartition("t", 0, 5), TopicPartition("t", 1, 9)])
    retry.on_commit(None, [TopicPartition("t", 1, 12)])  # a later commit of partition 1 passed
    assert retry.take() == {("t", 0): 5}
    assert retry.take() == {}  # handed out once; a new failure reports them again
    retry.on_commit(failed, [TopicPartition("t", 0, 7), TopicPartition("t", 0, -1001)])
    assert retry.take() == {("t", 0): 7}


class GroupClient:
    """A stand-in for one librdkafka group consumer: records its subscription, serves the
    rebalance callbacks a test fires, answers metadata unless the brokers are away."""

    built: ClassVar[list[GroupClient]] = []

    def __init__(self, brokers_away: list[bool]) -> None:
        self.brokers_away = brokers_away
        self.callbacks: dict[str, Any] = {}
        self.topics: list[str] = []
        self.closed = False
        self.consumed = 0
        GroupClient.built.append(self)

    def subscribe(self, topics: list[str], **callbacks: Any) -> None:
        self.topics, self.callbacks = topics, callbacks

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Any]:
        self.consumed += 1
        return []

    def list_topics(self, topic: str, timeout: float) -> None:
        if self.brokers_away[0]:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT))

    def assignment(self) -> list[str]:
        return ["passed through"]

    def close(self) -> None:
        self.closed = True


def test_a_consumer_stuck_without_partitions_is_renewed_once_the_brokers_answer() -> None:
    now = [0.0]
    away = [False]
    GroupClient.built = []
    heard: list[str] = []
    consumer = kafkaio.consumer.RenewingConsumer(
        lambda: GroupClient(away), renew_after_s=30, clock=lambda: now[0]
    )
    consumer.subscribe(
        ["t"],
        on_assign=lambda c, p: heard.append("assigned"),
        on_lost=lambda c, p: heard.append("lost"),
    )
    first = GroupClient.built[0]
    assert consumer.assignment() == ["passed through"]  # other calls reach the client
    first.callbacks["on_assign"](first, ["t-0"])
    now[0] = 100.0
    consumer.consume(10, timeout=0.1)  # assigned: nothing to renew however long
    assert len(GroupClient.built) == 1

    first.callbacks["on_lost"](first, ["t-0"])
    now[0] = 125.0
    consumer.consume(10, timeout=0.1)
    assert len(GroupClient.built) == 1  # lost 25 s: librdkafka may still rejoin
    away[0] = True
    now[0] = 200.0
    consumer.consume(10, timeout=0.1)
    assert len(GroupClient.built) == 1  # the brokers are away: a new client would not help
    away[0] = False
    consumer.consume(10, timeout=0.1)
    assert len(GroupClient.built) == 2 and first.closed and consumer.renewals == 1
    second = GroupClient.built[1]
    assert second.topics == ["t"] and second.consumed == 1  # subscribed, then consumed
    # The caller's callbacks still hear the new client; a new assignment ends the wait.
    second.callbacks["on_assign"](second, ["t-0"])
    now[0] = 1000.0
    consumer.consume(10, timeout=0.1)
    assert len(GroupClient.built) == 2
    assert heard == ["assigned", "lost", "assigned"]
    # An empty loss (nothing was assigned) is not a stuck client.
    second.callbacks["on_lost"](second, [])
    now[0] = 2000.0
    consumer.consume(10, timeout=0.1)
    assert len(GroupClient.built) == 2
    consumer.close()
    assert second.closed


def test_a_wedged_consumer_is_renewed_on_the_watch_s_word_not_its_own() -> None:
    # A client wedged after a broker pause fails its own metadata requests too: the renewal
    # asks the process's broker watch (another client) whether the brokers answer.
    now = [0.0]
    own_requests_fail = [True]
    watch_hears_them = [False]
    GroupClient.built = []
    consumer = kafkaio.consumer.RenewingConsumer(
        lambda: GroupClient(own_requests_fail),
        renew_after_s=8,
        reachable=lambda: watch_hears_them[0],
        clock=lambda: now[0],
    )
    consumer.subscribe(["t"])
    first = GroupClient.built[0]
    first.callbacks["on_lost"](first, ["t-0"])
    now[0] = 20.0
    consumer.consume(10, timeout=0.1)
    assert len(GroupClient.built) == 1  # the watch does not hear the brokers either
    watch_hears_them[0] = True
    consumer.consume(10, timeout=0.1)
    assert len(GroupClient.built) == 2 and first.closed and consumer.renewals == 1
