"""Fault test: kill -9 of the profiles role mid-replay, then a restart.

The stream processor's two roles run as `relata streams` subprocesses on the embedded broker;
a slice of the online-retail events is replayed, the profiles role is killed (SIGKILL) at a
seeded random moment and started again. It commits its event offsets rarely here, so the
kill re-delivers events that it had already folded, which its de-duplication by event id must
skip. Once everything is drained:

- the profiles table (its changelog, latest record per user) equals a clean run of the same
  events through `streams.profile.fold_event`: the same users, history item ids in order,
  weights (relative 1e-9) and counts: every valid event folded exactly once;
- every line that a clean run rejects (undecodable, unknown item) has a dead letter;
- the association statistics equal a clean association fold, and both roles are up.

The kill may come after a batch's outputs were acknowledged and before its changelog
records were: the restarted role folds those events again and sends the same association
inputs again. Inputs name their source event, so the association role folds each once; the
test requires every copy to equal the first input of its event and the statistics to equal
the clean run's exactly.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from relata.runtime.probes import LagMonitor
from relata.runtime.replay import make_producer, publish_catalog
from relata.runtime.topics import ensure_topics
from schemas.settings import KafkaSettings, StreamsSettings
from schemas.topics import ALL_TOPICS, BEHAVIOR_EVENTS, ITEM_CATALOG
from streams.profile import FoldConfig
from tests.faults.helpers import (
    BackgroundReplay,
    Roles,
    assert_associations_equal,
    catalog_lines,
    clean_associations,
    clean_run,
    dead_letters,
    event_lines,
    folded_event_ids,
    latest,
    profile_differences,
    read_topic,
    replay_and_kill,
    report,
    resent,
    restart_and_drain,
    sent_inputs,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EVENTS = 3000
RATE = 250.0  # events/s: a 12 s replay
WARM_UP = 250  # events replayed before the kill clock starts
SEED = 20_102
# The profiles role commits its event offsets rarely, so that the kill lands between folded
# batches' changelog records and their offsets' commit: folded events come again.
COMMIT_INTERVAL_S = 4.0


def processed_to(kafka: KafkaSettings, offsets: dict[str, int]) -> int:
    """The last event offset that the profiles role handled (folded or dead-lettered)."""
    folded = [offsets[event_id] for event_id in folded_event_ids(kafka) if event_id in offsets]
    dead = [
        d.offset for d in dead_letters(kafka) if d.source_topic == kafka.topic(BEHAVIOR_EVENTS.name)
    ]
    return max([-1, *folded, *dead])


def test_kill_profiles_role_mid_replay_restart_folds_every_event_once(
    kafka: KafkaSettings, unique_id: str, tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    ensure_topics(kafka, ALL_TOPICS)
    publish_catalog(
        catalog_lines(), producer=make_producer(kafka), topic=kafka.topic(ITEM_CATALOG.name)
    )
    lines = event_lines(EVENTS)
    # One partition, replayed in order: a line's offset is its index.
    offsets: dict[str, int] = {}
    for offset, (_, raw) in enumerate(lines):
        offsets.setdefault(_event_id(raw), offset)

    roles = Roles(
        kafka,
        tmp_path,
        f"faults-{unique_id}",
        {"profiles": {"RELATA_STREAMS_COMMIT_INTERVAL_S": str(COMMIT_INTERVAL_S)}},
    )
    lag = LagMonitor(kafka)
    replay: BackgroundReplay | None = None
    try:
        replay, kill_after = replay_and_kill(
            roles,
            lag,
            lines,
            role="profiles",
            folded_topic=roles.profiles_changelog,
            rng=rng,
            warm_up=WARM_UP,
            rate=RATE,
        )
        events_topic = kafka.topic(BEHAVIOR_EVENTS.name)
        committed = lag.committed(roles.events_group, events_topic).get(0, 0)
        handled_to = processed_to(kafka, offsets)
        recovery = restart_and_drain(
            roles, lag, replay, role="profiles", rng=rng, join_timeout_s=EVENTS / RATE + 120
        )

        settings = StreamsSettings(app_id=roles.app_id)
        clean = clean_run(kafka, lines, FoldConfig.from_settings(settings))
        expected = [inp.to_dict() for inp in clean.inputs]
        copies = resent(sent_inputs(roles), expected)
        redelivered = handled_to + 1 - committed
        report(
            "profiles role kill -9",
            events=EVENTS,
            kill_at_s=kill_after,
            kill_at_offset=handled_to,
            re_delivered_events=redelivered,
            recovery_s=recovery,
            re_sent_association_inputs=copies,
        )
        assert handled_to >= committed, (
            f"the kill came before any event was handled past the committed offset "
            f"(handled to {handled_to}, committed {committed}): no re-delivery was exercised"
        )

        # Every valid event folded exactly once into the profiles.
        live = latest(read_topic(kafka, roles.profiles_changelog))
        differ = profile_differences(live, clean.profiles)
        assert not differ, (
            f"profiles differ from a clean fold: {dict(differ)}; "
            f"events re-delivered after the kill: {redelivered}"
        )
        # No dead letter missing (a re-delivered invalid line may have two).
        dead = {d.offset for d in dead_letters(kafka) if d.source_topic == events_topic}
        missing = sorted(set(clean.rejected) - dead)
        assert not missing, f"invalid lines without a dead letter (offsets): {missing[:10]}"

        # The association statistics: exactly a clean fold of the clean run's inputs.
        associations = clean_associations(settings, clean.inputs)
        assert_associations_equal(
            roles, associations, f"association inputs sent again after the kill: {copies}"
        )
        roles.assert_up("profiles", "associations")
    finally:
        if replay is not None:
            replay.thread.join(5)
        roles.stop()
        lag.close()


def _event_id(raw: bytes) -> str:
    """The event id of a replayed line, or a placeholder for a line without one."""
    try:
        return str(json.loads(raw)["event_id"])
    except (ValueError, KeyError, TypeError):
        return f"<no id: {raw[:40]!r}>"


def test_kill_resent_inputs_must_copy_their_first_and_nothing_else_may_differ() -> None:
    """The profiles kill test's check of the inputs sent: copies of earlier inputs of the same
    source event are counted; a lost, changed or extra input fails."""

    def inp(offset: int, item: str = "i") -> dict[str, object]:
        return {"item_id": item, "source": [0, offset]}

    clean = [inp(n) for n in range(6)]
    assert resent(clean, clean) == 0
    assert resent(clean[:4] + clean[2:4] + clean[4:], clean) == 2
    assert resent([*clean[:4], clean[1], *clean[4:]], clean) == 1
    for wrong in (
        clean[:3] + clean[4:],  # lost
        [*clean[:4], inp(2, "other"), *clean[4:]],  # a copy that differs
        [*clean, inp(9)],  # one the clean run never sent
        [clean[1], clean[0], *clean[2:]],  # out of order
    ):
        with pytest.raises(AssertionError):
            resent(wrong, clean)
