"""The workers composition root: loop threads, crash propagation, shutdown order."""

from __future__ import annotations

import threading

import pytest

from relata.cli.run_workers import Workers


class _Closable:
    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name = log, name

    def close(self) -> None:
        self.log.append(self.name)


def test_loops_run_until_stopped_and_close_in_order() -> None:
    log: list[str] = []
    started = threading.Barrier(3)

    def loop(stop: threading.Event) -> None:
        started.wait(5)
        stop.wait(5)

    workers = Workers(
        loops=[("a", loop), ("b", loop)],
        encoder=_Closable(log, "encoder"),
        store=_Closable(log, "store"),
        closers=[lambda: log.append("consumer")],
    )
    stop = threading.Event()
    runner = threading.Thread(target=workers.run, args=(stop,))
    runner.start()
    started.wait(5)
    stop.set()
    runner.join(5)
    assert not runner.is_alive()
    workers.close()
    assert log == ["consumer", "store", "encoder"]


def test_a_crashed_loop_stops_the_others_and_is_raised() -> None:
    stopped = threading.Event()

    def crash(stop: threading.Event) -> None:
        raise ValueError("boom")

    def wait(stop: threading.Event) -> None:
        stop.wait(10)
        stopped.set()

    log: list[str] = []
    workers = Workers(
        loops=[("crash", crash), ("wait", wait)],
        encoder=_Closable(log, "encoder"),
        store=_Closable(log, "store"),
    )
    workers.watches["crash"] = workers.health.loop("crash")
    with pytest.raises(RuntimeError, match="boom"):
        workers.run(threading.Event())
    assert stopped.is_set()
    # The probes say so until the process is gone: not live, not ready.
    report = workers.health.report()
    assert not report.live and not report.ready
    assert any("crash: stopped (ValueError: boom)" in p for p in report.problems)


def test_subscribing_watches_lost_partitions_until_the_next_assignment() -> None:
    from kafkaio.health import LoopWatch
    from relata.cli.run_workers import subscribe_watched

    class Consumer:
        def subscribe(self, topics: list[str], **callbacks: object) -> None:
            self.topics, self.callbacks = topics, callbacks

    consumer, watch = Consumer(), LoopWatch("recommender")
    subscribe_watched(consumer, "profile-updates", watch)
    assert consumer.topics == ["profile-updates"]
    consumer.callbacks["on_lost"](consumer, [object()])  # type: ignore[operator]
    assert watch.lost_since is not None
    consumer.callbacks["on_assign"](consumer, [])  # type: ignore[operator]
    assert watch.lost_since is None


def test_close_carries_on_after_an_error() -> None:
    log: list[str] = []

    def failing() -> None:
        raise OSError("already closed")

    workers = Workers(
        loops=[],
        encoder=_Closable(log, "encoder"),
        store=_Closable(log, "store"),
        closers=[failing],
    )
    workers.close()
    assert log == ["store", "encoder"]


def test_the_recommender_holding_partition_zero_leads() -> None:
    from confluent_kafka import TopicPartition

    from relata.cli.run_workers import holds_partition

    class Assigned:
        def __init__(self, *partitions: int) -> None:
            self.partitions = [TopicPartition("profile-updates", p) for p in partitions]

        def assignment(self) -> list[TopicPartition]:
            return self.partitions

    assert holds_partition(Assigned(0, 2), 0)
    assert not holds_partition(Assigned(1, 2), 0)
    assert not holds_partition(Assigned(), 0)  # not assigned yet, or between rebalances


class _Subscriber:
    def __init__(self) -> None:
        self.topics: list[str] = []

    def subscribe(self, topics: list[str], **callbacks: object) -> None:
        self.topics = list(topics)
        assert {"on_assign", "on_revoke", "on_lost"} <= set(callbacks)

    def list_topics(self, topic: str, timeout: float) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.mark.parametrize("with_shadow", [True, False])
def test_live_quality_reads_the_events_and_the_lists_range_assigned_without_a_model(
    monkeypatch: pytest.MonkeyPatch, with_shadow: bool
) -> None:
    """The range assignor gives one member the same partitions of each co-partitioned topic;
    the shadow's lists are read only where a shadow runs; no encoder, no store."""
    from prometheus_client import CollectorRegistry

    import relata.cli.run_workers as run_workers
    from schemas.quality_settings import QualitySettings, ShadowSettings
    from schemas.settings import (
        EncoderSettings,
        IndexerSettings,
        KafkaSettings,
        RecommenderSettings,
        StoreSettings,
    )

    consumer = _Subscriber()
    built: dict[str, object] = {}

    def build_consumer(kafka: KafkaSettings, **kwargs: object) -> _Subscriber:
        built.update(kwargs)
        return consumer

    monkeypatch.setattr(run_workers, "build_consumer", build_consumer)
    workers = run_workers.build_workers(
        "quality",
        kafka=KafkaSettings(topic_prefix="p."),
        encoder_settings=EncoderSettings(),
        store_settings=StoreSettings(),
        indexer_settings=IndexerSettings(),
        recommender_settings=RecommenderSettings(),
        registry=CollectorRegistry(),
        shadow=ShadowSettings(enabled=with_shadow),
        quality=QualitySettings(group_id="q"),
    )
    assert built["group_id"] == "q"
    assert built["extra"] == {
        "partition.assignment.strategy": "range",
        "auto.offset.reset": "latest",
    }
    expected = ["p.behavior-events", "p.recommendations"]
    assert consumer.topics == expected + (["p.recommendations-shadow"] if with_shadow else [])
    assert [name for name, _ in workers.loops] == ["quality"]
    assert workers.encoder is None and workers.store is None
    workers.close()
