"""Diversity: maximal marginal relevance (MMR) over the item vectors, after scoring.

A list of near-duplicates (three T-light holders of one design) answers one need three times.
MMR picks, one at a time, the candidate with the best `lam * relevance - (1 - lam) * (its
largest cosine with the items picked so far)`: `lam` 1 keeps the score order, lower values
trade relevance for variety. The picking itself is `schemas.reranking.mmr_order`, shared with
the re-ranking of published lists; here it runs on the item vectors. Pure numpy;
`core.recommend` applies it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from schemas.reranking import mmr_order

from .related import gather


def mmr(
    ranked: Sequence[tuple[str, float]],
    vectors: Mapping[str, np.ndarray],
    *,
    k: int,
    lam: float,
) -> list[str]:
    """The k items of `ranked` ((item id, score), best first) in MMR order
    (`schemas.reranking.mmr_order`), similarity the cosine of the item vectors (an item
    without a vector is similar to nothing)."""
    ids = [i for i, _ in ranked]
    order = mmr_order([s for _, s in ranked], lambda: similarity_matrix(ids, vectors), k=k, lam=lam)
    return [ids[j] for j in order]


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
