"""Streaming association statistics with bounded memory and time decay (pure logic).

State is one plain-dict record per item (`ItemRecord`, JSON-serialisable for a Faust table)
plus one global `TotalsRecord`. The live association agent and offline evaluation
(`streams.neighbours.AssociationIndex`) run exactly these functions; `streams.neighbours` reads
an item's neighbours from them.

Kinds: `bought_together` (items of one purchase/add-to-cart basket), `also_viewed` (items of
one view/click session), `next_item` (directed: an earlier history item -> the new item,
weighted 1/(1+distance) in the history) and `also_bought` (symmetric: a newly bought item and
the user's earlier bought items, weighted 1/(1+distance): "customers who bought this also
bought"; it fills where baskets are single items, e.g. one review a day).

Decay: forward decay in event time. A record stores counts scaled by 2^((t - landmark)/h), so
an update touches only the entries it changes; reading at time `now` multiplies by
2^(-(now - landmark)/h). The landmark moves forward (and the record is rescaled) only when the
scale would grow past 2^30.

Exactly once over re-delivery: every record (and the totals) carries `applied`, per
association-input partition the offset of the last input message folded into it, and a
positioned fold (`AssociationFold.apply` with positions) skips, per record, the inputs of
messages at or below it. Each record's changelog entry holds its own watermark, so a crash
after some of a window's records were written and before its input offsets were committed
re-applies the re-delivered inputs to exactly the records that lack them. This needs each
partition's messages folded in offset order, none left out (a watermark says that everything up
to it is held); the live agent holds back any message that arrives past a gap and reads the
partition again from it (`streams.associations_agent.InputCursor`).

Bounded memory (the approximation): at most `capacity` partners per item and kind, kept with
a batched Space-Saving / lossy-counting rule. When a new partner arrives at a full list, the
weakest quarter of the list (ties included) is dropped at once (one sort per capacity/4
insertions instead of a minimum search per insertion) and the largest dropped count becomes the list's `floor`.
A partner admitted later starts at floor + its weight, with the floor recorded as its
over-estimation error. Floors never decrease, so for every kept count c with error e,
c - e <= true count <= c, and every partner whose true count exceeds the list's current floor
is in the list (a dropped partner's true count is at most the floor it was dropped under).
Published support uses the lower bound c - e, so a re-admitted partner never looks stronger
than it is. The floor is small when a few partners dominate, as co-occurrence lists do; a hot
item co-occurring with millions of items therefore holds at most `capacity` partners per kind.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NotRequired, TypedDict

from schemas import vocabulary
from schemas.messages import (
    BehaviorEvent,
    RelationKind,
)
from schemas.settings import StreamsSettings

from .profile import EventFold

# Rescale a record once its forward-decay scale passes 2^30: far from float overflow.
_MAX_SCALE_EXPONENT = 30.0
# Decay arithmetic leaves 2.0 as 1.9999999999: compare supports with a relative tolerance.
SUPPORT_TOLERANCE = 1.0 + 1e-9


class ItemRecord(TypedDict):
    """Association state of one item: counts and partners, forward-decay scaled.

    Every leaf is a float in a dict keyed by strings: such dicts are never tracked by the
    cyclic garbage collector. Partner entries used to be [count, error] lists (`_upgraded`
    converts such records): millions of tracked objects that every full collection walked,
    half of the fold's time.
    """

    item_id: str
    landmark: float
    counts: dict[str, float]
    # kind -> partner item id -> scaled count
    partners: dict[str, dict[str, float]]
    # kind -> partner item id -> scaled over-estimation error, for the partners admitted over a
    # floor (absent: 0)
    errors: dict[str, dict[str, float]]
    # kind -> scaled count of the strongest partner ever dropped (admission error of newcomers)
    floors: dict[str, float]
    # association-input partition (as a string) -> offset of the last message folded into this
    # record (absent: none, as in records of an earlier relata and of offline folds)
    applied: NotRequired[dict[str, int]]


class TotalsRecord(TypedDict):
    """Global decayed totals per kind: baskets, sessions, sequence steps."""

    landmark: float
    counts: dict[str, float]
    # as ItemRecord.applied
    applied: NotRequired[dict[str, int]]


@dataclass(frozen=True, slots=True)
class AssociationConfig:
    """Parameters of the statistics; `from_settings` keeps live and offline identical."""

    half_life_s: float
    top_n: int = 50
    capacity: int = 200
    min_support: float = 2.0
    republish_change: float = 0.2
    # How much each kind counts in the related-items score (bought together is the strongest).
    kind_weights: Mapping[str, float] = field(
        default_factory=lambda: {
            "bought_together": 1.0,
            "also_bought": 0.8,
            "next_item": 0.8,
            "also_viewed": 0.5,
        }
    )

    def __post_init__(self) -> None:
        if self.half_life_s <= 0 or self.top_n < 1 or self.capacity < self.top_n:
            msg = "AssociationConfig needs half_life_s > 0, top_n >= 1 and capacity >= top_n"
            raise ValueError(msg)

    @classmethod
    def from_settings(cls, settings: StreamsSettings) -> AssociationConfig:
        return cls(
            half_life_s=settings.assoc_half_life_days * 86400.0,
            top_n=settings.assoc_top_n,
            capacity=4 * settings.assoc_top_n,
            min_support=float(settings.assoc_min_support),
            republish_change=settings.assoc_republish_change,
        )


@dataclass(frozen=True, slots=True)
class AssociationInput:
    """What one folded event contributes; travels on the internal association-input topic."""

    item_id: str
    ts: float
    kind: RelationKind | None
    basket_items: tuple[str, ...] = ()
    prior_items: tuple[str, ...] = ()
    sequence_step: bool = False
    new_basket: bool = False
    # Earlier bought items of the user (most recent first): the partners of `also_bought`.
    bought_items: tuple[str, ...] = ()
    # The behaviour event it comes from: (behavior-events partition, offset). The fold keys
    # its re-delivery check by it, so an input sent again after a crash of the profiles role
    # (under a new association-input offset) is still recognised.
    source: tuple[int, int] | None = None

    @classmethod
    def from_fold(
        cls, result: EventFold, event: BehaviorEvent, *, source: tuple[int, int] | None = None
    ) -> AssociationInput | None:
        """None when the event adds nothing (duplicate, return, repeat within a basket);
        `source`: where the event was read."""
        if not result.changed or (result.basket_kind is None and not result.sequence_step):
            return None
        return cls(
            item_id=event.item_id,
            ts=event.ts.timestamp(),
            kind=result.basket_kind,
            basket_items=result.basket_items,
            prior_items=result.prior_items,
            sequence_step=result.sequence_step,
            new_basket=result.new_basket,
            bought_items=result.bought_items,
            source=source,
        )

    def to_dict(self) -> dict[str, Any]:
        source = {} if self.source is None else {"source": list(self.source)}
        return source | {
            "item_id": self.item_id,
            "ts": self.ts,
            "kind": self.kind,
            "basket_items": list(self.basket_items),
            "prior_items": list(self.prior_items),
            "sequence_step": self.sequence_step,
            "new_basket": self.new_basket,
            "bought_items": list(self.bought_items),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AssociationInput:
        kind = data.get("kind")
        valid = vocabulary.behaviour_kinds()
        if kind is not None and kind not in valid:
            msg = f"unknown association kind {kind!r}; valid: {list(valid)}"
            raise ValueError(msg)
        ts = float(data["ts"])
        if not math.isfinite(ts):
            msg = f"association input ts must be a finite number, got {ts}"
            raise ValueError(msg)
        return cls(
            item_id=str(data["item_id"]),
            ts=ts,
            kind=kind,
            basket_items=tuple(str(i) for i in data.get("basket_items", ())),
            prior_items=tuple(str(i) for i in data.get("prior_items", ())),
            sequence_step=bool(data.get("sequence_step", False)),
            new_basket=bool(data.get("new_basket", False)),
            bought_items=tuple(str(i) for i in data.get("bought_items", ())),
            source=_source(data.get("source")),
        )


def _source(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in value)
    ):
        msg = f"association input source must be [partition, offset], got {value!r}"
        raise ValueError(msg)
    return (value[0], value[1])


@dataclass(frozen=True, slots=True)
class InputPosition:
    """Where an input was read, as a record's `applied` watermark keys it: `stream` names
    the ordered stream (a behavior-events partition `e<p>` for inputs that name their source
    event; else the association-input partition, for inputs of older producers), `offset` the
    position in it."""

    stream: str
    offset: int
    # True: the position is the input's own (its source event), never shared with another
    # input; False: the message's, shared by every input of that message.
    own: bool = False

    @classmethod
    def of(cls, inp: AssociationInput, *, partition: int, offset: int) -> InputPosition:
        """The position of `inp`, read from association-input `partition` at `offset`."""
        if inp.source is not None:
            return cls(f"e{inp.source[0]}", inp.source[1], own=True)
        return cls(str(partition), offset)


@dataclass(slots=True)
class ItemDelta:
    """Changes to one item's record from one input: count increments and pair increments."""

    counts: dict[str, float] = field(default_factory=dict)
    pairs: list[tuple[str, str, float]] = field(default_factory=list)  # (kind, partner, weight)


