"""Diversity: maximal marginal relevance (MMR) over the item vectors, after scoring.

A list of near-duplicates (three T-light holders of one design) answers one need three times.
MMR picks, one at a time, the candidate with the best `lam * relevance - (1 - lam) * (its
largest cosine with the items picked so far)`: `lam` 1 keeps the score order, lower values
trade relevance for variety. Pure numpy; `core.recommend` applies it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .related import gather


def mmr(
    ranked: Sequence[tuple[str, float]],
    vectors: Mapping[str, np.ndarray],
    *,
    k: int,
    lam: float,
) -> list[str]:
    """The k items of `ranked` ((item id, score), best first) in MMR order.

    Relevance is the score scaled to [0, 1] within `ranked` (so `lam` means the same for every
    user, whatever the scale of their scores); similarity is the cosine of the item vectors
    (an item without a vector is similar to nothing). Ties keep the score order.
    """
    ids = [i for i, _ in ranked]
    if lam >= 1.0 or len(ids) <= 1 or k <= 1:
        return ids[:k]
    scores = np.array([s for _, s in ranked], dtype=np.float64)
    span = float(scores.max() - scores.min())
    relevance = (scores - scores.min()) / span if span > 0 else np.ones_like(scores)
    sims = similarity_matrix(ids, vectors)
    picked: list[int] = []
    closest = np.zeros(len(ids), dtype=np.float64)  # largest cosine with a picked item
    free = np.ones(len(ids), dtype=bool)
    for _ in range(min(k, len(ids))):
        gain = lam * relevance - (1.0 - lam) * closest
        gain[~free] = -np.inf
        j = int(np.argmax(gain))  # the first best: ties keep the score order
        picked.append(j)
        free[j] = False
        closest = sims[j].copy() if len(picked) == 1 else np.maximum(closest, sims[j])
    return [ids[j] for j in picked]


def similarity_matrix(ids: Sequence[str], vectors: Mapping[str, np.ndarray]) -> np.ndarray:
    """Pairwise cosines of the items' vectors (0 for a pair where one has none)."""
    sims = np.zeros((len(ids), len(ids)), dtype=np.float64)
    found, matrix = gather(vectors, ids)
    if matrix is None:
        return sims
    unit = matrix.astype(np.float64)
    norms = np.linalg.norm(unit, axis=1, keepdims=True)
    unit = np.divide(unit, norms, out=np.zeros_like(unit), where=norms > 0)
    position = {item: n for n, item in enumerate(ids)}
    rows = np.array([position[i] for i in found], dtype=np.intp)
    sims[np.ix_(rows, rows)] = unit @ unit.T
    return sims


def intra_list_diversity(ids: Sequence[str], vectors: Mapping[str, np.ndarray]) -> float | None:
    """Mean pairwise cosine distance (1 - cosine) of the list's items that have a vector
    (None: fewer than two have one)."""
    found, matrix = gather(vectors, ids)
    if matrix is None or len(found) < 2:
        return None
    sims = similarity_matrix(found, vectors)
    n = len(found)
    pairs = sims[np.triu_indices(n, k=1)]
    return float(np.mean(1.0 - pairs))
