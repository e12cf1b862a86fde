"""Fault test: kill -9 of the encoder workers (indexer + recommender) mid-replay, then a restart.

The stream processor's two roles and `relata workers --role all` (the real MiniLM encoder, the
embedded vector store) run as subprocesses on the embedded broker. A catalog of the items that
the replayed events touch is indexed, a slice of the online-retail events replayed, the workers
killed (SIGKILL) at a seeded random moment and started again (they load the model again and
resume from their committed offsets, on the same store directory). Once the recommender has
drained the profile updates, every user whose profile changed has a recommendation on
`recommendations` whose trigger ids hold the last event of their last profile update, and
every process is up.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest

from relata.runtime.probes import LagMonitor
from relata.runtime.replay import make_producer, publish_catalog
from relata.runtime.topics import ensure_topics
from schemas.messages import ProfileUpdate, Recommendation
from schemas.settings import KafkaSettings
from schemas.topics import ALL_TOPICS, ITEM_CATALOG, PROFILE_UPDATES, RECOMMENDATIONS
from tests.faults.helpers import (
    BackgroundReplay,
    Roles,
    catalog_lines,
    event_lines,
    read_topic,
    replay_warm_up,
    report,
    wait_drained,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EVENTS = 800
RATE = 100.0  # events/s: an 8 s replay
WARM_UP = 50  # events replayed (and recommended for) before the kill clock starts
SEED = 20_103
# The recommender commits its offsets rarely here, so that the kill re-delivers updates.
COMMIT_INTERVAL_MS = 3000


def recommendations(kafka: KafkaSettings) -> list[tuple[int, Recommendation]]:
    return [
        (offset, Recommendation.model_validate_json(value))
        for offset, _, value in read_topic(kafka, kafka.topic(RECOMMENDATIONS.name))
        if value is not None
    ]


def profile_updates(kafka: KafkaSettings) -> list[tuple[int, ProfileUpdate]]:
    return [
        (offset, ProfileUpdate.model_validate_json(value or b""))
        for offset, _, value in read_topic(kafka, kafka.topic(PROFILE_UPDATES.name))
    ]


def answered_to(kafka: KafkaSettings) -> int:
    """The last profile-update offset whose last event a recommendation names."""
    triggers = {e for _, rec in recommendations(kafka) for e in rec.trigger_event_ids}
    answered = [o for o, u in profile_updates(kafka) if u.trigger_event_ids[-1] in triggers]
    return max([-1, *answered])


def test_kill_workers_mid_replay_restart_recommends_every_changed_user(
    kafka: KafkaSettings, unique_id: str, tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    ensure_topics(kafka, ALL_TOPICS)
    lines = event_lines(EVENTS)
    touched = set()
    for _, raw in lines:
        try:
            touched.add(json.loads(raw)["item_id"])
        except (ValueError, KeyError, TypeError):
            continue
    # Only the items the events touch: the workers index (encode) fewer items, so start sooner.
    catalog = [(n, raw) for n, raw in catalog_lines() if json.loads(raw)["item_id"] in touched]
    publish_catalog(catalog, producer=make_producer(kafka), topic=kafka.topic(ITEM_CATALOG.name))

    roles = Roles(
        kafka,
        tmp_path,
        f"faults-{unique_id}",
        {"workers": {"RELATA_RECOMMENDER_COMMIT_INTERVAL_MS": str(COMMIT_INTERVAL_MS)}},
    )
    lag = LagMonitor(kafka)
    replay: BackgroundReplay | None = None
    try:
        roles.start("workers")
        roles.start("profiles")
        roles.start("associations")
        roles.wait_ready("profiles", lag)
        roles.wait_ready("associations", lag)
        first_ready = roles.wait_ready("workers", lag)

        def recommended_some() -> bool:
            roles.check()
            return bool(read_topic(kafka, kafka.topic(RECOMMENDATIONS.name)))

        producer = replay_warm_up(kafka, lines[:WARM_UP], RATE, recommended_some)
        replay = BackgroundReplay(kafka, lines[WARM_UP:], RATE, producer)
        kill_after = rng.uniform(0.2, 0.8) * (EVENTS - WARM_UP) / RATE
        time.sleep(kill_after)
        roles.kill("workers")
        updates_topic = kafka.topic(PROFILE_UPDATES.name)
        committed = lag.committed(roles.recommender_group, updates_topic).get(0, 0)
        handled_to = answered_to(kafka)
        time.sleep(rng.uniform(0.0, 2.0))
        restarted = time.monotonic()
        roles.start("workers")
        replay.join(EVENTS / RATE + 120)
        wait_drained(roles, lag, recommender=True)
        roles.wait_ready("workers", lag)
        recovery = time.monotonic() - restarted
        redelivered = handled_to + 1 - committed
        report(
            "workers kill -9",
            events=EVENTS,
            items=len(catalog),
            first_ready_s=first_ready,
            kill_at_s=kill_after,
            kill_at_update=handled_to,
            re_delivered_updates=redelivered,
            recovery_s=recovery,
        )

        # Every user whose profile changed: a recommendation naming their last folded event.
        last_event = {u.user_id: u.trigger_event_ids[-1] for _, u in profile_updates(kafka)}
        assert last_event, "no profile updates: nothing was exercised"
        covered: dict[str, set[str]] = {}
        for _, rec in recommendations(kafka):
            covered.setdefault(rec.user_id, set()).update(rec.trigger_event_ids)
        unanswered = [u for u, e in last_event.items() if e not in covered.get(u, set())]
        assert not unanswered, (
            f"{len(unanswered)} of {len(last_event)} users without a recommendation for their "
            f"last event, e.g. {unanswered[:5]}; updates re-delivered after the kill: {redelivered}"
        )
        roles.assert_up("workers", "profiles", "associations")
    finally:
        if replay is not None:
            replay.thread.join(5)
        roles.stop()
        lag.close()