# (item, kind, partner, amount): one record update of an input; partner None adds to the
# item's count of the kind, a partner to the pair's count.
Update = tuple[str, str, str | None, float]


def sequence_weight(distance: int) -> float:
    """Weight of a transition from the history item `distance` steps back (0 = most recent)."""
    return 1.0 / (1.0 + distance)


def input_updates(inp: AssociationInput) -> Iterator[Update]:
    """The record updates one input implies, in application order: (item, kind, None, amount)
    adds to the item's count of a kind, (item, kind, partner, weight) to a pair's count.
    An item's own updates keep this order wherever they are applied (`apply_inputs`,
    `plan_updates`); the order across items does not matter (records are independent)."""
    item = inp.item_id
    kind = inp.kind
    if kind is not None:
        yield item, kind, None, 1.0
        for other in inp.basket_items:
            if other != item:
                yield item, kind, other, 1.0
                yield other, kind, item, 1.0
    if inp.sequence_step:
        yield item, "next_item", None, 1.0
        for distance, source in enumerate(inp.prior_items):
            if source != item:
                yield source, "next_item", item, sequence_weight(distance)
        if kind == "bought_together":
            # Every bought sequence step counts (first purchases too), so that the cosine's
            # denominator is the item's number of bought steps.
            yield item, "also_bought", None, 1.0
            for distance, source in enumerate(inp.bought_items):
                if source != item:
                    weight = sequence_weight(distance)
                    yield item, "also_bought", source, weight
                    yield source, "also_bought", item, weight


