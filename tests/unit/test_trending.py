"""Every user answered: a user with no usable history gets trending items."""

from __future__ import annotations

import numpy as np

from workers.ranking import BlendWeights, recommend

from .ranking_fakes import entry, lookups

V = {i: np.eye(4, dtype=np.float32)[n] for n, i in enumerate(["a", "b", "c", "d"])}
POPULAR = [("retired", 90.0), ("b", 60.0), ("c", 30.0), ("d", 15.0)]


def test_an_empty_history_gets_available_trending_items_labelled_as_such() -> None:
    look = lookups(vectors=V, popularity=POPULAR, available={"a", "b", "c", "d"})
    (items,) = recommend([[]], lookups=look, weights=BlendWeights(), k=2)
    # Most popular first; the retired item heads the list but is never shown.
    assert [i.item_id for i in items] == ["b", "c"]
    for item in items:
        (reason,) = item.reasons
        assert reason.kind == "trending" and reason.source_item_id is None
        assert "trending" in reason.text
    assert items[0].reasons[0].item_count == 60.0
    assert items[0].score == 1.0 and items[1].score == 0.5  # relative to the top count


def test_users_with_and_without_history_are_answered_in_one_batch() -> None:
    look = lookups(vectors=V, popularity=POPULAR, available={"a", "b", "c", "d"})
    cold, warm = recommend([[], [entry("a")]], lookups=look, weights=BlendWeights(), k=3)
    assert [i.reasons[0].kind for i in cold] == ["trending"] * 3
    assert warm and all(i.reasons[0].kind != "trending" for i in warm)
    assert "a" not in [i.item_id for i in warm]


def test_no_popularity_yet_means_an_empty_list_not_an_error() -> None:
    look = lookups(vectors=V, popularity=[])
    assert recommend([[]], lookups=look, weights=BlendWeights(), k=3) == [[]]
