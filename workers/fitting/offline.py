"""Ranking without the world: the live core (`workers.ranking.recommend`) over an item matrix
held in memory, with an exact vector search, for the fit's validation and `relata evaluate`.

The look-ups answer what the recommender asks Qdrant and the related-items topic: the exact
top-`candidates` cosine hits (HNSW approximates the same list), item vectors by id, the
available items, the related lists and popularity of the evidence given.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import numpy.typing as npt

from schemas.messages import HistoryEntry
from workers.ranking import (
    BlendWeights,
    Lookups,
    RelatedTable,
    Reranker,
    VectorRows,
    pooled_user_vector,
    popularity_prior,
    recommend,
)

FloatArray = npt.NDArray[np.float32]
History = Sequence[HistoryEntry]
Hits = list[list[tuple[str, float]]]
# Users ranked per call of the core (the recommender's micro-batches are of this order).
RANK_BATCH = 256
# User vectors searched per matrix product: 512 x a catalog of 100k items is 200 MB of floats.
SEARCH_BATCH = 512


@dataclass(frozen=True)
class ItemSpace:
    """The item vectors ranking may read (rows L2-normalised, as the store's cosine treats
    them) and which items are available."""

    ids: list[str]
    matrix: FloatArray
    available: frozenset[str]
    rows: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rows", {i: n for n, i in enumerate(self.ids)})

    @property
    def vectors(self) -> VectorRows:
        return VectorRows(self.matrix, self.rows)

    def with_matrix(self, matrix: FloatArray) -> ItemSpace:
        """The same items with other vectors (an adapter's)."""
        return ItemSpace(self.ids, matrix, self.available)


@dataclass(frozen=True)
class Evidence:
    """What the stream processor learns from behaviour and the recommender reads: every
    item's related list and the popularity ranking (most popular first)."""

    related: RelatedTable
    popularity: list[tuple[str, float]]


@dataclass
class VectorInputs:
    """Per-history user vectors (zero rows: none) and their exact hits: item rows (-1 past
    the last hit) and cosines, best first."""

    users: FloatArray
    rows: npt.NDArray[np.int64]
    cos: FloatArray
    ids: Sequence[str]

    @cached_property
    def hits(self) -> Hits:
        """The hits as the core's search answers them: (item id, cosine) lists."""
        return hit_lists(self.rows, self.cos, self.ids)


UserVectors = Callable[[Sequence[History]], list[FloatArray | None]]


def pooled_vectors(items: ItemSpace, weights: BlendWeights) -> UserVectors:
    """The live `pooled` user vector of each history over `items`."""
    vectors = items.vectors

    def users(histories: Sequence[History]) -> list[FloatArray | None]:
        return [
            pooled_user_vector(
                h,
                vectors,
                recency=weights.pool_recency,
                weight_exponent=weights.weight_exponent,
                max_items=weights.max_sources,
            )
            for h in histories
        ]

    return users


def user_matrix(vectors: Sequence[FloatArray | None], dim: int) -> FloatArray:
    """The user vectors as rows (zero rows for None)."""
    out = np.zeros((len(vectors), dim), dtype=np.float32)
    for n, v in enumerate(vectors):
        if v is not None:
            out[n] = v
    return out


def exact_search(
    users: FloatArray,
    item_matrix: FloatArray,
    excluded: Sequence[Iterable[int]],
    *,
    top: int,
    unavailable: npt.NDArray[np.bool_] | None = None,
) -> tuple[npt.NDArray[np.int64], FloatArray]:
    """Exact top-`top` cosine hits per user row, best first (ties in a stable order): item
    rows, -1 where there is none (zero user rows get none), and cosines. Each row's excluded
    item rows and every `unavailable` item are left out."""
    n = users.shape[0]
    top = min(top, item_matrix.shape[0])
    rows = np.full((n, max(top, 0)), -1, dtype=np.int64)
    cos = np.zeros((n, max(top, 0)), dtype=np.float32)
    if top <= 0:
        return rows, cos
    for s in range(0, n, SEARCH_BATCH):
        u = users[s : s + SEARCH_BATCH]
        sims = u @ item_matrix.T
        if unavailable is not None and unavailable.any():
            sims[:, unavailable] = -np.inf
        for r, ex in enumerate(excluded[s : s + SEARCH_BATCH]):
            cut = list(ex)
            if cut:
                sims[r, cut] = -np.inf
        part = np.argpartition(-sims, top - 1, axis=1)[:, :top]
        values = np.take_along_axis(sims, part, axis=1)
        order = np.argsort(-values, axis=1, kind="stable")
        best = np.take_along_axis(part, order, axis=1)
        scores = np.take_along_axis(values, order, axis=1)
        keep = np.isfinite(scores) & u.any(axis=1, keepdims=True)
        rows[s : s + SEARCH_BATCH] = np.where(keep, best, -1)
        cos[s : s + SEARCH_BATCH] = np.where(keep, scores, 0.0)
    return rows, cos


def hit_lists(rows: npt.NDArray[np.int64], cos: FloatArray, ids: Sequence[str]) -> Hits:
    """Hits as (item id, cosine) lists, row by row (whole rows to Python at once)."""
    out: Hits = []
    for r in range(rows.shape[0]):
        found = rows[r] >= 0
        out.append(
            list(
                zip(
                    map(ids.__getitem__, rows[r][found].tolist()),
                    cos[r][found].astype(np.float64).tolist(),
                    strict=True,
                )
            )
        )
    return out


def exact_hits(
    users: FloatArray,
    item_matrix: FloatArray,
    item_ids: Sequence[str],
    excluded: Sequence[Iterable[int]],
    *,
    top: int,
    unavailable: npt.NDArray[np.bool_] | None = None,
) -> Hits:
    """`exact_search` as (item id, cosine) lists."""
    rows, cos = exact_search(users, item_matrix, excluded, top=top, unavailable=unavailable)
    return hit_lists(rows, cos, item_ids)


def vector_inputs(
    histories: Sequence[History], items: ItemSpace, user_vectors: UserVectors, *, top: int
) -> VectorInputs:
    """User vectors of the histories and their exact hits among the available items, each
    history's own items left out (as the recommender's search does)."""
    users = user_matrix(user_vectors(histories), items.matrix.shape[1])
    return search_inputs(histories, items, users, top=top)


def search_inputs(
    histories: Sequence[History], items: ItemSpace, users: FloatArray, *, top: int
) -> VectorInputs:
    """The exact hits of user vectors already computed (`vector_inputs`)."""
    rows = items.rows
    excluded = [[rows[e.item_id] for e in h if e.item_id in rows] for h in histories]
    unavailable = np.fromiter((i not in items.available for i in items.ids), dtype=np.bool_)
    found, cos = exact_search(users, items.matrix, excluded, top=top, unavailable=unavailable)
    return VectorInputs(users=users, rows=found, cos=cos, ids=items.ids)


def rank_offline(
    histories: Sequence[History],
    *,
    evidence: Evidence,
    available: frozenset[str],
    weights: BlendWeights,
    k: int,
    mmr_lambda: float,
    user_vectors: FloatArray | None,
    hits: Sequence[Sequence[tuple[str, float]]] | None,
    item_vectors: Mapping[str, np.ndarray] | None,
    progress: Callable[[int], object] | None = None,
    reranker: Reranker | None = None,
) -> list[list[str]]:
    """Each history's top k as the live core ranks it (`recommend`, in batches), with the
    look-ups answered from memory. `user_vectors` (a zero row: none) and `hits`: per history
    (None: no vector term); `progress` hears each batch's size; `reranker`: the bundle's
    learned ranker (or the fit's feature recorder)."""
    lists: list[list[str]] = []
    prior = (evidence.popularity, popularity_prior(evidence.popularity, weights))
    vectors: Mapping[str, np.ndarray] = {} if item_vectors is None else item_vectors
    for start in range(0, len(histories), RANK_BATCH):
        batch = range(start, min(start + RANK_BATCH, len(histories)))
        users = [
            None
            if user_vectors is None or hits is None or not user_vectors[n].any()
            else user_vectors[n]
            for n in batch
        ]
        # The batch's exact hits, for the users that have a vector (the core's order).
        searched = [
            list(hits[n]) if hits is not None else []
            for n, user in zip(batch, users, strict=True)
            if user is not None
        ]
        lookups = Lookups(
            user_vectors=lambda _histories, users=users: users,  # type: ignore[misc]
            search=lambda _matrix, _excludes, searched=searched: searched,  # type: ignore[misc]
            item_vectors=lambda _ids: vectors,
            available=lambda ids: ids & available,
            related=evidence.related,
            popularity=lambda _weights: prior,
        )
        answers = recommend(
            [histories[n] for n in batch],
            lookups=lookups,
            weights=weights,
            k=k,
            mmr_lambda=mmr_lambda,
            reranker=reranker,
        )
        lists.extend([r.item_id for r in recs] for recs in answers)
        if progress is not None:
            progress(len(batch))
    return lists


def ndcg_at(lists: Sequence[Sequence[str]], targets: Sequence[str], k: int) -> float:
    """Mean NDCG@k of one held-out target per list (0 for a missed one)."""
    if not targets:
        return 0.0
    total = 0.0
    for ids, target in zip(lists, targets, strict=True):
        for n, item_id in enumerate(ids[:k]):
            if item_id == target:
                total += 1.0 / math.log2(n + 2)
                break
    return total / len(targets)