def plan_updates(inp: AssociationInput) -> dict[str, ItemDelta]:
    """`input_updates` grouped by item; apply each with `update_item`."""
    deltas: dict[str, ItemDelta] = {}
    for item_id, kind, partner, amount in input_updates(inp):
        delta = deltas.get(item_id)
        if delta is None:
            delta = deltas[item_id] = ItemDelta()
        if partner is None:
            delta.counts[kind] = delta.counts.get(kind, 0.0) + amount
        else:
            delta.pairs.append((kind, partner, amount))
    return deltas


# An item record by id (None: the item has none yet).
Lookup = Callable[[str], ItemRecord | None]


def new_item_record(item_id: str, ts: float) -> ItemRecord:
    return {
        "item_id": item_id,
        "landmark": ts,
        "counts": {},
        "partners": {},
        "errors": {},
        "floors": {},
    }


def new_totals_record(ts: float) -> TotalsRecord:
    return {"landmark": ts, "counts": {}}


def _scale_at(record: ItemRecord | TotalsRecord, ts: float, half_life_s: float) -> float:
    """The record's forward-decay scale at `ts`, rescaling it first (landmark moved to `ts`)
    when the scale would pass 2^30."""
    exponent = (ts - record["landmark"]) / half_life_s
    if exponent <= _MAX_SCALE_EXPONENT:
        return math.pow(2.0, exponent)
    factor = math.pow(2.0, -exponent)
    record["counts"] = {k: v * factor for k, v in record["counts"].items()}
    for field_name in ("partners", "errors"):  # a TotalsRecord has neither
        by_kind: dict[str, dict[str, float]] = record.get(field_name, {})  # type: ignore[assignment]
        for kind, values in by_kind.items():
            by_kind[kind] = {p: v * factor for p, v in values.items()}
    floors: dict[str, float] = record.get("floors", {})  # type: ignore[assignment]  # TotalsRecord has none
    for kind in floors:
        floors[kind] *= factor
    record["landmark"] = ts
    return 1.0


def decayed(
    record: ItemRecord | TotalsRecord, value: float, now: float, half_life_s: float
) -> float:
    """A stored (scaled) value of `record` as a decayed count at `now` (never before the
    record's landmark: no negative decay)."""
    return value * math.pow(2.0, -max(0.0, now - record["landmark"]) / half_life_s)


