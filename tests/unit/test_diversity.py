"""Diversity: MMR over the item vectors in the one recommendation core."""

from __future__ import annotations

import numpy as np
import pytest

from workers.ranking import BlendWeights, intra_list_diversity, mmr, recommend

from .ranking_fakes import entry, lookups


def _unit(*xs: float) -> np.ndarray:
    v = np.array(xs, dtype=np.float32)
    return v / np.linalg.norm(v)


# Three near-duplicates of one design, and two different items a little less relevant.
VECTORS = {
    "dup1": _unit(1.0, 0.05, 0.0),
    "dup2": _unit(1.0, 0.0, 0.05),
    "dup3": _unit(1.0, 0.04, 0.04),
    "other1": _unit(0.2, 1.0, 0.0),
    "other2": _unit(0.2, 0.0, 1.0),
}
RANKED = [("dup1", 1.0), ("dup2", 0.98), ("dup3", 0.97), ("other1", 0.7), ("other2", 0.6)]


def test_lambda_one_keeps_the_score_order() -> None:
    assert mmr(RANKED, VECTORS, k=3, lam=1.0) == ["dup1", "dup2", "dup3"]


def test_lower_lambda_swaps_near_duplicates_for_different_items() -> None:
    # Relevance scaled to [0, 1]: dup1 1, dup2 0.95, dup3 0.925, other1 0.25, other2 0.
    picked = mmr(RANKED, VECTORS, k=3, lam=0.5)
    assert picked == ["dup1", "other1", "dup2"]  # one near-duplicate swapped out
    picked = mmr(RANKED, VECTORS, k=3, lam=0.3)
    assert picked == ["dup1", "other1", "other2"]  # three different designs
    plain = intra_list_diversity(["dup1", "dup2", "dup3"], VECTORS)
    diverse = intra_list_diversity(picked, VECTORS)
    assert plain is not None and diverse is not None and diverse > plain + 0.5


def test_the_swap_happens_where_similarity_outweighs_the_score_gap() -> None:
    # dup2 against other1 as second item: lam * 0.95 - (1 - lam) * 0.998 (cosine with dup1)
    # against lam * 0.25 - (1 - lam) * 0.245: equal at lam ~0.518.
    assert mmr(RANKED, VECTORS, k=2, lam=0.55) == ["dup1", "dup2"]
    assert mmr(RANKED, VECTORS, k=2, lam=0.5) == ["dup1", "other1"]


def test_items_without_vectors_count_as_dissimilar() -> None:
    ranked = [("dup1", 1.0), ("dup2", 0.9), ("novec", 0.8)]
    assert mmr(ranked, VECTORS, k=2, lam=0.5) == ["dup1", "novec"]


def test_intra_list_diversity_is_the_mean_pairwise_cosine_distance() -> None:
    vectors = {"a": _unit(1, 0), "b": _unit(0, 1), "c": _unit(1, 1)}
    # distances: a-b 1, a-c and b-c 1 - 0.7071
    expected = (1.0 + 2 * (1 - np.sqrt(0.5))) / 3
    assert intra_list_diversity(["a", "b", "c"], vectors) == pytest.approx(expected)
    assert intra_list_diversity(["a"], vectors) is None


def test_the_core_applies_mmr_and_keeps_reasons() -> None:
    look = lookups(vectors={**VECTORS, "seen": _unit(1.0, 0.02, 0.02)})
    history = [[entry("seen")]]
    w = BlendWeights()
    (plain,) = recommend(history, lookups=look, weights=w, k=3)
    (diverse,) = recommend(history, lookups=look, weights=w, k=3, mmr_lambda=0.3)
    assert [i.item_id for i in plain] == ["dup3", "dup1", "dup2"]
    ids = [i.item_id for i in diverse]
    assert ids[0] == "dup3" and {"other1", "other2"} <= set(ids)
    assert all(i.reasons and i.reasons[0].kind == "similar" for i in diverse)
    assert len(set(ids)) == 3 and "seen" not in ids
