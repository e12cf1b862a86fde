"""Schemas: round trips, fuzzing of the decoder, classification of bad input, drift, settings."""

from __future__ import annotations

import base64
import json
import typing
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from relata.cli.schema_export import DEFAULT_DIR, render_all
from schemas import vocabulary
from schemas.decoding import Rejection, dead_letter, decode
from schemas.messages import (
    BehaviorEvent,
    CandidatePool,
    CatalogItem,
    DeadLetter,
    DeadLetterError,
    Evidence,
    Fallback,
    HistoryEntry,
    ItemAttributes,
    ProfileUpdate,
    Reason,
    Recommendation,
    RecommendedItem,
    RelatedItem,
    RelatedItems,
    UserProfile,
)
from schemas.settings import KafkaSettings, StoreSettings, StreamsSettings
from schemas.topics import ALL_TOPICS

ids = st.from_regex(r"\A[A-Za-z0-9_\-:.]{1,40}\Z")
aware = st.datetimes(
    min_value=datetime(1995, 1, 1), max_value=datetime(2030, 1, 1), timezones=st.just(UTC)
)
text = st.text(max_size=80)
# Catalog texts: anything printable, tabs and line breaks (other controls are refused).
catalog_text = st.text(
    st.characters(blacklist_categories=("Cs", "Cc")) | st.sampled_from("\t\n\r"), max_size=80
)

events = st.builds(
    BehaviorEvent,
    event_id=ids,
    user_id=ids,
    item_id=ids,
    event_type=st.sampled_from(vocabulary.event_types()),
    ts=st.datetimes(
        min_value=datetime(1995, 1, 1), max_value=datetime(2025, 1, 1), timezones=st.just(UTC)
    ),
    session_id=st.none() | ids,
    quantity=st.none() | st.integers(1, 1000),
)
items = st.builds(
    CatalogItem,
    item_id=ids,
    title=st.none() | catalog_text,
    categories=st.lists(catalog_text, max_size=5),
    brand=st.none() | catalog_text,
    price=st.none() | st.floats(0, 1e6, allow_nan=False, allow_infinity=False),
    description=st.none() | catalog_text,
    available=st.booleans(),
)

finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)
history_entries = st.builds(
    HistoryEntry,
    item_id=ids,
    weight=finite,
    last_event_type=st.sampled_from(vocabulary.event_types()),
    last_ts=aware,
    count=st.integers(1, 10_000),
)
evidence = st.builds(
    Evidence,
    support=st.none() | st.integers(0, 10**6),
    confidence=st.none() | st.floats(0, 1),
    lift=st.none() | st.floats(0, 1e4),
    pmi=st.none() | finite,
    cosine=st.none() | st.floats(-1, 1),
    text=text,
)
related = st.builds(
    RelatedItems,
    item_id=ids,
    item_count=st.floats(0, 1e6),
    updated_at=aware,
    related=st.lists(
        st.builds(
            RelatedItem,
            item_id=ids,
            kind=st.sampled_from(vocabulary.relation_kinds()),
            score=finite,
            evidence=evidence,
        ),
        max_size=5,
    ),
)
reasons = st.builds(
    Reason,
    source_item_id=st.none() | ids,
    kind=st.sampled_from(vocabulary.reason_kinds()),
    strength=finite,
    text=text,
    support=st.none() | st.integers(min_value=0, max_value=10**9),
    confidence=st.none() | st.floats(min_value=0, max_value=1),
    lift=st.none() | st.floats(min_value=0, max_value=1e6),
    pmi=st.none() | finite,
    cosine=st.none() | st.floats(min_value=-1, max_value=1),
    item_count=st.none() | st.floats(min_value=0, max_value=1e9),
)
recommended_items = st.builds(
    RecommendedItem,
    item_id=ids,
    score=finite,
    reasons=st.lists(reasons, min_size=1, max_size=3),
)


