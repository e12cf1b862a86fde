"""The vocabulary of relata: every event type and every relation kind, declared once.

Everything that names an event type or a relation kind derives from this registry: the
message models (validation and JSON Schema), the profile fold's weights and basket kinds, the
association statistics, the HTTP API's `kind` parameter, the ranking's weights and reason
wording, and the evaluation's methods. Adding a term here is the whole change; `extended`
adds terms for the length of a `with` block (tests).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema

Signal = Literal["co-occurrence", "sequence", "content"]
EvidenceField = Literal["support", "confidence", "lift", "pmi", "cosine"]


@dataclass(frozen=True, slots=True)
class EventTypeSpec:
    """One shopper action."""

    name: str
    weight: float  # default weight in a profile (RELATA_STREAMS_WEIGHT_<NAME> overrides it)
    verb: str  # how a profile text words it ("bought: Rose Lip Balm")
    # The relation kind a basket or session of such events feeds (None: it feeds none).
    basket_kind: str | None
    # Preference as an evaluation target (1 strongest); None: never a target.
    target_rank: int | None = None


@dataclass(frozen=True, slots=True)
class RelationKindSpec:
    """One way two products are related."""

    name: str
    signal: Signal  # co-occurrence and sequence are behaviour; content is meaning
    reason: str  # a reason's wording, with {src} for the user's own history item
    evidence: tuple[EvidenceField, ...]  # the Evidence fields it fills
    support_text: str  # the evidence's wording, with {n} for its support
    description: str
    weight: float = 1.0  # default blend weight in the ranking

    @property
    def behaviour(self) -> bool:
        return self.signal != "content"


_ASSOCIATION_EVIDENCE: tuple[EvidenceField, ...] = ("support", "confidence", "lift", "pmi")

_EVENT_TYPES: dict[str, EventTypeSpec] = {}
_RELATION_KINDS: dict[str, RelationKindSpec] = {}
# The names, kept as tuples between changes of the registry: messages check their terms
# against them on every validation.
_NAMES: dict[str, tuple[str, ...]] = {}

# Reasons that name no relation between two products: the ranking's popularity prior, and
# what a user with no usable history is answered with (time-decayed popularity).
POPULAR = "popular"
TRENDING = "trending"
PINNED = "pinned"  # placed by a business rule
_NON_RELATION_REASONS = (POPULAR, TRENDING, PINNED)


def _register(
    event_types: Sequence[EventTypeSpec], relation_kinds: Sequence[RelationKindSpec]
) -> None:
    for kind in relation_kinds:
        if kind.name in _RELATION_KINDS or kind.name in _NON_RELATION_REASONS:
            raise ValueError(f"relation kind {kind.name!r} is declared already")
        _RELATION_KINDS[kind.name] = kind
    for spec in event_types:
        if spec.name in _EVENT_TYPES:
            raise ValueError(f"event type {spec.name!r} is declared already")
        if spec.basket_kind is not None and spec.basket_kind not in _RELATION_KINDS:
            msg = f"event type {spec.name!r} feeds unknown relation kind {spec.basket_kind!r}"
            raise ValueError(msg)
        _EVENT_TYPES[spec.name] = spec
    _refresh()


def _refresh() -> None:
    _NAMES["event_types"] = tuple(_EVENT_TYPES)
    _NAMES["relation_kinds"] = tuple(_RELATION_KINDS)
    _NAMES["reason_kinds"] = (*_RELATION_KINDS, *_NON_RELATION_REASONS)


_register(
    event_types=(
        EventTypeSpec("view", 1.0, "viewed", "also_viewed"),
        EventTypeSpec("click", 2.0, "clicked", "also_viewed", target_rank=3),
        EventTypeSpec("add_to_cart", 4.0, "added to cart", "bought_together", target_rank=2),
        EventTypeSpec("purchase", 8.0, "bought", "bought_together", target_rank=1),
        EventTypeSpec("return", -8.0, "returned", None),
    ),
    relation_kinds=(
        RelationKindSpec(
            "similar",
            "content",
            "related to {src}",
            ("cosine",),
            "co-occurred {n} times",
            "Close in meaning: cosine of the item vectors.",
            weight=0.0,
        ),
        RelationKindSpec(
            "bought_together",
            "co-occurrence",
            "often bought together with {src}",
            _ASSOCIATION_EVIDENCE,
            "bought together in {n} baskets",
            "Bought (or carted) in the same basket or session.",
        ),
        RelationKindSpec(
            "also_bought",
            "co-occurrence",
            "customers who bought {src} also bought it",
            _ASSOCIATION_EVIDENCE,
            "bought by {n} of the same customers",
            "Bought by the same customers across their histories.",
        ),
        RelationKindSpec(
            "also_viewed",
            "co-occurrence",
            "viewed in the same sessions as {src}",
            _ASSOCIATION_EVIDENCE,
            "viewed together in {n} sessions",
            "Viewed or clicked in the same session.",
        ),
        RelationKindSpec(
            "next_item",
            "sequence",
            "often chosen next after {src}",
            _ASSOCIATION_EVIDENCE,
            "chosen next after it {n} times",
            "Bought next after it: a directed sequence transition.",
        ),
    ),
)


def event_type(name: str) -> EventTypeSpec:
    """The declared event type `name`; KeyError naming the valid ones otherwise."""
    try:
        return _EVENT_TYPES[name]
    except KeyError:
        raise KeyError(f"unknown event type {name!r}; valid: {list(_EVENT_TYPES)}") from None


def relation_kind(name: str) -> RelationKindSpec:
    """The declared relation kind `name`; KeyError naming the valid ones otherwise."""
    try:
        return _RELATION_KINDS[name]
    except KeyError:
        raise KeyError(f"unknown relation kind {name!r}; valid: {list(_RELATION_KINDS)}") from None


def event_types() -> tuple[str, ...]:
    """Every event type, in declaration order."""
    return _NAMES["event_types"]


def event_type_specs() -> tuple[EventTypeSpec, ...]:
    return tuple(_EVENT_TYPES.values())


def relation_kinds() -> tuple[str, ...]:
    """Every relation kind, in declaration order (which is also their wire code order)."""
    return _NAMES["relation_kinds"]


def relation_kind_specs() -> tuple[RelationKindSpec, ...]:
    return tuple(_RELATION_KINDS.values())


def behaviour_kinds() -> tuple[str, ...]:
    """The relation kinds learned from behaviour (the association statistics publish these)."""
    return tuple(k.name for k in _RELATION_KINDS.values() if k.behaviour)


def kinds_with(signal: Signal) -> tuple[str, ...]:
    return tuple(k.name for k in _RELATION_KINDS.values() if k.signal == signal)


def reason_kinds() -> tuple[str, ...]:
    """What a recommendation's reason may name: a relation kind, the popularity prior, or
    trending (the answer to a user with no usable history)."""
    return _NAMES["reason_kinds"]


def basket_event_types(kind: str) -> frozenset[str]:
    """The event types whose baskets or sessions feed relation kind `kind`."""
    return frozenset(s.name for s in _EVENT_TYPES.values() if s.basket_kind == kind)


def target_preference() -> tuple[str, ...]:
    """Event types that can be an evaluation target, strongest first."""
    ranked = [s for s in _EVENT_TYPES.values() if s.target_rank is not None]
    return tuple(s.name for s in sorted(ranked, key=lambda s: s.target_rank or 0))


@contextmanager
def extended(
    *,
    event_types: Sequence[EventTypeSpec] = (),
    relation_kinds: Sequence[RelationKindSpec] = (),
) -> Iterator[None]:
    """Declare more terms for the length of the block (new terms are appended: the codes of
    the declared ones do not move)."""
    saved = dict(_EVENT_TYPES), dict(_RELATION_KINDS)
    try:
        _register(event_types, relation_kinds)
        yield
    finally:
        _EVENT_TYPES.clear()
        _EVENT_TYPES.update(saved[0])
        _RELATION_KINDS.clear()
        _RELATION_KINDS.update(saved[1])
        _refresh()


@dataclass(frozen=True, slots=True)
class Term:
    """Pydantic metadata: a string that must name a term of the registry at validation time
    (so an extended registry is accepted at once), with the terms as its JSON Schema enum."""

    names: Callable[[], tuple[str, ...]]
    error_type: str
    what: str

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(self.check, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {"type": "string", "enum": list(self.names())}

    def check(self, value: str) -> str:
        if value not in (valid := self.names()):
            raise PydanticCustomError(
                self.error_type,
                "{what} '{value}' is unknown; valid: {valid}",
                {"what": self.what, "value": value, "valid": ", ".join(valid)},
            )
        return value