def _prune(record: ItemRecord, kind: str, capacity: int) -> dict[str, float]:
    """Drop the weakest quarter of a full list (the floor becomes the largest dropped count);
    returns the kept list, which replaces it in the record.

    The kept partners go to a new dict (in their order) rather than being deleted from the old
    one: a dict that has had many deletions still iterates over their slots until it is
    resized, and on the live stream a long-tailed item's list is pruned over and over."""
    partners = record["partners"][kind]
    threshold = sorted(partners.values())[max(1, capacity // 4) - 1]
    kept = {p: count for p, count in partners.items() if count > threshold}
    record["partners"][kind] = kept
    errors = record["errors"].get(kind)
    if errors:
        record["errors"][kind] = {p: e for p, e in errors.items() if p in kept}
    record["floors"][kind] = max(record["floors"].get(kind, 0.0), threshold)
    return kept


def _add_pair(record: ItemRecord, kind: str, partner: str, amount: float, capacity: int) -> None:
    """Add a scaled amount to one pair of the record (admitting the partner at the list's
    floor, after pruning a full list)."""
    all_partners = record["partners"]
    partners = all_partners.get(kind)
    if partners is None:
        partners = all_partners[kind] = {}
    count = partners.get(partner)
    if count is not None:
        partners[partner] = count + amount
        return
    if len(partners) >= capacity:
        partners = _prune(record, kind, capacity)
    floor = record["floors"].get(kind, 0.0)
    partners[partner] = floor + amount
    if floor:
        errors = record["errors"].get(kind)
        if errors is None:
            errors = record["errors"][kind] = {}
        errors[partner] = floor


def _stored(record: ItemRecord | None, item_id: str, ts: float) -> ItemRecord:
    """A record to update: a new one for an unseen item, else the record in this format."""
    return new_item_record(item_id, ts) if record is None else upgraded(record)


def upgraded(record: ItemRecord) -> ItemRecord:
    """The record in this format, converted in place when an earlier relata wrote it (partner
    entries [count, error], no `errors`; before that, no `floors` either)."""
    if "errors" in record:
        return record
    record.setdefault("floors", {})
    errors: dict[str, dict[str, float]] = {}
    all_partners: dict[str, Any] = record["partners"]  # kind -> partner -> [count, error]
    for kind, entries in all_partners.items():
        all_partners[kind] = {p: float(entry[0]) for p, entry in entries.items()}
        found = {p: float(entry[1]) for p, entry in entries.items() if entry[1]}
        if found:
            errors[kind] = found
    record["errors"] = errors
    return record


def update_item(
    record: ItemRecord | None,
    *,
    item_id: str,
    delta: ItemDelta,
    ts: float,
    config: AssociationConfig,
) -> ItemRecord:
    """Apply one item's delta at event time `ts`; mutates and returns the record (a new one
    when `record` is None)."""
    record = _stored(record, item_id, ts)
    scale = _scale_at(record, ts, config.half_life_s)
    counts = record["counts"]
    for kind, amount in delta.counts.items():
        counts[kind] = counts.get(kind, 0.0) + amount * scale
    for kind, partner, amount in delta.pairs:
        _add_pair(record, kind, partner, amount * scale, config.capacity)
    return record


def update_totals(
    record: TotalsRecord | None, inp: AssociationInput, config: AssociationConfig
) -> TotalsRecord:
    """Count a new basket/session and a sequence step in the global totals."""
    if record is None:
        record = new_totals_record(inp.ts)
    scale = _scale_at(record, inp.ts, config.half_life_s)
    counts = record["counts"]
    if inp.kind is not None and inp.new_basket:
        counts[inp.kind] = counts.get(inp.kind, 0.0) + scale
    if inp.sequence_step:
        counts["next_item"] = counts.get("next_item", 0.0) + scale
        if inp.kind == "bought_together":
            counts["also_bought"] = counts.get("also_bought", 0.0) + scale
    return record


# The records an input updates, each with its scale at the input's time (one scale per record
# and input, as when its updates are applied together: `update_item`); None: the record
# already holds the input's message (re-delivered), its updates are skipped.
_Scaled = dict[str, tuple[ItemRecord, float] | None]


class AssociationFold:
    """One fold of inputs into the item records and the totals, over one or more `apply`
    calls (the live agent applies a window in slices); `touched` holds each changed record
    once, for the caller to store.

    With positions, an input updates a record only when the record does not already hold
    it. An input that names its source event has a position of its own (the event's
    behavior-events partition and offset): it is skipped wherever the record's `applied`
    watermark for that partition has reached it, so one re-sent by the profiles role after a
    crash, in another message, counts once. An input of an older producer has its message's
    position, shared with the message's other inputs: the comparison is then with the
    record's watermark as loaded, before this fold, so the inputs of one message that touch a
    record several times (or across two `apply` calls) all count. Loaded records always hold
    whole messages (a caller stores records only between messages), so the result equals a
    clean fold of each input once.
    """

    __slots__ = (
        "_before",
        "_loaded",
        "_lookup",
        "_totals_before",
        "config",
        "skipped",
        "totals",
        "touched",
    )

    def __init__(
        self, *, lookup: Lookup, totals: TotalsRecord | None, config: AssociationConfig
    ) -> None:
        self.config = config
        self.totals = totals
        self.touched: dict[str, ItemRecord] = {}
        # Items whose record already held a re-delivered input (not changed by it).
        self.skipped: set[str] = set()
        self._lookup = lookup
        # Records read so far (changed or not), and their `applied` offsets as loaded.
        self._loaded: dict[str, ItemRecord] = {}
        self._before: dict[str, dict[str, int]] = {}
        self._totals_before: dict[str, int] = dict(totals.get("applied", {})) if totals else {}

    def _record(self, item_id: str, ts: float) -> ItemRecord:
        record = self._loaded.get(item_id)
        if record is None:
            record = self._loaded[item_id] = _stored(self._lookup(item_id), item_id, ts)
            self._before[item_id] = dict(record.get("applied", {}))
        return record

    def apply(
        self,
        inputs: Sequence[AssociationInput],
        positions: Sequence[InputPosition] | None = None,
    ) -> None:
        """Apply inputs in order (each item's deltas at their own event time); `positions[i]`
        is the message of `inputs[i]` (None: no re-delivery check, no watermark). Records from
        `lookup` are mutated."""
        if positions is not None and len(positions) != len(inputs):
            msg = f"{len(positions)} positions for {len(inputs)} inputs: one per input"
            raise ValueError(msg)
        touched, skipped, before = self.touched, self.skipped, self._before
        half_life_s, capacity = self.config.half_life_s, self.config.capacity
        for at, inp in enumerate(inputs):
            ts = inp.ts
            position = None if positions is None else positions[at]
            partition = "" if position is None else position.stream
            scaled: _Scaled = {}
            for item_id, kind, partner, amount in input_updates(inp):
                found = scaled.get(item_id)
                if found is None:
                    if item_id in scaled:  # the record already holds this input
                        continue
                    record = self._record(item_id, ts)
                    if position is not None:
                        # An input's own position is held once folded, in this fold too; a
                        # message's position only as loaded (its other inputs still count).
                        held = record.get("applied", {}) if position.own else before[item_id]
                        if held.get(partition, -1) >= position.offset:
                            skipped.add(item_id)
                            scaled[item_id] = None
                            continue
                        record.setdefault("applied", {})[partition] = position.offset
                    found = scaled[item_id] = (record, _scale_at(record, ts, half_life_s))
                    touched[item_id] = record
                record, scale = found
                if partner is None:
                    counts = record["counts"]
                    counts[kind] = counts.get(kind, 0.0) + amount * scale
                else:
                    _add_pair(record, kind, partner, amount * scale, capacity)
            if position is None:
                self.totals = update_totals(self.totals, inp, self.config)
            elif self._totals_held(position).get(partition, -1) < position.offset:
                totals = self.totals = update_totals(self.totals, inp, self.config)
                totals.setdefault("applied", {})[partition] = position.offset

    def _totals_held(self, position: InputPosition) -> Mapping[str, int]:
        """The totals' watermarks an input is compared with (see `apply`)."""
        if not position.own:
            return self._totals_before
        return self.totals.get("applied", {}) if self.totals is not None else {}


def apply_inputs(
    inputs: Iterable[AssociationInput],
    *,
    lookup: Lookup,
    totals: TotalsRecord | None,
    config: AssociationConfig,
    positions: Sequence[InputPosition] | None = None,
) -> tuple[dict[str, ItemRecord], TotalsRecord | None]:
    """Apply a batch of inputs in order; returns each touched record once, and the totals.

    The result is exactly that of applying the inputs one by one (each item's deltas are
    applied in input order at their own event time); only the state reads and writes are
    batched: the caller stores each returned record once. Records from `lookup` are mutated.
    With `positions` (one per input: its association-input message), inputs a record already
    holds are skipped for it (`AssociationFold`).
    """
    fold = AssociationFold(lookup=lookup, totals=totals, config=config)
    fold.apply(tuple(inputs), positions)
    return fold.touched, fold.totals
