"""The recommender's background fitter: what it records, when it fits, that it swaps a
candidate in only when it wins on validation, and that the recommender answers meanwhile."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from relata.runtime.evidence import fold_evidence
from schemas.fit_settings import FitSettings
from schemas.settings import RecommenderSettings
from tests.unit.fitting_fakes import (
    history,
    profile_update,
    ring_histories,
    ring_store,
)
from tests.unit.worker_fakes import FakeConsumer, FakeEncoder, FakeProducer
from workers.client_store import ClientVectorStore
from workers.fitting import ModelBundle
from workers.fitting.history_log import HistoryLog
from workers.fitting.refit import FitJob, ProcessRunner, Refitter, inline_runner, store_items
from workers.metrics import WorkerMetrics
from workers.ranking import BlendWeights
from workers.recommender import Recommender, RecommenderTopics

WEAK = ModelBundle(weights=BlendWeights(popularity=1.0, next_item=0.0, vector=0.0))
SETTINGS = FitSettings(min_users=10, every_updates=50, interval_s=3600)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _sample(metrics: WorkerMetrics, name: str, **labels: str) -> float:
    for family in metrics.fits.collect() + metrics.fit_validation_ndcg.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


@pytest.fixture
def store() -> Iterator[ClientVectorStore]:
    s = ring_store()
    yield s
    s.close()


class Harness:
    """A recommender on fakes, its history log, and a fitter around them."""

    def __init__(self, store: ClientVectorStore, *, runner: Any = inline_runner) -> None:
        self.consumer = FakeConsumer("profile-updates")
        self.producer = FakeProducer()
        self.metrics = WorkerMetrics.create(CollectorRegistry())
        self.log = HistoryLog(1000)
        self.clock = Clock()
        self.recommender = Recommender(
            consumer=self.consumer,
            related_consumer=None,
            producer=self.producer,
            encoder=FakeEncoder(),
            store=store,
            metrics=self.metrics,
            topics=RecommenderTopics("profile-updates", "related-items", "recommendations", "dl"),
            settings=RecommenderSettings(k=5, candidates=10, commit_interval_ms=0),
            model=WEAK,
            on_history=self.log.record,
        )
        self.refitter = Refitter(
            log=self.log,
            settings=SETTINGS,
            current=lambda: self.recommender.model,
            swap=self.recommender.use_model,
            items=lambda ids: store_items(store, ids),
            evidence=fold_evidence,
            metrics=self.metrics,
            runner=runner,
            k=5,
            candidates=10,
            mmr_lambda=0.9,
            clock=self.clock,
        )

    def send(self, histories: dict[str, Any]) -> None:
        for user_id, entries in histories.items():
            self.consumer.add_json(profile_update(user_id, entries), key=user_id)

    def drain(self) -> int:
        answered = 0
        while (result := self.recommender.poll_once()).records:
            answered += result.published
        return answered

    def versions(self) -> list[str]:
        return [r["ranking_version"] for r in self.producer.values("recommendations")]


def test_history_log_keeps_the_latest_history_per_user_lru_and_forgets_erased_users() -> None:
    log = HistoryLog(2)
    log.record("a", history("x"))
    log.record("b", history("y"))
    log.record("a", history("x", "z"))
    log.record("c", history("w"))  # b is the least recently updated: dropped
    assert set(log.snapshot()) == {"a", "c"}
    assert [row[0] for row in log.snapshot()["a"]] == ["z", "x"]
    log.record("a", None)  # erased
    assert set(log.snapshot()) == {"c"}
    assert log.updates == 4


def test_recommender_records_histories_and_erasures(store: ClientVectorStore) -> None:
    h = Harness(store)
    h.send({"u": history("i1", "i2"), "v": history("i3")})
    h.consumer.add(None, b"v")  # v erased
    h.drain()
    assert set(h.log.snapshot()) == {"u"}
    assert h.versions() == [WEAK.version]


def test_a_fit_is_due_after_enough_updates_or_time_with_enough_users(
    store: ClientVectorStore,
) -> None:
    h = Harness(store)
    h.send(dict(list(ring_histories().items())[:9]))
    h.drain()
    assert not h.refitter.due()  # 9 users < min_users
    h.send(dict(list(ring_histories().items())[9:20]))
    h.drain()
    assert not h.refitter.due()  # 20 updates < every_updates, and no time has passed
    h.clock.now = SETTINGS.interval_s
    assert h.refitter.due()
    h.refitter._fitted_updates = h.log.updates  # as after a fit: nothing new since
    assert not h.refitter.due()
    h.send(ring_histories(users=60, seed=1))
    h.drain()
    assert h.refitter.due()  # 60 new updates >= every_updates


def test_a_refit_that_wins_is_swapped_in_and_served(store: ClientVectorStore) -> None:
    h = Harness(store)
    h.send(ring_histories())
    h.drain()
    assert h.refitter.fit_once() == "swapped"
    assert _sample(h.metrics, "relata_fits_total", outcome="swapped") == 1
    candidate = _sample(h.metrics, "relata_fit_validation_ndcg", model="candidate")
    assert candidate > _sample(h.metrics, "relata_fit_validation_ndcg", model="current") > 0
    # Adopted between micro-batches: the next answers carry the new version.
    h.send({"u0": history("i1", "i2", start=10_000)})
    h.drain()
    version = h.versions()[-1]
    assert version.startswith("fit-") and version == h.recommender.model.version
    assert h.recommender.weights.popularity != WEAK.weights.popularity


def test_a_refit_that_loses_keeps_the_serving_model(store: ClientVectorStore) -> None:
    def losing(job: FitJob, stop: threading.Event) -> Any:
        result = inline_runner(job, stop)
        return replace(result, score=result.current_score - 0.01)

    h = Harness(store, runner=losing)
    h.send(ring_histories())
    h.drain()
    assert h.refitter.fit_once() == "kept"
    assert _sample(h.metrics, "relata_fits_total", outcome="kept") == 1
    assert _sample(h.metrics, "relata_fits_total", outcome="swapped") == 0
    h.send({"u0": history("i1", "i2", start=10_000)})
    h.drain()
    assert h.recommender.model is WEAK and h.versions()[-1] == WEAK.version


def test_a_failed_fit_is_counted_and_changes_nothing(store: ClientVectorStore) -> None:
    def failing(job: FitJob, stop: threading.Event) -> Any:
        raise RuntimeError("boom")

    h = Harness(store, runner=failing)
    h.send(ring_histories())
    h.drain()
    assert h.refitter.fit_once() == "failed"
    assert _sample(h.metrics, "relata_fits_total", outcome="failed") == 1
    assert h.recommender.model is WEAK


def test_the_recommender_answers_while_a_refit_runs(store: ClientVectorStore) -> None:
    started, release = threading.Event(), threading.Event()

    def blocked(job: FitJob, stop: threading.Event) -> Any:
        started.set()
        assert release.wait(30)
        return inline_runner(job, stop)

    h = Harness(store, runner=blocked)
    h.send(ring_histories())
    h.drain()
    h.clock.now = SETTINGS.interval_s
    stop = threading.Event()
    fitter = threading.Thread(target=h.refitter.run, args=(stop,), daemon=True)
    h.refitter.poll_s = 0.01
    fitter.start()
    try:
        assert started.wait(30)
        # The fit is running: batches are still answered, with the serving model.
        for n in range(3):
            h.send({f"w{n}": history("i1", "i2", start=20_000 + n)})
            assert h.drain() == 1
        assert h.versions()[-3:] == [WEAK.version] * 3
        release.set()
        for _ in range(3000):
            if _sample(h.metrics, "relata_fits_total", outcome="swapped"):
                break
            threading.Event().wait(0.01)
        h.send({"late": history("i1", "i2", start=30_000)})
        h.drain()
        assert h.versions()[-1].startswith("fit-")
    finally:
        release.set()
        stop.set()
        fitter.join(10)
    assert not fitter.is_alive()


def test_the_process_runner_fits_in_a_child_process(store: ClientVectorStore) -> None:
    h = Harness(store, runner=ProcessRunner(threads=1, nice=0))
    h.send(ring_histories())
    h.drain()
    assert h.refitter.fit_once() == "swapped"
    assert h.recommender._next_model is not None
    assert h.recommender._next_model.version.startswith("fit-")


def test_the_process_runner_is_abandoned_when_the_workers_stop(
    store: ClientVectorStore,
) -> None:
    stop = threading.Event()
    stop.set()
    h = Harness(store, runner=ProcessRunner(threads=1, nice=0, poll_s=0.05))
    h.send(ring_histories())
    h.drain()
    h.refitter.stop = stop
    assert h.refitter.fit_once() == "stopped"
    assert h.recommender.model is WEAK


def test_the_winner_is_saved_and_read_back_under_its_version(
    store: ClientVectorStore, tmp_path: Any
) -> None:
    from relata.cli.run_workers import starting_model

    path = tmp_path / "model.json"
    h = Harness(store)
    h.refitter.settings = SETTINGS.model_copy(update={"model_path": path})
    h.send(ring_histories())
    h.drain()
    assert h.refitter.fit_once() == "swapped"
    assert h.recommender._next_model is not None
    restarted = starting_model(RecommenderSettings(), FitSettings(model_path=path))
    assert restarted.version == h.recommender._next_model.version
