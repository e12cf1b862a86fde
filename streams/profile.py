"""Folding one behaviour event into a user's profile (pure logic, no Kafka/Faust).

Used by the live profile agent and by offline evaluation, so both run the same code.

Semantics (documented once, here):
- History: at most `history_size` distinct items, most recent first (by `last_ts`). An entry's
  weight is the time-decayed sum of its events' type weights, valued at its `last_ts`
  (half-life in event time). When the history is full, the least recently touched entry goes.
- Returns add a negative weight. An item whose net weight becomes negative *stays* in the
  history (rather than being dropped): the recommender excludes history items, so a returned
  product is never recommended back, and the negative weight tells the user-vector pooling to
  skip it. It leaves only by normal least-recent eviction.
- De-duplication: the last `dedup_size` event ids are remembered, each with a short digest of
  its event's content (`event_digest`); a re-delivered event (known id, same content) is a
  no-op (`changed=False`, the same profile object back). A known id with other content is a
  *conflicting duplicate*: also a no-op, but reported (`conflict`), so the caller dead-letters
  it instead of dropping it silently. Ids remembered by a profile stored before digests
  existed have none; a repeat of one of those counts as a re-delivery.
- Out-of-order events (earlier than an entry's `last_ts`): their weight is decayed *down* to
  the entry's `last_ts` and added; weights never grow by negative decay and `last_ts` / the
  entry's position do not move back in time.
- Baskets: the same `session_id`, or, for events without one, events of one user within
  `session_window_s` of the previous event. Returns never open or join a basket.
- Windowed co-occurrence: a new basket item pairs with the `basket_pairs` most recent items of
  its basket only. Baskets of online shops are small, so this changes nothing there; a
  wholesale invoice of hundreds of lines would otherwise cost O(basket) work per event and
  O(basket^2) per basket.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from schemas import vocabulary
from schemas.messages import (
    BehaviorEvent,
    EventType,
    HistoryEntry,
    ProfileUpdate,
    RelationKind,
    UserProfile,
)
from schemas.settings import StreamsSettings


def purchase_types() -> frozenset[EventType]:
    """Event types that make a "bought together" basket (and count as bought)."""
    return vocabulary.basket_event_types("bought_together")


@dataclass(frozen=True, slots=True)
class FoldConfig:
    """Parameters of the fold; build from `StreamsSettings` so live and offline agree."""

    weights: Mapping[EventType, float]
    half_life_s: float
    history_size: int = 50
    dedup_size: int = 200
    session_window_s: float = 1800.0
    history_window: int = 5
    # Items remembered per basket (a repeat of one of them is not a new basket item).
    session_size: int = 100
    # Windowed co-occurrence: a new basket item pairs with at most this many of the basket's
    # most recent items, so the work per event of a very large basket stays bounded.
    basket_pairs: int = 30
    # From the vocabulary, read once: the fold looks them up per event.
    basket_kinds: Mapping[str, str | None] = field(
        init=False,
        default_factory=lambda: {s.name: s.basket_kind for s in vocabulary.event_type_specs()},
    )
    purchase_types: frozenset[str] = field(init=False, default_factory=lambda: purchase_types())

    def __post_init__(self) -> None:
        known = vocabulary.event_types()
        missing = [t for t in known if t not in self.weights]
        if missing:
            msg = f"FoldConfig.weights lacks event types {missing}; valid: {list(known)}"
            raise ValueError(msg)
        if (
            self.half_life_s <= 0
            or self.history_size < 1
            or self.dedup_size < 1
            or self.basket_pairs < 1
        ):
            msg = (
                "FoldConfig needs half_life_s > 0, history_size >= 1, dedup_size >= 1 "
                "and basket_pairs >= 1"
            )
            raise ValueError(msg)

    @classmethod
    def from_settings(cls, settings: StreamsSettings) -> FoldConfig:
        return cls(
            weights=settings.event_weights(),
            half_life_s=settings.half_life_hours * 3600.0,
            history_size=settings.history_size,
            dedup_size=settings.dedup_size,
            session_window_s=settings.assoc_session_window_s,
            history_window=settings.assoc_history_window,
            session_size=max(100, settings.assoc_basket_pairs),
            basket_pairs=settings.assoc_basket_pairs,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class EventFold:
    """What folding one event did besides changing the profile: the basket and sequence
    context that the association statistics consume.

    `basket_kind`: the association kind this event adds to, or None (a return, a duplicate, or
    an item already counted in this basket for that kind). `basket_items`: the other items of
    the same basket for that kind (oldest first), at most `basket_pairs` (the most recent).
    `prior_items`: earlier distinct history items (the current basket's earlier items
    included: the order a basket is filled in is a sequence too), most recent
    first, up to `history_window` — the sources of `next_item` transitions; empty unless
    `sequence_step`. `bought_items`: the window of earlier history items outside the basket,
    positive purchase/add-to-cart entries, only when this event is one too: the partners of
    `also_bought`. `sequence_step`: the item newly joins the current basket/session (one
    sequence position).
    """

    changed: bool
    # A known event id with other content: why it is refused (None: not a conflict).
    conflict: str | None = None
    basket_items: tuple[str, ...] = ()
    prior_items: tuple[str, ...] = ()
    basket_kind: RelationKind | None = None
    sequence_step: bool = False
    new_basket: bool = False
    bought_items: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class FoldResult(EventFold):
    """Outcome of folding one event: the new profile (the same object for a duplicate) and
    the event's context."""

    profile: UserProfile


