"""relata.lab.eval_metrics against hand-computed cases."""

from __future__ import annotations

import math

import pytest

from relata.lab.eval_metrics import (
    breakdown,
    bucket_by_edges,
    coverage,
    hit_at,
    ndcg_at,
    popularity_terciles,
    reciprocal_rank,
    summarize,
    target_rank,
)


def test_target_rank() -> None:
    assert target_rank(["a", "b", "c"], "c") == 3
    assert target_rank(["a", "b"], "z") is None


def test_single_item_metrics() -> None:
    assert hit_at(1, 10) == 1.0
    assert hit_at(10, 10) == 1.0
    assert hit_at(11, 10) == 0.0
    assert hit_at(None, 10) == 0.0
    assert ndcg_at(1, 10) == 1.0
    assert ndcg_at(3, 10) == pytest.approx(0.5)  # 1/log2(4)
    assert ndcg_at(11, 10) == 0.0
    assert reciprocal_rank(4) == 0.25
    assert reciprocal_rank(40, cutoff=20) == 0.0
    assert reciprocal_rank(None) == 0.0


def test_summarize_hand_computed() -> None:
    ranks = [1, 3, None, 12]
    s = summarize(
        ranks, k=10, recommended=[["a", "b"], ["b", "c"]], catalog_size=10, mrr_cutoff=100
    )
    assert s.users == 4
    assert s.hr == pytest.approx(0.5)
    assert s.ndcg == pytest.approx((1.0 + 0.5) / 4)
    assert s.mrr == pytest.approx((1 + 1 / 3 + 1 / 12) / 4)
    assert s.coverage == pytest.approx(0.3)
    assert summarize([], k=10).users == 0


def test_coverage_counts_only_top_k() -> None:
    assert coverage([["a", "b", "c"], ["a", "d"]], k=2, catalog_size=4) == pytest.approx(0.75)
    assert coverage([["a"]], k=2, catalog_size=0) == 0.0


def test_bucket_labels() -> None:
    edges = [1, 3, 6, 11]
    assert bucket_by_edges(1, edges) == "1-2"
    assert bucket_by_edges(5, edges) == "3-5"
    assert bucket_by_edges(10, edges) == "6-10"
    assert bucket_by_edges(50, edges) == "11+"
    # A bucket of one value is named by it (the evaluation's history lengths 1, 2-3, 4-7, 8+).
    assert [bucket_by_edges(n, (1, 2, 4, 8)) for n in (1, 2, 3, 7, 8, 40)] == [
        "1",
        "2-3",
        "2-3",
        "4-7",
        "8+",
        "8+",
    ]


def test_breakdown_groups_users() -> None:
    out = breakdown([1, None, 2, 3], ["x", "x", "y", "y"], k=2)
    assert out["x"] == {"users": 2, "hr": 0.5, "ndcg": 0.5}
    assert out["y"]["hr"] == 0.5
    assert out["y"]["ndcg"] == pytest.approx((1 / math.log2(3)) / 2)
    with pytest.raises(ValueError, match="differ"):
        breakdown([1], ["a", "b"], k=2)


def test_popularity_terciles() -> None:
    # total 12: the item with 6 holds the first third, 6+3 reaches two thirds
    head, torso = popularity_terciles([1, 1, 1, 3, 6])
    assert (head, torso) == (6, 3)
