"""Business rules applied to one user's scored, available candidates (pure).

Order: filters (keep only, exclude), then boosts and buries (scores multiplied, re-sorted),
then the cap per category; the core then picks the k (MMR or score order) and places the
pinned items (`schemas.reranking.place_pins`). When the filters remove every candidate the candidates are kept
unfiltered (`fell_back`), so a list is never emptied by a rule.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from schemas.rules import BusinessRules

Attributes = Mapping[str, Mapping[str, Any]]


class Ruled(NamedTuple):
    items: list[tuple[str, float]]  # best first, boosted scores
    fell_back: bool  # the filters removed every candidate: they were not applied


def apply_rules(
    pool: Sequence[tuple[str, float]], attributes: Attributes, rules: BusinessRules
) -> Ruled:
    """The candidates (best first) after the filters, boosts and the category cap."""
    kept = [
        (i, s)
        for i, s in pool
        if (rules.only is None or rules.only.matches(i, attributes.get(i)))
        and not any(m.matches(i, attributes.get(i)) for m in rules.exclude)
    ]
    fell_back = bool(pool) and not kept
    if fell_back:
        kept = list(pool)
    if rules.boosts:
        boosted = []
        for i, s in kept:
            for boost in rules.boosts:
                if boost.when.matches(i, attributes.get(i)):
                    # Scores are >= 0 but for the vector floor: a factor then moves an item
                    # the intended way on either side of 0.
                    s = s * boost.factor if s >= 0 else s / boost.factor
            boosted.append((i, s))
        kept = sorted(boosted, key=lambda p: (-p[1], p[0]))
    if rules.max_per_category is not None:
        seen: dict[str, int] = {}
        capped = []
        for i, s in kept:
            categories = (attributes.get(i) or {}).get("categories") or ()
            if categories:
                first = categories[0]
                if seen.get(first, 0) >= rules.max_per_category:
                    continue
                seen[first] = seen.get(first, 0) + 1
            capped.append((i, s))
        kept = capped
    return Ruled(kept, fell_back)


def pins_of(rules: BusinessRules | None, placement: str) -> list[tuple[str, int]]:
    """The placement's pinned items with their 0-based positions, in position order."""
    if rules is None:
        return []
    return sorted(
        ((p.item_id, p.position - 1) for p in rules.pins.get(placement, ())), key=lambda p: p[1]
    )