_DUPLICATE = EventFold(changed=False)
_NO_CONTEXT = EventFold(changed=True)


def decay_factor(dt_s: float, half_life_s: float) -> float:
    """2^(-dt/half_life) for dt >= 0; 1.0 for dt <= 0 (never grow by negative decay)."""
    if dt_s <= 0:
        return 1.0
    return math.pow(2.0, -dt_s / half_life_s)


def _ts(value: datetime) -> float:
    return value.timestamp()


# Hex characters of an event's content digest: 48 bits, so two different events of one user
# that share an id pass for one only with odds of 2^-48, at 12 bytes per remembered id.
DIGEST_CHARS = 12


def event_digest(event: BehaviorEvent) -> str:
    """A short digest of what an event says (everything but its id), to tell a re-delivery
    (same content) from a conflicting event that reuses the id. Timestamps are compared as
    instants, so a re-serialised event (another offset, `Z`) matches."""
    content = "\x1f".join(
        (
            event.user_id,
            event.item_id,
            event.event_type,
            event.ts.astimezone(UTC).isoformat(),
            event.session_id or "",
            "" if event.quantity is None else str(event.quantity),
        )
    )
    return hashlib.blake2b(content.encode("utf-8"), digest_size=DIGEST_CHARS // 2).hexdigest()


@dataclass(slots=True)
class _Folding:
    """A profile while events fold into it: plain lists changed in place, so a user's batch
    builds one `UserProfile` at its end instead of one per event, and copies its history and
    event ids once (the basket's items are still copied per purchase or view event: see
    `_basket_context`)."""

    user_id: str
    history: list[HistoryEntry]
    recent_event_ids: list[str]
    # Digests of the newest ids, aligned at the end: digest i belongs to id
    # `len(recent_event_ids) - len(recent_event_digests) + i` (older profiles have fewer).
    recent_event_digests: list[str]
    session_id: str | None
    session_items: list[str]
    last_ts: datetime | None

    @classmethod
    def of(cls, profile: UserProfile) -> _Folding:
        ids = list(profile.recent_event_ids)
        digests = list(profile.recent_event_digests)
        del digests[: max(0, len(digests) - len(ids))]  # never more digests than ids
        return cls(
            user_id=profile.user_id,
            history=list(profile.history),
            recent_event_ids=ids,
            recent_event_digests=digests,
            session_id=profile.session_id,
            session_items=list(profile.session_items),
            last_ts=profile.last_ts,
        )

    def seen(self, event: BehaviorEvent, digest: str) -> EventFold | None:
        """`_DUPLICATE` for a re-delivery, a conflict for a known id with other content, None
        for an event not seen (among the remembered ids)."""
        ids = self.recent_event_ids
        try:
            at = ids.index(event.event_id)
        except ValueError:
            return None
        known = at - (len(ids) - len(self.recent_event_digests))
        if known < 0 or self.recent_event_digests[known] == digest:
            return _DUPLICATE
        reason = (
            f"event_id {event.event_id!r} was already folded for user {event.user_id!r} with "
            "other content (item, type, time, session or quantity): a conflicting duplicate, "
            "not a re-delivery"
        )
        return EventFold(changed=False, conflict=reason)

    def remember(self, event_id: str, digest: str, size: int) -> None:
        """Remember a folded event's id and digest, the newest `size` of them."""
        self.recent_event_ids.append(event_id)
        self.recent_event_digests.append(digest)
        del self.recent_event_ids[:-size]
        del self.recent_event_digests[:-size]

    def profile(self) -> UserProfile:
        """The folded profile; it takes these lists, so fold nothing more into this state."""
        # model_construct: every value comes from a validated event or profile; validating
        # again was a large share of the fold's cost.
        return UserProfile.model_construct(
            user_id=self.user_id,
            history=self.history,
            recent_event_ids=self.recent_event_ids,
            recent_event_digests=self.recent_event_digests,
            session_id=self.session_id,
            session_items=self.session_items,
            last_ts=self.last_ts,
        )


def _same_basket(state: _Folding, event: BehaviorEvent, config: FoldConfig) -> bool:
    if not state.session_items:
        return False
    if event.session_id is not None:
        return state.session_id == event.session_id
    if state.session_id is not None or state.last_ts is None:
        return False
    return abs(_ts(event.ts) - _ts(state.last_ts)) <= config.session_window_s


def _history_entry(
    history: list[HistoryEntry], event: BehaviorEvent, config: FoldConfig
) -> tuple[HistoryEntry, int | None]:
    """The event's item's entry with the event's weight folded in, and the position of the
    entry it replaces (None: a new item)."""
    weight = config.weights[event.event_type]
    at: int | None = None
    for i, h in enumerate(history):
        if h.item_id == event.item_id:
            at = i
            break
    if at is None:
        entry = HistoryEntry.model_construct(
            item_id=event.item_id,
            weight=weight,
            last_event_type=event.event_type,
            last_ts=event.ts,
            count=1,
        )
        return entry, None
    old = history[at]
    if event.ts >= old.last_ts:
        decayed = old.weight * decay_factor(_ts(event.ts) - _ts(old.last_ts), config.half_life_s)
        entry = HistoryEntry.model_construct(
            item_id=event.item_id,
            weight=decayed + weight,
            last_event_type=event.event_type,
            last_ts=event.ts,
            count=old.count + 1,
        )
    else:  # out of order: value the late event at the entry's time, keep the entry's recency
        late = weight * decay_factor(_ts(old.last_ts) - _ts(event.ts), config.half_life_s)
        entry = old.model_copy(update={"weight": old.weight + late, "count": old.count + 1})
    return entry, at


def _place(
    history: list[HistoryEntry], entry: HistoryEntry, replaces: int | None, history_size: int
) -> None:
    """Put `entry` into the history in place of the entry at `replaces`: most recent first,
    the touched entry first among equal timestamps, at most `history_size` entries. The rest
    is already in that order, so the entry is inserted (no sort); in-order events go in front."""
    if replaces is not None:
        del history[replaces]
    at = 0
    while at < len(history) and history[at].last_ts > entry.last_ts:
        at += 1
    history.insert(at, entry)
    del history[history_size:]


def _fold_into(state: _Folding, event: BehaviorEvent, config: FoldConfig) -> EventFold:
    """Fold one event into `state`; its context, read from the state before it. The event's
    history entry and context are computed before the state changes, so an event whose fold
    raises there leaves no trace."""
    digest = event_digest(event)
    seen = state.seen(event, digest)
    if seen is not None:
        return seen
    kind = config.basket_kinds[event.event_type]
    entry, replaces = _history_entry(state.history, event, config)
    if kind is None:  # a return: weight only, no basket, no sequence step
        context = _NO_CONTEXT
    else:
        context, session_items = _basket_context(state, event, kind, config)
        state.session_id = event.session_id
        state.session_items = session_items
    _place(state.history, entry, replaces, config.history_size)
    state.remember(event.event_id, digest, config.dedup_size)
    if state.last_ts is None or event.ts > state.last_ts:
        state.last_ts = event.ts
    return context


def _basket_context(
    state: _Folding, event: BehaviorEvent, kind: RelationKind, config: FoldConfig
) -> tuple[EventFold, list[str]]:
    """The basket and sequence context of a purchase or view event, read from the state
    before it, and the basket's items after it."""
    same = _same_basket(state, event, config)
    # A copy: the state's basket changes only once the whole fold of the event has been
    # computed, so an event whose fold raises leaves it as it was.
    session_items = list(state.session_items) if same else []
    in_session = event.item_id in session_items

    # Items of the basket that do not count for this kind: for a purchase basket, those whose
    # last event before this one was not a purchase (an item evicted from the history of a big
    # basket is assumed bought). A view session counts everything acted on. A set built once
    # per event: a call per basket item was a fifth of the fold on wholesale baskets.
    excluded: set[str] | frozenset[str] = frozenset()
    if session_items and kind != "also_viewed":
        excluded = {
            h.item_id for h in state.history if h.last_event_type not in config.purchase_types
        }

    # The basket's most recent `basket_pairs` matching items, oldest first: scanned from the
    # newest end and stopped there (a wholesale basket holds up to `session_size` items).
    newest_first: list[str] = []
    for item_id in reversed(session_items):
        if item_id != event.item_id and item_id not in excluded:
            newest_first.append(item_id)
            if len(newest_first) == config.basket_pairs:
                break
    basket_items = tuple(reversed(newest_first))
    already_counted = in_session and event.item_id not in excluded
    prior: tuple[str, ...] = ()
    bought: tuple[str, ...] = ()
    if not in_session:
        members = set(session_items)
        # Transition sources: the items acted on just before, the basket's earlier items
        # included (the order in which a basket is filled is a sequence too).
        prior = tuple(
            itertools.islice(
                (h.item_id for h in state.history if h.item_id != event.item_id),
                config.history_window,
            )
        )
        window: list[HistoryEntry] = []
        for h in state.history:
            if h.item_id != event.item_id and h.item_id not in members:
                window.append(h)
                if len(window) == config.history_window:
                    break
        if kind == "bought_together":
            bought = tuple(
                h.item_id
                for h in window
                if h.last_event_type in config.purchase_types and h.weight > 0
            )
        session_items.append(event.item_id)
        del session_items[: -config.session_size]
    if already_counted:
        return _NO_CONTEXT, session_items
    context = EventFold(
        changed=True,
        basket_items=basket_items,
        prior_items=prior,
        basket_kind=kind,
        sequence_step=not in_session,
        new_basket=not basket_items,
        bought_items=bought,
    )
    return context, session_items


def fold_event(profile: UserProfile | None, event: BehaviorEvent, config: FoldConfig) -> FoldResult:
    """Fold one event into a profile (None: a new user); returns the new profile and the
    basket/sequence context that the association statistics consume. A duplicate (or a
    conflicting one, `conflict` set) returns the same profile."""
    state = _Folding.of(profile or UserProfile(user_id=event.user_id))
    context = _fold_into(state, event, config)
    if not context.changed:
        return FoldResult(
            profile=profile or state.profile(), changed=False, conflict=context.conflict
        )
    return FoldResult(
        profile=state.profile(),
        changed=True,
        basket_items=context.basket_items,
        prior_items=context.prior_items,
        basket_kind=context.basket_kind,
        sequence_step=context.sequence_step,
        new_basket=context.new_basket,
        bought_items=context.bought_items,
    )


@dataclass(slots=True)
class UserFold:
    """One user's events of a batch folded in order: the resulting profile, the context of
    each event that changed it (with its position in the events given), the duplicates
    skipped, the conflicting duplicates (a known id with other content: position and reason)
    and the events whose fold raised (a bug: set aside so the others still count)."""

    profile: UserProfile | None
    changed: list[tuple[int, EventFold]] = field(default_factory=list)
    duplicates: int = 0
    conflicts: list[tuple[int, str]] = field(default_factory=list)
    failed: list[tuple[int, Exception]] = field(default_factory=list)


def fold_user_events(
    profile: UserProfile | None, events: Sequence[BehaviorEvent], config: FoldConfig
) -> UserFold:
    """Fold one user's events of a batch, in order, into `profile` (None: a new user); one
    `UserProfile` is built at the end, none per event."""
    fold = UserFold(profile=profile)
    if not events:
        return fold
    state = _Folding.of(profile or UserProfile(user_id=events[0].user_id))
    for at, event in enumerate(events):
        try:
            context = _fold_into(state, event, config)
        except Exception as exc:  # a bug in the fold: the caller dead-letters this event
            fold.failed.append((at, exc))
            continue
        if context.conflict is not None:
            fold.conflicts.append((at, context.conflict))
            continue
        if not context.changed:
            fold.duplicates += 1
            continue
        fold.changed.append((at, context))
    if fold.changed:
        fold.profile = state.profile()
    return fold


def profile_update(
    profile: UserProfile,
    *,
    trigger_event_ids: list[str],
    source_ts_ms: int,
    now: datetime,
    event: BehaviorEvent,
) -> ProfileUpdate:
    """The message handed to the recommender after `event` changed `profile`."""
    return ProfileUpdate(
        user_id=profile.user_id,
        history=list(profile.history),
        last_event_type=event.event_type,
        last_item_id=event.item_id,
        trigger_event_ids=trigger_event_ids,
        source_ts_ms=source_ts_ms,
        updated_at=now,
    )
