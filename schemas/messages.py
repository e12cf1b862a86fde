"""Pydantic v2 models of every message relata reads or writes.

These models are the public contract for subscribers; `relata schemas` writes one
JSON Schema per topic from them (see `schemas/topics.py`).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
)

from schemas.vocabulary import Term, event_types, reason_kinds, relation_kinds

# Event types and relation kinds are declared once, in `schemas.vocabulary`; these types
# accept exactly the declared terms (checked when a message is validated).
EventType = Annotated[str, Term(event_types, "unknown_event_type", "event type")]
RelationKind = Annotated[str, Term(relation_kinds, "unknown_relation_kind", "relation kind")]
ReasonKind = Annotated[str, Term(reason_kinds, "unknown_reason_kind", "reason kind")]

DeadLetterError = Literal[
    "malformed_json",
    "invalid_fields",
    "unknown_event_type",
    "unknown_item",
    "implausible_timestamp",
    "processing_error",
]

# Identifiers: non-empty, bounded, no surrounding whitespace. 256 chars covers UUIDs, SKUs and
# composite keys while keeping a hostile producer from bloating state with megabyte keys.
Identifier = Annotated[
    str,
    StringConstraints(min_length=1, max_length=256, strip_whitespace=False, pattern=r"^\S(.*\S)?$"),
]

# Earliest plausible event time: e-commerce logs predate 1995 only in fiction.
EARLIEST_EVENT_TS = datetime(1990, 1, 1, tzinfo=UTC)
# Producers' clocks drift; more than a day ahead of the consumer's clock is a bug, not drift.
MAX_CLOCK_SKEW = timedelta(days=1)


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)


class BehaviorEvent(_Message):
    """One shopper action; topic `behavior-events`, key `user_id`."""

    event_id: Identifier = Field(description="Unique id; used to de-duplicate re-deliveries.")
    user_id: Identifier
    item_id: Identifier
    event_type: EventType
    ts: AwareDatetime = Field(description="When the action happened (ISO-8601 with offset).")
    session_id: Identifier | None = Field(
        default=None, description="Basket or session id (online-retail: the invoice)."
    )
    quantity: int | None = Field(default=None, ge=1, le=1_000_000)

    @field_validator("ts")
    @classmethod
    def _plausible_ts(cls, value: datetime) -> datetime:
        latest = datetime.now(UTC) + MAX_CLOCK_SKEW
        if not EARLIEST_EVENT_TS <= value <= latest:
            msg = (
                f"ts {value.isoformat()} is outside the plausible range "
                f"[{EARLIEST_EVENT_TS.isoformat()}, now + {MAX_CLOCK_SKEW}]"
            )
            raise ValueError(msg)
        return value.astimezone(UTC)


class CatalogItem(_Message):
    """One product; topic `item-catalog` (compacted), key `item_id`.

    A tombstone (null value) or `available=false` retires the item.
    """

    item_id: Identifier
    title: str | None = Field(default=None, max_length=2_000)
    categories: list[Annotated[str, StringConstraints(max_length=500)]] = Field(
        default_factory=list, max_length=50
    )
    brand: str | None = Field(default=None, max_length=500)
    price: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    description: str | None = Field(default=None, max_length=20_000)
    available: bool = True


class HistoryEntry(_Message):
    """One distinct item of a user's bounded recent history, with its folded weight."""

    item_id: Identifier
    weight: float = Field(description="Decayed sum of event-type weights (negative after returns).")
    last_event_type: EventType
    last_ts: AwareDatetime
    count: int = Field(ge=1, description="Events folded into this entry.")


class UserProfile(_Message):
    """Per-user state of the stream processor (Faust table value, changelog-backed)."""

    user_id: Identifier
    history: list[HistoryEntry] = Field(default_factory=list, description="Most recent first.")
    recent_event_ids: list[Identifier] = Field(
        default_factory=list, description="Bounded, newest last; de-duplicates re-deliveries."
    )
    session_id: Identifier | None = Field(default=None, description="Current basket/session.")
    session_items: list[Identifier] = Field(
        default_factory=list, description="Items of the current basket/session (bounded)."
    )
    last_ts: AwareDatetime | None = None


class ProfileUpdate(_Message):
    """A changed user profile, handed from `streams` to the recommender; key `user_id`."""

    user_id: Identifier
    history: list[HistoryEntry] = Field(description="Most recent first, bounded in length.")
    last_event_type: EventType
    last_item_id: Identifier
    trigger_event_ids: list[Identifier] = Field(min_length=1)
    source_ts_ms: int = Field(
        ge=0, description="Kafka timestamp (ms) of the oldest triggering event: latency origin."
    )
    updated_at: AwareDatetime


class Evidence(_Message):
    """Why a related item is related: association statistics or vector similarity."""

    support: int | None = Field(
        default=None, ge=0, description="Baskets or histories holding both."
    )
    confidence: float | None = Field(default=None, ge=0)
    lift: float | None = Field(default=None, ge=0)
    pmi: float | None = None
    cosine: float | None = Field(default=None, ge=-1.0001, le=1.0001)
    text: str = Field(description='Readable, e.g. "bought together in 37 baskets, lift 4.2".')


class RelatedItem(_Message):
    item_id: Identifier
    kind: RelationKind
    score: float
    evidence: Evidence


class RelatedItems(_Message):
    """Neighbours of one product; topic `related-items` (compacted), key `item_id`."""

    item_id: Identifier
    item_count: float = Field(
        ge=0, description="Decayed number of baskets/histories holding the item."
    )
    related: list[RelatedItem]
    updated_at: AwareDatetime


class Reason(_Message):
    """One piece of support for a recommended item."""

    source_item_id: Identifier = Field(description="The user's own history item behind it.")
    kind: ReasonKind
    strength: float = Field(description="This reason's contribution to the item's score.")
    text: str


class RecommendedItem(_Message):
    item_id: Identifier
    score: float
    reasons: list[Reason] = Field(min_length=1)


class Recommendation(_Message):
    """Fresh recommendations for one user; topic `recommendations` (compacted), key `user_id`."""

    user_id: Identifier
    items: list[RecommendedItem]
    generated_at: AwareDatetime
    model_name: str
    model_version: str
    strategy: str = Field(description="Ranking strategy that produced the list.")
    trigger_event_ids: list[Identifier] = Field(min_length=1)
    latency_ms: float = Field(
        ge=0, description="Oldest triggering event's Kafka timestamp → publish."
    )


class DeadLetter(_Message):
    """An input that could not be processed; topic `dead-letter`."""

    source_topic: str
    partition: int = Field(ge=-1)
    offset: int = Field(ge=-1)
    key: str | None = Field(default=None, description="Record key, base64 if not UTF-8.")
    raw_value_b64: str | None = Field(description="The record value, base64-encoded, verbatim.")
    reason: str = Field(description="What was wrong, for a person.")
    error_type: DeadLetterError
    stage: str = Field(description="Which process rejected it (streams, item-indexer, ...).")
    failed_at: AwareDatetime
