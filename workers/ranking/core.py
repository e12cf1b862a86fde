"""The recommendation core: a batch of user histories in, ranked and explained items out.

Everything it needs from the outside (user vectors, vector search, item vectors,
availability, popularity) comes in as functions (`Lookups`), so the live recommender (Qdrant,
the related-items topic) and `relata evaluate` (exact search over the item matrix, the folded
histories) run the same ranking, the same over-fetch and the same availability filter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from schemas.messages import HistoryEntry, RecommendedItem

from .explain import explain
from .related import RelatedTable
from .score import score, user_evidence
from .weights import BlendWeights

FloatArray = npt.NDArray[np.float32]
History = Sequence[HistoryEntry]
Popularity = tuple[list[tuple[str, float]], Mapping[str, float]]

# Items scored per user before the availability check: k of them are kept (behaviour
# candidates are not filtered by availability before scoring; vector hits are).
CANDIDATE_MARGIN = 2


@dataclass(frozen=True, slots=True)
class Lookups:
    """What ranking a batch reads from the world, as functions of the batch."""

    # One vector per history (None: the user has none), in order.
    user_vectors: Callable[[Sequence[History]], list[FloatArray | None]]
    # The nearest available items of each row of a matrix of user vectors, best first,
    # leaving out each row's excluded ids.
    search: Callable[[FloatArray, list[set[str]]], list[list[tuple[str, float]]]]
    # The vectors of (at least) these items, as a mapping that holds every one it found.
    item_vectors: Callable[[Iterable[str]], Mapping[str, np.ndarray]]
    # The available ones among these items.
    available: Callable[[Set[str]], Set[str]]
    # Related-items lists by item (the association evidence).
    related: RelatedTable
    # The popularity ranking (most popular first) and its prior for these weights.
    popularity: Callable[[BlendWeights], Popularity]
    # Item titles for the reasons' wording (None: reasons name item ids).
    titles: Mapping[str, str] | None = None


def recommend(
    histories: Sequence[History],
    *,
    lookups: Lookups,
    weights: BlendWeights,
    k: int,
) -> list[list[RecommendedItem]]:
    """The k best available items for each history (most recent first), with reasons."""
    if not histories:
        return []
    vectors = lookups.user_vectors(histories)
    hits = _search(histories, vectors, lookups, weights)
    depth = k * CANDIDATE_MARGIN
    # One look-up for every vector scoring may read: the hits it names a history item for,
    # and the behaviour candidates it scores against the user vector.
    wanted = [item_id for user_hits in hits for item_id, _ in user_hits[:depth]]
    evidence = [user_evidence(history, lookups.related, weights) for history in histories]
    if weights.vector > 0:
        for found in evidence:
            wanted += found.candidates
    item_vectors = lookups.item_vectors(wanted)
    # One call for the batch: a ranking rebuilt between two users would not match its prior.
    popularity, prior = lookups.popularity(weights)
    scored = [
        score(
            history=history,
            related=lookups.related,
            vector_hits=user_hits,
            k=depth,
            weights=weights,
            history_vectors=item_vectors,
            candidate_vectors=item_vectors,
            popularity=popularity,
            prior_of=prior,
            titles=lookups.titles,
            user_vector=user_vector,
            evidence=found,
        )
        for history, user_hits, user_vector, found in zip(
            histories, hits, vectors, evidence, strict=True
        )
    ]
    # Vector hits are available by construction (the search filters); the other candidates
    # are checked in one look-up, and only the k kept of each user are worded.
    vector_ids = [{i for i, _ in h} for h in hits]
    unchecked = {
        item_id
        for ranked, vec in zip(scored, vector_ids, strict=True)
        for item_id, _ in ranked.items
        if item_id not in vec
    }
    available = lookups.available(unchecked) if unchecked else set()
    return [
        explain(ranked, [i for i, _ in ranked.items if i in vec or i in available][:k])
        for ranked, vec in zip(scored, vector_ids, strict=True)
    ]


def _search(
    histories: Sequence[History],
    vectors: list[FloatArray | None],
    lookups: Lookups,
    weights: BlendWeights,
) -> list[list[tuple[str, float]]]:
    hits: list[list[tuple[str, float]]] = [[] for _ in histories]
    if weights.vector <= 0:
        return hits
    todo = [n for n, v in enumerate(vectors) if v is not None]
    if not todo:
        return hits
    matrix = np.stack([v for v in vectors if v is not None]).astype(np.float32)
    excludes = [{e.item_id for e in histories[n]} for n in todo]
    for n, user_hits in zip(todo, lookups.search(matrix, excludes), strict=True):
        hits[n] = user_hits
    return hits