@st.composite
def pools(draw: st.DrawFn, listed: list[RecommendedItem]) -> CandidatePool:
    """A candidate pool that aligns with a list of `listed` items (other items)."""
    taken = {item.item_id for item in listed}
    following = draw(
        st.lists(
            recommended_items.filter(lambda i: i.item_id not in taken),
            max_size=4,
            unique_by=lambda i: i.item_id,
        )
    )
    n = len(listed) + len(following)
    attributes = st.builds(
        ItemAttributes,
        categories=st.lists(text, max_size=3),
        brand=st.none() | text,
        price=st.none() | st.floats(0, 1e6),
    )
    sims = draw(st.binary(min_size=n * (n - 1) // 2, max_size=n * (n - 1) // 2))
    return CandidatePool(
        items=following,
        attributes=draw(st.lists(attributes, min_size=n, max_size=n)),
        similarities=base64.b64encode(sims).decode(),
        mmr_lambda=draw(st.floats(0, 1)),
    )


recommendations = st.builds(
    Recommendation,
    user_id=ids,
    generated_at=aware,
    model_name=text,
    model_version=text,
    strategy=text,
    trigger_event_ids=st.lists(ids, min_size=1, max_size=4),
    latency_ms=st.floats(0, 1e6),
    items=st.lists(recommended_items, max_size=5),
)


@st.composite
def pooled_recommendations(draw: st.DrawFn) -> Recommendation:
    """Recommendations with a pool and fallbacks, as the recommender publishes them."""
    rec = draw(recommendations)
    listed = list({item.item_id: item for item in rec.items}.values())  # each item once
    return Recommendation.model_validate(
        {
            **dict(rec),
            "items": listed,
            "pool": draw(pools(listed)),
            "fallbacks": draw(st.lists(st.sampled_from(typing.get_args(Fallback)), max_size=2)),
        }
    )


profile_updates = st.builds(
    ProfileUpdate,
    user_id=ids,
    history=st.lists(history_entries, max_size=5),
    last_event_type=st.sampled_from(vocabulary.event_types()),
    last_item_id=ids,
    trigger_event_ids=st.lists(ids, min_size=1, max_size=4),
    source_ts_ms=st.integers(0, 2**42),
    updated_at=aware,
)
user_profiles = st.builds(
    UserProfile,
    user_id=ids,
    history=st.lists(history_entries, max_size=5),
    recent_event_ids=st.lists(ids, max_size=5),
    recent_event_digests=st.lists(st.from_regex(r"\A[0-9a-f]{12}\Z"), max_size=5),
    session_id=st.none() | ids,
    session_items=st.lists(ids, max_size=5),
    last_ts=st.none() | aware,
)
dead_letters = st.builds(
    DeadLetter,
    source_topic=text,
    partition=st.integers(-1, 1000),
    offset=st.integers(-1, 2**40),
    key=st.none() | text,
    raw_value_b64=st.none() | st.binary(max_size=50).map(lambda b: base64.b64encode(b).decode()),
    reason=text,
    error_type=st.sampled_from(typing.get_args(DeadLetterError)),
    stage=text,
    failed_at=aware,
    raw_size=st.none() | st.integers(0, 2**30),
    raw_sha256=st.none() | st.binary(min_size=32, max_size=32).map(bytes.hex),
    raw_truncated=st.booleans(),
    key_truncated=st.booleans(),
)


def _roundtrip(model: BaseModel) -> None:
    raw = model.model_dump_json().encode()
    decoded = decode(raw, type(model))
    assert decoded == model


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(events)
def test_behavior_event_roundtrip(event: BehaviorEvent) -> None:
    _roundtrip(event)


@settings(max_examples=100)
@given(items)
def test_catalog_item_roundtrip(item: CatalogItem) -> None:
    _roundtrip(item)


@settings(max_examples=50, suppress_health_check=[HealthCheck.too_slow])
@given(recommendations | pooled_recommendations())
def test_recommendation_roundtrip(rec: Recommendation) -> None:
    _roundtrip(rec)


@settings(max_examples=50, suppress_health_check=[HealthCheck.too_slow])
@given(profile_updates | related | user_profiles | dead_letters)
def test_other_messages_roundtrip(message: BaseModel) -> None:
    _roundtrip(message)


@settings(max_examples=400)
@given(st.binary(max_size=300))
def test_decode_never_raises_on_arbitrary_bytes(raw: bytes) -> None:
    result = decode(raw, BehaviorEvent)
    assert isinstance(result, BehaviorEvent | Rejection)


@settings(max_examples=300)
@given(
    st.dictionaries(
        st.sampled_from(["event_id", "user_id", "item_id", "event_type", "ts", "quantity", "x"]),
        st.none() | st.integers() | st.text(max_size=20) | st.floats() | st.lists(st.integers()),
    )
)
def test_decode_never_raises_on_arbitrary_json_objects(data: dict[str, object]) -> None:
    result = decode(json.dumps(data).encode(), BehaviorEvent)
    if isinstance(result, Rejection):
        assert result.reason


GOOD = {
    "event_id": "e1",
    "user_id": "u1",
    "item_id": "i1",
    "event_type": "purchase",
    "ts": "2011-12-09T12:50:00Z",
}


@pytest.mark.parametrize(
    ("raw", "error_type", "needle"),
    [
        (b"{not json", "malformed_json", "JSON"),
        (b"\xff\xfe", "malformed_json", "UTF-8"),
        (b"[1, 2]", "malformed_json", "array"),
        (json.dumps({**GOOD, "event_type": "like"}).encode(), "unknown_event_type", "event_type"),
        (
            json.dumps({**GOOD, "ts": "2211-01-01T00:00:00Z"}).encode(),
            "implausible_timestamp",
            "ts",
        ),
        (
            json.dumps({**GOOD, "ts": "1970-01-02T00:00:00Z"}).encode(),
            "implausible_timestamp",
            "ts",
        ),
        (json.dumps({**GOOD, "ts": "2011-12-09T12:50:00"}).encode(), "invalid_fields", "timezone"),
        (
            json.dumps({k: v for k, v in GOOD.items() if k != "user_id"}).encode(),
            "invalid_fields",
            "user_id",
        ),
        (json.dumps({**GOOD, "quantity": "six"}).encode(), "invalid_fields", "quantity"),
        (json.dumps({**GOOD, "item_id": ""}).encode(), "invalid_fields", "item_id"),
        (json.dumps({**GOOD, "surprise": 1}).encode(), "invalid_fields", "surprise"),
    ],
)
def test_bad_events_are_classified_with_a_reason(raw: bytes, error_type: str, needle: str) -> None:
    result = decode(raw, BehaviorEvent)
    assert isinstance(result, Rejection)
    assert result.error_type == error_type
    assert needle.lower() in result.reason.lower()


def test_timestamps_are_normalised_to_utc() -> None:
    event = decode(json.dumps({**GOOD, "ts": "2011-12-09T14:50:00+02:00"}).encode(), BehaviorEvent)
    assert isinstance(event, BehaviorEvent)
    assert event.ts == datetime(2011, 12, 9, 12, 50, tzinfo=UTC)
    assert event.ts.utcoffset() == timedelta(0)


def test_dead_letter_keeps_raw_bytes_and_position() -> None:
    raw = b"\x00garbage"
    rejection = decode(raw, BehaviorEvent)
    assert isinstance(rejection, Rejection)
    record = dead_letter(
        rejection,
        raw=raw,
        key=b"u1",
        topic="behavior-events",
        partition=3,
        offset=42,
        stage="streams",
    )
    assert base64.b64decode(record.raw_value_b64 or "") == raw
    assert (record.source_topic, record.partition, record.offset, record.key) == (
        "behavior-events",
        3,
        42,
        "u1",
    )
    assert record.error_type == "malformed_json"


def test_json_schemas_match_the_models() -> None:
    """Fails when a model changed but `relata schemas` was not re-run."""
    rendered = render_all()
    assert set(rendered) == {f"{spec.name}.schema.json" for spec in ALL_TOPICS}
    for name, text_ in rendered.items():
        path = DEFAULT_DIR / name
        assert path.exists(), f"{name} missing: run `relata schemas`"
        assert path.read_text() == text_, f"{name} drifted from the model: run `relata schemas`"


def test_settings_fail_fast_and_name_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELATA_STORE_KIND", "server")
    with pytest.raises(ValidationError, match="RELATA_STORE_URL"):
        StoreSettings()
    monkeypatch.setenv("RELATA_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    with pytest.raises(ValidationError, match="RELATA_KAFKA_SASL_MECHANISM"):
        KafkaSettings()
    monkeypatch.setenv("RELATA_STREAMS_STORE", "redis://")
    with pytest.raises(ValidationError, match="memory://"):
        StreamsSettings()


def test_secrets_are_not_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELATA_STORE_KIND", "server")
    monkeypatch.setenv("RELATA_STORE_URL", "https://qdrant.example:6333")
    monkeypatch.setenv("RELATA_STORE_API_KEY", "s3cret-key")
    assert "s3cret-key" not in repr(StoreSettings())
