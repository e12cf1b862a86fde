"""An item's neighbours from the association statistics: scores, evidence, the related-items
list the association agent publishes, when a list changed materially, and `AssociationIndex`,
the statistics in memory for offline evaluation (pure logic).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from schemas import vocabulary
from schemas.messages import BehaviorEvent, Evidence, RelatedItems, RelationKind

from .association import (
    SUPPORT_TOLERANCE,
    AssociationConfig,
    AssociationInput,
    ItemRecord,
    Lookup,
    TotalsRecord,
    apply_inputs,
    decayed,
    upgraded,
)
from .profile import EventFold


def item_count(record: ItemRecord | None, kind: str, now: float, half_life_s: float) -> float:
    """Decayed number of baskets/sessions/steps holding the item, at `now`."""
    if record is None:
        return 0.0
    return decayed(record, record["counts"].get(kind, 0.0), now, half_life_s)


def evidence_fields(
    pair: float,
    count_i: float,
    count_j: float,
    total: float,
    *,
    kind: RelationKind = "bought_together",
) -> dict[str, Any]:
    """Support, confidence P(j|i), lift and PMI (log2 lift) of a pair, with readable text: the
    fields of an `Evidence`.

    Counts may be decayed (fractional); support is reported rounded.
    """
    support = max(0, round(pair))
    confidence = min(1.0, pair / count_i) if count_i > 0 else None
    lift = pair * total / (count_i * count_j) if count_i > 0 and count_j > 0 and total > 0 else None
    pmi = math.log2(lift) if lift is not None and lift > 0 else None
    text = vocabulary.relation_kind(kind).support_text.format(n=support)
    if lift is not None:
        text += f", lift {lift:.1f}"
    return {
        "support": support,
        "confidence": None if confidence is None else max(0.0, confidence),
        "lift": None if lift is None else max(0.0, lift),
        "pmi": pmi,
        "text": text,
    }


def association_evidence(
    pair: float,
    count_i: float,
    count_j: float,
    total: float,
    *,
    kind: RelationKind = "bought_together",
) -> Evidence:
    """`evidence_fields` as a validated `Evidence`."""
    return Evidence.model_validate(evidence_fields(pair, count_i, count_j, total, kind=kind))


# kind -> item id -> decayed item count at one `now`: what `partner_scores` looked up already.
CountMemo = dict[str, dict[str, float]]


def partner_scores(
    record: ItemRecord,
    *,
    kind: RelationKind,
    lookup: Lookup,
    now: float,
    config: AssociationConfig,
    memo: CountMemo | None = None,
) -> dict[str, tuple[float, float, float]]:
    """Scored partners of one kind: partner -> (score, lower-bound pair count, partner count).

    Score: the association cosine (Ochiai) of the lower-bound pair count,
    pair / sqrt(count_i * count_j), times the kind's weight. It rewards strength like lift but
    does not explode for rare partners; only pairs with support >= min_support qualify.

    `memo` keeps the partners' counts across calls at the same `now` (a flush scores many
    lists that share partners); a caller passes a fresh one per `now`.
    """
    h = config.half_life_s
    partners = upgraded(record)["partners"].get(kind)
    if not partners:
        return {}
    errors = record["errors"].get(kind) or {}
    count_i = item_count(record, kind, now, h)
    weight = config.kind_weights.get(kind, 1.0)
    factor = decayed(record, 1.0, now, h)
    known: dict[str, float] = {} if memo is None else memo.setdefault(kind, {})
    min_support = config.min_support
    out: dict[str, tuple[float, float, float]] = {}
    for partner, count in partners.items():
        lower = (count - errors.get(partner, 0.0)) * factor
        if lower * SUPPORT_TOLERANCE < min_support:
            continue
        count_j = known.get(partner)
        if count_j is None:
            count_j = known[partner] = item_count(lookup(partner), kind, now, h)
        denominator = math.sqrt(max(count_i, lower) * max(count_j, lower))
        out[partner] = (weight * lower / denominator if denominator > 0 else 0.0, lower, count_j)
    return out


# (score, partner, kind, lower-bound pair count, partner count): one ranked neighbour.
Scored = tuple[float, str, RelationKind, float, float]


def top_partners(
    record: ItemRecord,
    *,
    lookup: Lookup,
    now: float,
    config: AssociationConfig,
    kinds: Iterable[RelationKind] | None = None,
    memo: CountMemo | None = None,
) -> list[Scored]:
    """The top-N scored neighbours of one item over the given kinds, best first (no
    evidence objects: cheap enough to check every touched item for a material change).

    Every kind present is first given an equal share of the N places, so that a kind with
    many strong pairs (a wholesaler's baskets) does not crowd the others out of the list; a
    sequence kind fills its share with the item's most frequent successors (the transition
    probabilities the ranking reads), the others with their best scores. Places a kind leaves
    unused go to the best remaining neighbours by score."""
    by_kind: list[list[Scored]] = []
    for kind in vocabulary.behaviour_kinds() if kinds is None else kinds:
        found = [
            (score, partner, kind, lower, count_j)
            for partner, (score, lower, count_j) in partner_scores(
                record, kind=kind, lookup=lookup, now=now, config=config, memo=memo
            ).items()
        ]
        if not found:
            continue
        if vocabulary.relation_kind(kind).signal == "sequence":
            found.sort(key=lambda s: (-s[3], -s[0], s[1]))
        else:
            found.sort(key=lambda s: (-s[0], s[1]))
        by_kind.append(found)
    if not by_kind:
        return []
    share = config.top_n // len(by_kind)
    chosen = [s for found in by_kind for s in found[:share]]
    rest = [s for found in by_kind for s in found[share:]]
    rest.sort(key=lambda s: (-s[0], s[1], s[2]))
    chosen += rest[: config.top_n - len(chosen)]
    chosen.sort(key=lambda s: (-s[0], s[1], s[2]))
    return chosen


def related_items(
    record: ItemRecord,
    *,
    lookup: Lookup,
    totals: TotalsRecord | None,
    now: float,
    config: AssociationConfig,
    kinds: Iterable[RelationKind] | None = None,
    top: Sequence[Scored] | None = None,
) -> RelatedItems:
    """Top-N neighbours of one item over the given kinds, each with its evidence (`top`:
    the item's `top_partners` at `now`, when the caller has them already)."""
    h = config.half_life_s
    if top is None:
        top = top_partners(record, lookup=lookup, now=now, config=config, kinds=kinds)
    related: list[dict[str, Any]] = []
    # (the item's count, the kind's total) per kind: the same for every neighbour of a kind
    counts: dict[str, tuple[float, float]] = {}
    for score, partner, kind, lower, count_j in top:
        found = counts.get(kind)
        if found is None:
            total = (
                0.0 if totals is None else decayed(totals, totals["counts"].get(kind, 0.0), now, h)
            )
            found = counts[kind] = (item_count(record, kind, now, h), total)
        related.append(
            {
                "item_id": partner,
                "kind": kind,
                "score": score,
                "evidence": evidence_fields(lower, found[0], count_j, found[1], kind=kind),
            }
        )
    main_kind = "bought_together" if "bought_together" in record["counts"] else "next_item"
    # One validation of the whole tree (pydantic-core, in one call): half the time of building
    # the 100 nested models one by one without validation.
    return RelatedItems.model_validate(
        {
            "item_id": record["item_id"],
            "item_count": max(0.0, item_count(record, main_kind, now, h)),
            "related": related,
            "updated_at": datetime.fromtimestamp(now, tz=UTC),
        }
    )


Membership = frozenset[tuple[str, str]]


def membership(top: Iterable[Scored]) -> Membership:
    """The (item, kind) pairs of a top list."""
    return frozenset((partner, kind) for _, partner, kind, _, _ in top)


def membership_changed(before: Membership | None, after: Membership, threshold: float) -> bool:
    """True when at least `threshold` of the top list (item, kind) changed membership
    (a first list counts as changed when it is not empty)."""
    if before is None:
        return bool(after)
    if before == after:
        return False
    changed = 1.0 - len(before & after) / max(len(before), len(after))
    return changed >= threshold if threshold > 0 else True


def material_change(old: RelatedItems | None, new: RelatedItems, threshold: float) -> bool:
    """Republish when at least `threshold` of the top list (item, kind) changed membership."""
    before = None if old is None else frozenset((r.item_id, r.kind) for r in old.related)
    return membership_changed(
        before, frozenset((r.item_id, r.kind) for r in new.related), threshold
    )


def record_size(record: ItemRecord) -> int:
    """Number of partner entries held (the bounded part of the state)."""
    return sum(len(p) for p in record["partners"].values())


class AssociationIndex:
    """In-memory item records plus totals: the live statistics, for offline evaluation."""

    def __init__(self, config: AssociationConfig) -> None:
        self.config = config
        self.items: dict[str, ItemRecord] = {}
        self.totals: TotalsRecord | None = None
        self.last_ts = 0.0
        # Item id -> event time of the last input that touched its record: the clock the
        # association agent published its list at (the compacted topic keeps that list until
        # the item is touched again).
        self.touched_at: dict[str, float] = {}

    def observe(self, inp: AssociationInput) -> set[str]:
        """Apply one input; returns the ids of the item records it touched."""
        return self.observe_batch((inp,))

    def observe_batch(self, inputs: Iterable[AssociationInput]) -> set[str]:
        """Apply inputs in order (as the live agent does per batch); returns touched ids."""
        inputs = tuple(inputs)
        touched, self.totals = apply_inputs(
            inputs, lookup=self.items.get, totals=self.totals, config=self.config
        )
        self.items.update(touched)
        self.last_ts = max(self.last_ts, *(inp.ts for inp in inputs), 0.0)
        for item_id in touched:
            self.touched_at[item_id] = self.last_ts
        return set(touched)

    def observe_event(self, result: EventFold, event: BehaviorEvent) -> set[str]:
        """Consume one fold result (no-op for duplicates and returns)."""
        inp = AssociationInput.from_fold(result, event)
        return set() if inp is None else self.observe(inp)

    def related(
        self,
        item_id: str,
        *,
        now: float | None = None,
        kinds: Iterable[RelationKind] | None = None,
    ) -> RelatedItems | None:
        record = self.items.get(item_id)
        if record is None:
            return None
        return related_items(
            record,
            lookup=self.items.get,
            totals=self.totals,
            now=self.last_ts if now is None else now,
            config=self.config,
            kinds=kinds,
        )

    def published(self, item_id: str) -> RelatedItems | None:
        """The item's list as the association agent last published it: at the clock of the
        last input that touched it, not decayed further (a list on the compacted topic is not
        republished while its item sees no new behaviour)."""
        return self.related(item_id, now=self.touched_at.get(item_id, self.last_ts))

    def scores(
        self, item_id: str, *, kind: RelationKind, now: float | None = None
    ) -> dict[str, float]:
        """Partner -> score of one kind (the same score that `related` ranks by)."""
        record = self.items.get(item_id)
        if record is None:
            return {}
        found = partner_scores(
            record,
            kind=kind,
            lookup=self.items.get,
            now=self.last_ts if now is None else now,
            config=self.config,
        )
        return {partner: value[0] for partner, value in found.items()}

    def state_size(self) -> int:
        return sum(record_size(r) for r in self.items.values())
