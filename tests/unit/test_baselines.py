"""The plain kNN and transitions baselines of `relata evaluate`, on a history small enough to
check by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from relata.lab import baselines

ITEMS = ["a", "b", "c", "d"]
# a in 2 users' histories, b in 3, c in 2, d in none. Together: ab 2, ac 1, bc 2.
# Consecutive pairs: a -> b twice (u1, u2), b -> c twice (u1, u3), c -> a once (u4).
SEQS = {"u1": ["a", "b", "c"], "u2": ["a", "b"], "u3": ["b", "c", "b"], "u4": ["c", "a"]}


def model() -> baselines.PlainModel:
    return baselines.fit(SEQS, ITEMS)


def test_cosine_and_transitions_match_hand_counts() -> None:
    m = model()
    # a: u1 u2 u4 (3); b: u1 u2 u3 (3); c: u1 u3 u4 (3). ab: u1 u2; ac: u1 u4; bc: u1 u3.
    cos = m.cosine.toarray()
    assert cos[0, 1] == pytest.approx(2 / 3) and cos[0, 2] == pytest.approx(2 / 3)
    assert cos[1, 2] == pytest.approx(2 / 3) and cos[0, 0] == 0.0
    assert np.allclose(cos, cos.T) and not cos[3].any()
    p = m.transitions.toarray()
    # a -> b 2; b -> c 2; c -> b 1 (u3), c -> a 1 (u4)
    assert p[0].tolist() == [0.0, 1.0, 0.0, 0.0]
    assert p[1].tolist() == [0.0, 0.0, 1.0, 0.0]
    assert p[2].tolist() == [0.5, 0.5, 0.0, 0.0]
    assert m.popularity.tolist() == [3.0, 3.0, 3.0, 0.0]


def test_scores_follow_the_recipe() -> None:
    m = model()
    history = ["c", "a"]  # c the most recent
    plain = baselines.scores(m, baselines.PLAIN_METHODS["knn"], [history])[0]
    recency = baselines.scores(m, baselines.PLAIN_METHODS["knn+recency"], [history])[0]
    both = baselines.scores(m, baselines.PLAIN_METHODS["knn+transitions"], [history])[0]
    tie = 1e-9 * 3
    assert plain[1] == pytest.approx(2 / 3 + 2 / 3 + tie)
    knn_b = 2 / 3 + math.exp(-0.5) * 2 / 3
    assert recency[1] == pytest.approx(knn_b + tie)
    # b: P(b | c) = 0.5 at weight 1, P(b | a) = 1 at weight exp(-0.7), plus 0.3 kNN
    assert both[1] == pytest.approx(0.5 + math.exp(-0.7) + 0.3 * knn_b + tie)
    assert both[3] == 0.0


def test_recommend_leaves_out_history_excluded_and_unavailable_items() -> None:
    m = model()
    method = baselines.PLAIN_METHODS["knn+transitions"]
    assert baselines.recommend(m, method, [["a"]], k=3) == [["b", "c", "d"]]
    # b follows a for sure; excluded, c is next, and an unavailable item never appears.
    assert baselines.recommend(m, method, [["a"]], k=3, excluded=[["b"]]) == [["c", "d"]]
    assert baselines.recommend(m, method, [["a"]], k=3, available=["a", "b", "d"]) == [["b", "d"]]


def test_recent_first_keeps_each_item_at_its_last_occurrence() -> None:
    assert baselines.recent_first(["b", "c", "b", "a"]) == ["a", "b", "c"]
