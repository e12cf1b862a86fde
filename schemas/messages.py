"""Pydantic v2 models of every message relata reads or writes.

These models are the public contract for subscribers; `relata schemas` writes one
JSON Schema per topic from them (see `schemas/topics.py`).
"""

from __future__ import annotations

import base64
import binascii
import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, ClassVar, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StringConstraints,
    field_validator,
    model_validator,
)

from schemas.vocabulary import Term, event_types, reason_kinds, relation_kinds

# The content relation kind: made from the item vectors, not from behaviour.
SIMILAR = "similar"

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
    "too_large",
    "too_deep",
    "conflicting_duplicate",
]

# The largest record value decoded for any message, unless its model says less
# (`MAX_RECORD_BYTES`): librdkafka's default `message.max.bytes`, so nothing relata produces
# with default settings is larger. A larger value is rejected (`too_large`) before parsing.
DEFAULT_MAX_RECORD_BYTES = 1_000_000

# Characters that never belong in an identifier: C0 and C1 controls, DEL, and the invisible
# format characters (soft hyphen, zero-width and bidirectional marks, line and paragraph
# separators, word joiners, the byte order mark). Spelled as ranges, not Unicode classes, so
# the JSON Schema pattern means the same in ECMA-262, Python `re` and pydantic's Rust regex.
_INVISIBLE = (
    r"\x00-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u206f"
    r"\ufeff\ufff9-\ufffb"
)
# Identifiers: non-empty, bounded, printable (none of the characters above), no surrounding
# whitespace. 256 chars covers UUIDs, SKUs and composite keys while keeping a hostile producer
# from bloating state with megabyte keys.
Identifier = Annotated[
    str,
    StringConstraints(
        min_length=1,
        max_length=256,
        strip_whitespace=False,
        pattern=rf"^[^{_INVISIBLE}\s](?:[^{_INVISIBLE}]*[^{_INVISIBLE}\s])?$",
    ),
]


# Free text: no control characters other than tab, line feed and carriage return (a NUL or an
# escape sequence in a title reaches logs, terminals and the tokenizer).
_TEXT = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*$"

# The start of an ISO-8601 date-time (pydantic checks the rest, and that it has an offset).
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}")

# Earliest plausible event time: e-commerce logs predate 1995 only in fiction.
EARLIEST_EVENT_TS = datetime(1990, 1, 1, tzinfo=UTC)
# Producers' clocks drift; more than a day ahead of the consumer's clock is a bug, not drift.
MAX_CLOCK_SKEW = timedelta(days=1)


def _json_type(value: object) -> str:
    """The JSON name of a parsed value's type, for messages."""
    names: dict[type, str] = {bool: "a boolean", int: "a number", float: "a number"}
    names |= {list: "an array", dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)

    # Record values larger than this are rejected (`too_large`) before they are parsed.
    MAX_RECORD_BYTES: ClassVar[int] = DEFAULT_MAX_RECORD_BYTES


