"""Fault test: kill -9 of the association role mid-replay, then a restart.

The stream processor's two roles run as `relata streams` subprocesses on the embedded broker;
a slice of the online-retail events is replayed, the association role is killed (SIGKILL) at
a seeded random moment and started again. Once everything is drained, its statistics (item
records and totals read back from the tables' changelogs, related items over HTTP) must equal
a clean run of the same events through the pure cores (profile fold, then association fold),
every input counted once and none lost; every item with a related list must have one
published; the profiles role must have folded every event once and both roles be up. The
association role commits its input offsets rarely here, so the kill re-delivers inputs that
it had already folded: the test checks that it did.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from relata.runtime.probes import LagMonitor
from relata.runtime.replay import make_producer, publish_catalog
from relata.runtime.topics import ensure_topics
from schemas.messages import RelatedItems
from schemas.settings import KafkaSettings, StreamsSettings
from schemas.topics import ALL_TOPICS, ITEM_CATALOG, RELATED_ITEMS
from streams.associations_agent import TOTALS_KEY
from streams.profile import FoldConfig
from tests.faults.helpers import (
    BackgroundReplay,
    Roles,
    assert_associations_equal,
    catalog_lines,
    clean_associations,
    clean_run,
    close,
    dead_letters,
    event_lines,
    folded_event_ids,
    get_json,
    latest,
    read_topic,
    replay_and_kill,
    report,
    restart_and_drain,
    sent_inputs,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EVENTS = 3000
RATE = 250.0  # events/s: a 12 s replay
WARM_UP = 250  # events replayed before the kill clock starts
SEED = 20_101
# The association role folds in short windows and commits rarely, so that a kill lands
# between windows' changelog records and their offsets' commit: folded inputs come again.
ASSOC_WINDOW_S = 0.5
ASSOC_COMMIT_INTERVAL_S = 4.0


def test_kill_association_role_mid_replay_restart_equals_clean_fold(
    kafka: KafkaSettings, unique_id: str, tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    ensure_topics(kafka, ALL_TOPICS)
    publish_catalog(
        catalog_lines(), producer=make_producer(kafka), topic=kafka.topic(ITEM_CATALOG.name)
    )
    lines = event_lines(EVENTS)

    roles = Roles(
        kafka,
        tmp_path,
        f"faults-{unique_id}",
        {
            "associations": {
                "RELATA_STREAMS_ASSOC_BATCH_WINDOW_S": str(ASSOC_WINDOW_S),
                "RELATA_STREAMS_COMMIT_INTERVAL_S": str(ASSOC_COMMIT_INTERVAL_S),
            }
        },
    )
    lag = LagMonitor(kafka)
    replay: BackgroundReplay | None = None
    try:
        # kill -9 the association role at a seeded moment of the replay, once it has folded some.
        replay, kill_after = replay_and_kill(
            roles,
            lag,
            lines,
            role="associations",
            folded_topic=roles.totals_changelog,
            rng=rng,
            warm_up=WARM_UP,
            rate=RATE,
        )
        # Folded before the kill (the totals record holds the last event folded into it: the
        # association-input message that carried it) against committed: the messages in
        # between come again after the restart.
        totals = latest(read_topic(kafka, roles.totals_changelog)).get(TOTALS_KEY)
        last_event = None if totals is None else totals["totals"]["applied"]["e0"]
        folded_to = max(
            [-1]
            + [
                offset
                for offset, _, value in read_topic(kafka, roles.association_input)
                if any(data["source"] == [0, last_event] for data in json.loads(value or b"[]"))
            ]
        )
        committed = lag.committed(roles.associations_group, roles.association_input).get(0, 0)
        recovery = restart_and_drain(
            roles, lag, replay, role="associations", rng=rng, join_timeout_s=EVENTS / RATE + 120
        )
        redelivered = folded_to + 1 - committed
        report(
            "association role kill -9",
            events=EVENTS,
            kill_at_s=kill_after,
            re_delivered_inputs=redelivered,
            recovery_s=recovery,
        )
        assert folded_to >= committed, (
            f"the kill came before any association input was folded past the committed offset "
            f"(folded to {folded_to}, committed {committed}): no re-delivery was exercised"
        )

        # A clean run of the same events in the pure cores: the profile fold, one event at a
        # time, then the association fold; the profiles role sent exactly those inputs.
        settings = StreamsSettings(app_id=roles.app_id)
        expected_inputs = clean_run(kafka, lines, FoldConfig.from_settings(settings)).inputs
        assert sent_inputs(roles) == [inp.to_dict() for inp in expected_inputs]
        clean = clean_associations(settings, expected_inputs)
        assert_associations_equal(
            roles, clean, f"messages re-delivered after the kill: {redelivered}"
        )

        # Served: the related items of the busiest items over HTTP equal the clean fold's.
        port = roles.ports["associations"]
        busiest = sorted(
            clean.items,
            key=lambda i: -len(clean.items[i]["partners"].get("bought_together", {})),
        )[:5]
        for item_id in busiest:
            body = get_json(
                f"http://127.0.0.1:{port}/items/{item_id}/related?kind=bought_together&k=50"
            )
            expected = clean.related(item_id, now=clean.last_ts, kinds=["bought_together"])
            assert expected is not None
            assert close(body["item_count"], expected.item_count)
            assert [(r["item_id"], r["evidence"]["support"]) for r in body["related"]] == [
                (r.item_id, r.evidence.support) for r in expected.related[:50]
            ]

        # Republished: every item with a related list in the clean fold has one on the topic.
        published = {
            RelatedItems.model_validate_json(value).item_id
            for _, _, value in read_topic(kafka, kafka.topic(RELATED_ITEMS.name))
            if value is not None
        }
        listed = {
            item_id
            for item_id in clean.items
            if (related := clean.related(item_id, now=clean.last_ts)) is not None
            and related.related
        }
        assert listed <= published, f"{len(listed - published)} lists never republished"

        # The profiles role: up, and every event folded exactly once or dead-lettered.
        folded = folded_event_ids(kafka)
        assert not [e for e, n in folded.items() if n > 1], "events folded twice"
        dead = dead_letters(kafka)
        assert len(folded) + len(dead) == EVENTS, (len(folded), Counter(d.error_type for d in dead))
        roles.assert_up("profiles", "associations")
    finally:
        if replay is not None:
            replay.thread.join(5)
        roles.stop()
        lag.close()
