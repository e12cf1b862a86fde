"""Re-ranking a recommendation list: filters, maximal marginal relevance (MMR), pins.

The one MMR implementation (`mmr_order`): the recommender runs it on the cosines of item
vectors (`workers.ranking.diversity`); whoever holds a published `Recommendation` — the HTTP
API per request, or any subscriber — runs it on the similarities its `pool` carries
(`rerank`), so re-ranking needs no vector store. Pure (numpy), beside the messages it reads.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

from schemas import vocabulary
from schemas.messages import Fallback, Recommendation, RecommendedItem, similarity_bytes
from schemas.rules import ItemMatch

FloatArray = npt.NDArray[np.float64]

REQUEST_FALLBACK: Fallback = "request_filters_removed_every_candidate"
# One byte per similarity: 127 steps per unit (0.008), finer than the gaps MMR weighs at the
# lambdas it is run with, and 0 (an item without a vector) is exact.
_STEPS = 127


def mmr_order(
    scores: Sequence[float], similarity: Callable[[], FloatArray], *, k: int, lam: float
) -> list[int]:
    """The positions of the k items MMR picks from `scores` (best first), in pick order.

    Each pick is the item with the best `lam * relevance - (1 - lam) * (its largest
    similarity with the items picked so far)`; relevance is the score scaled to [0, 1] within
    `scores` (so `lam` means the same for every list, whatever the scale of its scores).
    `similarity()` gives the pairwise matrix, asked for only when the order can change
    (`lam` below 1, more than one pick). Ties keep the score order.
    """
    n = len(scores)
    if lam >= 1.0 or n <= 1 or k <= 1:
        return list(range(min(k, n)))
    values = np.asarray(scores, dtype=np.float64)
    span = float(values.max() - values.min())
    relevance = (values - values.min()) / span if span > 0 else np.ones_like(values)
    sims = similarity()
    picked: list[int] = []
    closest = np.zeros(n, dtype=np.float64)  # largest similarity with a picked item
    free = np.ones(n, dtype=bool)
    for _ in range(min(k, n)):
        gain = lam * relevance - (1.0 - lam) * closest
        gain[~free] = -np.inf
        j = int(np.argmax(gain))  # the first best: ties keep the score order
        picked.append(j)
        free[j] = False
        closest = sims[j].copy() if len(picked) == 1 else np.maximum(closest, sims[j])
    return picked


def encode_similarities(sims: FloatArray) -> str:
    """A symmetric similarity matrix as `CandidatePool.similarities`: its upper triangle, one
    byte per pair, base64."""
    upper = sims[np.triu_indices(len(sims), k=1)]
    quantised = np.rint(np.clip(upper, -1.0, 1.0) * _STEPS) + _STEPS
    return base64.b64encode(quantised.astype(np.uint8).tobytes()).decode("ascii")


def decode_similarities(text: str, n: int) -> FloatArray:
    """The n x n matrix of `CandidatePool.similarities` (1 on the diagonal)."""
    raw = np.frombuffer(base64.b64decode(text), dtype=np.uint8)
    if len(raw) != similarity_bytes(n):
        msg = f"similarities hold {len(raw)} bytes, {similarity_bytes(n)} expected for {n} items"
        raise ValueError(msg)
    sims = np.eye(n, dtype=np.float64)
    upper = np.triu_indices(n, k=1)
    sims[upper] = (raw.astype(np.float64) - _STEPS) / _STEPS
    sims[upper[1], upper[0]] = sims[upper]
    return sims


def place_pins(ids: Sequence[str], pins: Sequence[tuple[str, int]], *, k: int) -> list[str]:
    """`ids` with each pinned item (id, 0-based position) moved or inserted at its position,
    cut to k."""
    out = list(ids)
    for item_id, position in pins:
        if item_id in out:
            out.remove(item_id)
        out.insert(min(position, len(out)), item_id)
    return out[:k]


def rerank(
    rec: Recommendation,
    *,
    match: ItemMatch | None = None,
    lam: float | None = None,
    k: int | None = None,
) -> Recommendation:
    """`rec` re-ranked from its items and pool: the candidates that `match` (categories,
    brand, price), re-ranked by MMR at `lam` (None: the lambda the list was chosen with),
    at most `k` (None: as many as published), the pinned items kept at their positions.

    A filter that removes every candidate is not applied, and the answer says so in
    `fallbacks`. Without a pool (a producer that predates it) only the listed items are
    candidates, with no attributes (a category, brand or price filter matches none of them)
    and no similarities. The answer carries no pool: it would not describe its items."""
    pool = rec.pool
    candidates: list[RecommendedItem] = [*rec.items, *(pool.items if pool else ())]
    n = len(candidates)
    k = len(rec.items) if k is None else k
    fallbacks = list(rec.fallbacks)
    kept = list(range(n))
    if match is not None:
        kept = [
            j
            for j in kept
            if match.matches(
                candidates[j].item_id, pool.attributes[j].model_dump() if pool else None
            )
        ]
        if n and not kept:
            kept = list(range(n))
            fallbacks.append(REQUEST_FALLBACK)
    pinned = {j for j in range(len(rec.items)) if _is_pinned(rec.items[j])}
    # The others by score, best first (stable: published order among equal scores).
    free = sorted((j for j in kept if j not in pinned), key=lambda j: -candidates[j].score)
    lam = lam if lam is not None else (pool.mmr_lambda if pool else 1.0)

    def similarity() -> FloatArray:
        if pool is None:
            return np.zeros((len(free), len(free)), dtype=np.float64)
        return decode_similarities(pool.similarities, n)[np.ix_(free, free)]

    order = mmr_order([candidates[j].score for j in free], similarity, k=k, lam=lam)
    by_id = {candidates[j].item_id: candidates[j] for j in kept}
    pins = [(candidates[j].item_id, j) for j in sorted(pinned.intersection(kept))]
    ids = place_pins([candidates[free[p]].item_id for p in order], pins, k=k)
    return rec.model_copy(
        update={"items": [by_id[i] for i in ids], "fallbacks": fallbacks, "pool": None}
    )


def _is_pinned(item: RecommendedItem) -> bool:
    return any(reason.kind == vocabulary.PINNED for reason in item.reasons)