class BehaviorEvent(_Message):
    """One shopper action; topic `behavior-events`, key `user_id`. A record value is at most
    65,536 bytes."""

    # A valid event is under 10 KB even with every identifier at its longest, escaped.
    MAX_RECORD_BYTES: ClassVar[int] = 65_536

    event_id: Identifier = Field(
        description="Unique id; used to de-duplicate re-deliveries. A second event with a known "
        "id but other content is rejected (conflicting_duplicate)."
    )
    user_id: Identifier
    item_id: Identifier
    event_type: EventType
    ts: AwareDatetime = Field(
        description="When the action happened: an ISO-8601 string with an offset (numbers, "
        "such as epoch seconds, are rejected)."
    )
    session_id: Identifier | None = Field(
        default=None, description="Basket or session id (online-retail: the invoice)."
    )
    quantity: Annotated[int, Strict()] | None = Field(
        default=None, ge=1, le=1_000_000, description="A JSON integer (not a boolean or string)."
    )

    @field_validator("ts", mode="before")
    @classmethod
    def _iso_ts(cls, value: object) -> object:
        # pydantic would read a number (or a numeric string) as epoch seconds; the contract is
        # ISO-8601 with an offset, so anything that does not start as a date is refused here.
        if type(value) is str:
            if _ISO_DATE.match(value) is None:
                msg = f"ts must be an ISO-8601 date-time with an offset, got {value[:40]!r}"
                raise ValueError(msg)
        elif not isinstance(value, datetime):
            msg = f"ts must be an ISO-8601 date-time string with an offset, not {_json_type(value)}"
            raise ValueError(msg)
        return value

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

    A tombstone (null value) or `available=false` retires the item. A record value is at most
    524,288 bytes; texts hold no control characters but tab, line feed and carriage return.
    """

    # The longest valid item (every text at its maximum, escaped) is under 300 KB.
    MAX_RECORD_BYTES: ClassVar[int] = 524_288

    item_id: Identifier
    title: Annotated[str, StringConstraints(max_length=2_000, pattern=_TEXT)] | None = None
    categories: list[Annotated[str, StringConstraints(max_length=500, pattern=_TEXT)]] = Field(
        default_factory=list, max_length=50
    )
    brand: Annotated[str, StringConstraints(max_length=500, pattern=_TEXT)] | None = None
    price: Annotated[float, Strict()] | None = Field(
        default=None, ge=0, allow_inf_nan=False, description="A JSON number (not a string)."
    )
    description: Annotated[str, StringConstraints(max_length=20_000, pattern=_TEXT)] | None = None
    available: Annotated[bool, Strict()] = Field(
        default=True, description="A JSON boolean; false retires the item."
    )


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
    recent_event_digests: list[Annotated[str, StringConstraints(max_length=64)]] = Field(
        default_factory=list,
        description="Content digests of the newest recent_event_ids, aligned at the end (a "
        "profile stored before digests has fewer): a known id with another digest is a "
        "conflicting duplicate, not a re-delivery.",
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

    @classmethod
    def similar(cls, item_id: str, cosine: float) -> RelatedItem:
        """A `similar` neighbour: close in meaning, scored by the cosine of the two item vectors
        (one wording wherever `similar` lists are made or served)."""
        cosine = max(-1.0, min(1.0, float(cosine)))
        return cls(
            item_id=item_id,
            kind=SIMILAR,
            score=cosine,
            evidence=Evidence(cosine=cosine, text=f"similar description (cosine {cosine:.2f})"),
        )


class RelatedItems(_Message):
    """Neighbours of one product; topic `related-items` (compacted), key `item_id`."""

    item_id: Identifier
    item_count: float = Field(
        ge=0, description="Decayed number of baskets/histories holding the item."
    )
    related: list[RelatedItem]
    updated_at: AwareDatetime


class SimilarList(_Message):
    """The nearest neighbours of one item by its vector, made by the item indexer when it
    indexes the item; topic `similar-items` (compacted), key `item_id`. A tombstone: the item
    was retired."""

    item_id: Identifier
    related: list[RelatedItem] = Field(
        description="Kind `similar`, best first, each with its cosine; only items available "
        "when the list was made."
    )
    model_name: str = Field(description="The model whose item vectors were searched.")
    vectors_version: str | None = Field(
        description="Version of the item vectors searched (the vector store's version)."
    )
    updated_at: AwareDatetime

    @field_validator("related")
    @classmethod
    def _only_similar(cls, related: list[RelatedItem]) -> list[RelatedItem]:
        wrong = sorted({r.kind for r in related if r.kind != SIMILAR})
        if wrong:
            raise ValueError(f"a similar list holds only kind {SIMILAR!r}, got {wrong}")
        return related


class Reason(_Message):
    """One piece of support for a recommended item: its evidence as fields, and one short
    text for people (subscribers may word their own from the fields)."""

    source_item_id: Identifier | None = Field(
        description="The user's own history item behind it; null only for `trending` (a user "
        "with no usable history has none) and `pinned` (placed by a business rule)."
    )
    kind: ReasonKind = Field(
        description="A relation kind (the evidence of an association or of vector similarity), "
        "`popular` (the popularity prior), `trending` (time-decayed popularity, for a user "
        "with no usable history) or `pinned` (placed by a business rule)."
    )
    strength: float = Field(description="This reason's contribution to the item's score.")
    text: str = Field(
        description='Short, readable, names the source item once, e.g. "often bought together '
        "with 'Rose Lip Balm' (lift 4.2)\"."
    )
    support: int | None = Field(
        default=None, ge=0, description="Association: baskets or histories holding both."
    )
    confidence: float | None = Field(
        default=None, ge=0, description="Association: P(this item | the source item)."
    )
    lift: float | None = Field(default=None, ge=0, description="Association: lift of the pair.")
    pmi: float | None = Field(default=None, description="Association: log2 of the lift.")
    cosine: float | None = Field(
        default=None,
        ge=-1.0001,
        le=1.0001,
        description="Similarity: cosine of the item's vector with the source item's.",
    )
    item_count: float | None = Field(
        default=None,
        ge=0,
        description="popular, trending: the item's decayed number of baskets or histories.",
    )


class RecommendedItem(_Message):
    item_id: Identifier
    score: float
    reasons: list[Reason] = Field(min_length=1)


# Why filters were not applied: each stage's filters that removed every candidate are skipped
# (the list is never emptied by a filter) and named here.
Fallback = Literal[
    "business_rules_removed_every_candidate",  # the rules file's only/exclude, in the recommender
    "request_filters_removed_every_candidate",  # a request's category/brand/price, HTTP API
]


def similarity_bytes(n: int) -> int:
    """Bytes of the pairwise similarities of n items: one per pair (the upper triangle)."""
    return n * (n - 1) // 2


class ItemAttributes(_Message):
    """The catalog attributes filters read (`schemas.rules.ItemMatch`): none known, all empty."""

    categories: list[str] = Field(default_factory=list)
    brand: str | None = None
    price: float | None = Field(default=None, ge=0, allow_inf_nan=False)


class CandidatePool(_Message):
    """What a subscriber needs to filter and re-rank a list without item vectors
    (`schemas.reranking.rerank`): the next candidates after the listed items and, for the
    listed items followed by these, their catalog attributes and pairwise similarities."""

    items: list[RecommendedItem] = Field(
        description="The next candidates after the recommendation's items, best first, each "
        "with its strongest reason."
    )
    attributes: list[ItemAttributes] = Field(
        description="Catalog attributes of the recommendation's items followed by the pool's "
        "items, in that order."
    )
    similarities: str = Field(
        description="Pairwise cosine similarities of the same items, base64: one byte per pair "
        "of the upper triangle, row by row ((0,1), (0,2), ..., (1,2), ...), the byte "
        "round(127 * cosine) + 127 (0 exactly: 127; an item without a vector: 0)."
    )
    mmr_lambda: float = Field(
        ge=0,
        le=1,
        description="The maximal marginal relevance lambda the items were chosen with "
        "(1: score order).",
    )


class Recommendation(_Message):
    """Fresh recommendations for one user; topic `recommendations` (compacted), key `user_id`."""

    user_id: Identifier
    items: list[RecommendedItem]
    generated_at: AwareDatetime
    model_name: str
    model_version: str
    vectors_version: str | None = Field(
        default=None,
        description="Version of the item vectors searched (the vector store's version, a "
        "model_version); the recommender refuses a store of another model than its encoder. "
        "Absent from producers that predate versioned stores.",
    )
    strategy: str = Field(description="Ranking strategy that produced the list.")
    ranking_version: str | None = Field(
        default=None,
        description="Version of the fitted ranking model (blend weights and fitted parts) that "
        "ranked the list: `builtin`, or `fit-` and a digest of what was fitted (the background "
        "fitter swaps models in). Absent from producers that predate fitting.",
    )
    trigger_event_ids: list[Identifier] = Field(min_length=1)
    latency_ms: float = Field(
        ge=0, description="Oldest triggering event's Kafka timestamp → publish."
    )
    fallbacks: list[Fallback] = Field(
        default_factory=list,
        description="Filters that removed every candidate and so were not applied (the list "
        "is ranked without them rather than left empty): "
        "`business_rules_removed_every_candidate` (the business rules file), "
        "`request_filters_removed_every_candidate` (the HTTP request's filters). Empty: every "
        "filter applied.",
    )
    pool: CandidatePool | None = Field(
        default=None,
        description="The candidates, attributes and similarities to filter and re-rank this "
        "list per request (`RELATA_RECOMMENDER_POOL_SIZE`); absent from producers that predate "
        "it and from re-ranked answers.",
    )

    @model_validator(mode="after")
    def _pool_aligned(self) -> Recommendation:
        if self.pool is None:
            return self
        n = len(self.items) + len(self.pool.items)
        if len({item.item_id for item in (*self.items, *self.pool.items)}) != n:
            msg = "an item is listed twice among items and pool.items"
            raise ValueError(msg)
        if len(self.pool.attributes) != n:
            msg = f"pool.attributes holds {len(self.pool.attributes)} entries for {n} items"
            raise ValueError(msg)
        try:
            size = len(base64.b64decode(self.pool.similarities, validate=True))
        except binascii.Error as exc:
            msg = f"pool.similarities is not base64: {exc}"
            raise ValueError(msg) from exc
        if size != similarity_bytes(n):
            msg = f"pool.similarities holds {size} bytes for {n} items ({similarity_bytes(n)})"
            raise ValueError(msg)
        return self


class TrendingList(_Message):
    """The answer to a user with no usable history: the most popular available items lately,
    labelled `trending`, as the recommender ranks them for one placement (business rules
    applied); topic `trending-items` (compacted), key `placement`. The stream processor
    answers `GET /users/{user_id}/recommendations` with it for a user with no list of their own.
    """

    placement: Identifier
    items: list[RecommendedItem]
    generated_at: AwareDatetime
    model_name: str
    model_version: str
    vectors_version: str | None = None
    strategy: str = Field(description="Ranking strategy of the recommender that made it.")


# A dead letter keeps at most this many bytes of the rejected value (the rest is described by
# its size and SHA-256), this many bytes of its key and characters of its reason, so a dead
# letter stays under DEAD_LETTER_MAX_BYTES whatever it was rejected for.
DEAD_LETTER_RAW_PREFIX_BYTES = 65_536
DEAD_LETTER_KEY_BYTES = 1_024
DEAD_LETTER_REASON_CHARS = 2_000
# A serialised dead letter is at most this long: far below any producer's message.max.bytes.
DEAD_LETTER_MAX_BYTES = 131_072


class DeadLetter(_Message):
    """An input that could not be processed; topic `dead-letter`.

    It keeps the first 65,536 bytes of the record value (all of it unless `raw_truncated`)
    with the value's size and SHA-256, so a dead letter stays under 131,072 bytes whatever the
    input was.
    """

    source_topic: str
    partition: int = Field(ge=-1)
    offset: int = Field(ge=-1)
    key: str | None = Field(
        default=None,
        description="Record key, base64 if not UTF-8; its first 1,024 bytes (key_truncated).",
    )
    raw_value_b64: str | None = Field(
        description="The record value, base64-encoded: verbatim, or its first 65,536 bytes "
        "when raw_truncated."
    )
    reason: str = Field(description="What was wrong, for a person (at most 2,000 characters).")
    error_type: DeadLetterError
    stage: str = Field(description="Which process rejected it (streams, item-indexer, ...).")
    failed_at: AwareDatetime
    raw_size: int | None = Field(
        default=None, ge=0, description="Length of the record value in bytes (null: no value)."
    )
    raw_sha256: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{64}$",
        description="SHA-256 of the whole record value, hex (null: no value).",
    )
    raw_truncated: bool = Field(
        default=False, description="raw_value_b64 holds only a prefix of the value."
    )
    key_truncated: bool = Field(default=False, description="key holds only a prefix of the key.")


class ErasureRequest(_Message):
    """A request to erase one user from everything relata keeps; topic `erasure-requests`,
    key `user_id`. Sending it again is harmless (an erasure is idempotent)."""

    user_id: Identifier
    request_id: Identifier = Field(description="The requester's id for it, echoed in the audit.")
    requested_at: AwareDatetime


class ErasureAudit(_Message):
    """That an erasure was carried out, without personal data; topic `erasure-audit`, key
    `request_id`."""

    request_id: Identifier
    erased_at: AwareDatetime
    stage: str = Field(description="Which process erased (streams: profile and its outputs).")
    profile_found: bool = Field(description="A profile was held for the user and was removed.")
