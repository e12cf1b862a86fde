"""Erasing a user: the request is forwarded into the user's event stream, and the owner of
their partition removes the profile (changelog tombstone), tells the recommender (a
profile-updates tombstone, turned into a recommendations tombstone) and audits it without
personal data; a later event starts a new profile."""

from __future__ import annotations

import json
from pathlib import Path

from relata.runtime.replay import erasure_request
from schemas.messages import ErasureAudit
from schemas.topics import BEHAVIOR_EVENTS, ERASURE_AUDIT, PROFILE_UPDATES
from streams.erasure import CONTROL_HEADER, ERASE, is_erasure
from streams.records import Record
from tests.unit.test_streams_app import (
    RecordingSender,
    encode,
    event,
    make_streams,
    records_of,
    run_async,
)


def _forwarded(user: str, request_id: str = "req-1") -> Record:
    """An erasure request as the forwarder writes it into behavior-events."""
    request = erasure_request(user, request_id)
    return Record(
        key=user.encode(),
        value=request.model_dump_json().encode(),
        topic="behavior-events",
        partition=0,
        offset=0,
        timestamp_s=0.0,
        headers=((CONTROL_HEADER, ERASE),),
    )


@run_async
async def test_the_forwarder_puts_valid_requests_into_the_users_event_stream(
    tmp_path: Path,
) -> None:
    sender = RecordingSender()
    streams = make_streams(tmp_path, sender)
    forwarder = streams.erasure_forwarder
    assert forwarder is not None
    good = erasure_request("u1", "req-1").model_dump_json().encode()
    records = [
        Record(b"u1", good, "erasure-requests", 0, 0, 0.0),
        Record(b"u2", good, "erasure-requests", 0, 1, 0.0),  # key is not the user
        Record(b"u3", b"{not json", "erasure-requests", 0, 2, 0.0),
    ]
    await forwarder.handle_requests(records)
    events_topic = streams.topic_names[BEHAVIOR_EVENTS.name]
    assert sender.values(events_topic) and len(sender.values(events_topic)) == 1
    assert sender.headers == [(events_topic, [(CONTROL_HEADER, ERASE)])]
    dead = [json.loads(v) for v in sender.values(streams.topic_names["dead-letter"])]
    assert [(d["offset"], d["error_type"]) for d in dead] == [
        (1, "invalid_fields"),
        (2, "malformed_json"),
    ]


@run_async
async def test_an_erased_user_loses_profile_and_list_and_starts_anew(tmp_path: Path) -> None:
    sender = RecordingSender()
    streams = make_streams(tmp_path, sender, batch_max_events=10)
    agent, profiles = streams.profile_agent, streams.profiles
    assert agent is not None and profiles is not None
    profiles.open(0)
    before = records_of([(b"u1", encode(event(1))), (b"u2", encode(event(2, user="u2")))])
    after = records_of([(b"u1", encode(event(3, item="i2")))])
    # One batch: u1's event, u2's, the erasure of u1, then a new event of u1.
    batch = [*before, _forwarded("u1"), *after]
    assert [is_erasure(r) for r in batch] == [False, False, True, False]
    await agent.handle_events(batch)

    changelog = profiles.changelog_topic
    assert (changelog, json.dumps("u1").encode()) in sender.tombstones
    updates_topic = streams.topic_names[PROFILE_UPDATES.name]
    assert (updates_topic, b"u1") in sender.tombstones
    # The new event folded into a fresh profile: only it, none of the erased history.
    stored = profiles.get(0, "u1")
    assert stored is not None
    profile = json.loads(stored)
    assert [h["item_id"] for h in profile["history"]] == ["i2"]
    assert profile["recent_event_ids"] == ["e3"]
    assert profiles.get(0, "u2") is not None  # nobody else is touched
    # Its tombstone comes before the new update (one topic, one key: order is kept).
    order = [(t, k) for t, k in sender.partitions if t == updates_topic]
    assert len(order) >= 2
    (audit_raw,) = sender.values(streams.topic_names[ERASURE_AUDIT.name])
    audit = ErasureAudit.model_validate_json(audit_raw)
    assert audit.request_id == "req-1" and audit.profile_found
    assert b"u1" not in audit_raw  # no personal data in the audit
    assert streams.registry.get_sample_value("relata_erasures_total") == 1


@run_async
async def test_erasing_an_unknown_user_is_harmless_and_audited(tmp_path: Path) -> None:
    sender = RecordingSender()
    streams = make_streams(tmp_path, sender)
    agent, profiles = streams.profile_agent, streams.profiles
    assert agent is not None and profiles is not None
    profiles.open(0)
    await agent.handle_events([_forwarded("nobody", "req-9")])
    (audit_raw,) = sender.values(streams.topic_names[ERASURE_AUDIT.name])
    assert not ErasureAudit.model_validate_json(audit_raw).profile_found
