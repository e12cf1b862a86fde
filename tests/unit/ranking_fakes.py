"""Look-ups of the recommendation core from plain values, for unit tests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta

import numpy as np

from schemas.messages import Evidence, HistoryEntry, RelatedItem, RelatedItems
from workers.ranking import BlendWeights, Lookups, RelatedTable, popularity_prior

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def entry(item: str, *, weight: float = 8.0, age: int = 0) -> HistoryEntry:
    return HistoryEntry(
        item_id=item,
        weight=weight,
        last_event_type="purchase",
        last_ts=T0 - timedelta(hours=age),
        count=1,
    )


def related_list(source: str, *pairs: tuple[str, str, float, Evidence]) -> RelatedItems:
    return RelatedItems(
        item_id=source,
        item_count=10,
        related=[
            RelatedItem(item_id=i, kind=kind, score=s, evidence=ev) for i, kind, s, ev in pairs
        ],
        updated_at=T0,
    )


def lookups(
    *,
    vectors: Mapping[str, np.ndarray],
    related: Mapping[str, RelatedItems] | None = None,
    popularity: Sequence[tuple[str, float]] = (),
    available: set[str] | None = None,
    titles: Mapping[str, str] | None = None,
) -> Lookups:
    """Exact search over `vectors` (the user vector: the mean of the history's), every item
    available unless `available` says otherwise."""
    ids = list(vectors)
    matrix = np.stack([np.asarray(vectors[i], dtype=np.float32) for i in ids])
    live = set(ids) | {i for i, _ in popularity} if available is None else available

    def user_vectors(histories: Sequence[Sequence[HistoryEntry]]) -> list[np.ndarray | None]:
        out: list[np.ndarray | None] = []
        for h in histories:
            own = [vectors[e.item_id] for e in h if e.item_id in vectors]
            out.append(np.mean(own, axis=0).astype(np.float32) if own else None)
        return out

    def search(users: np.ndarray, excludes: list[set[str]]) -> list[list[tuple[str, float]]]:
        sims = users @ matrix.T
        return [
            [
                (ids[j], float(row[j]))
                for j in np.argsort(-row)
                if ids[j] not in skip and ids[j] in live
            ]
            for row, skip in zip(sims, excludes, strict=True)
        ]

    prior = list(popularity)
    return Lookups(
        user_vectors=user_vectors,
        search=search,
        item_vectors=lambda _ids: vectors,
        available=lambda wanted: wanted & live,
        related=RelatedTable.of(related or {}),
        popularity=lambda w: (prior, popularity_prior(prior, w)),
        titles=titles,
    )


def weights(**kw: float) -> BlendWeights:
    return BlendWeights(**kw)
