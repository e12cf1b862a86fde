"""also_bought: symmetric history co-occurrence of bought items, hand-computed end to end."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from schemas.messages import BehaviorEvent, EventType, UserProfile
from streams.association import AssociationConfig, AssociationInput
from streams.neighbours import AssociationIndex
from streams.profile import FoldConfig, fold_event

T0 = datetime(2024, 1, 1, tzinfo=UTC)
DAY = 86400.0
WEIGHTS: dict[EventType, float] = {
    "view": 1.0,
    "click": 2.0,
    "add_to_cart": 4.0,
    "purchase": 8.0,
    "return": -8.0,
}
FOLD = FoldConfig(weights=WEIGHTS, half_life_s=1e12, history_size=20, history_window=5)
NO_DECAY = 1e15


def feed(index: AssociationIndex, rows: list[tuple[str, str, int, EventType]]) -> None:
    """rows: (user, item, day, event type); one event a day, so every event is its own basket."""
    profiles: dict[str, UserProfile] = {}
    for n, (user, item, day, etype) in enumerate(rows):
        event = BehaviorEvent(
            event_id=f"e{n}",
            user_id=user,
            item_id=item,
            event_type=etype,
            ts=T0 + timedelta(days=day),
        )
        result = fold_event(profiles.get(user), event, FOLD)
        profiles[user] = result.profile
        index.observe_event(result, event)


def test_also_bought_pairs_counts_and_cosine_by_hand() -> None:
    index = AssociationIndex(AssociationConfig(half_life_s=NO_DECAY, min_support=1.0))
    feed(
        index,
        [
            ("u1", "A", 0, "purchase"),
            ("u2", "A", 0, "purchase"),
            ("u1", "B", 1, "purchase"),  # u1: A (distance 0) -> pair A-B += 1
            ("u2", "C", 1, "purchase"),  # u2: A (distance 0) -> pair A-C += 1
            ("u1", "C", 2, "purchase"),  # u1: B (d 0) += 1, A (d 1) += 1/2
        ],
    )
    # Bought steps: A 2, B 1, C 2. Pairs: A-B 1, A-C 1.5, B-C 1 (symmetric).
    partners = {
        item: {p: round(v, 9) for p, v in index.items[item]["partners"]["also_bought"].items()}
        for item in "ABC"
    }
    assert partners == {
        "A": {"B": 1.0, "C": 1.5},
        "B": {"A": 1.0, "C": 1.0},
        "C": {"A": 1.5, "B": 1.0},
    }
    counts = {i: index.items[i]["counts"]["also_bought"] for i in "ABC"}
    assert counts == pytest.approx({"A": 2.0, "B": 1.0, "C": 2.0})
    # Score: kind weight 0.8 x pair / sqrt(n_i n_j).
    scores = index.scores("A", kind="also_bought")
    assert scores["C"] == pytest.approx(0.8 * 1.5 / 2.0)
    assert scores["B"] == pytest.approx(0.8 * 1.0 / 2**0.5)
    assert index.scores("C", kind="also_bought")["A"] == pytest.approx(scores["C"])
    related = index.related("A")
    assert related is not None
    texts = {(r.item_id, r.kind): r.evidence.text for r in related.related}
    assert texts[("C", "also_bought")].startswith("bought by ")
    assert "of the same customers" in texts[("C", "also_bought")]


def test_views_and_returned_items_are_not_also_bought_partners() -> None:
    index = AssociationIndex(AssociationConfig(half_life_s=NO_DECAY, min_support=1.0))
    feed(
        index,
        [
            ("u", "V", 0, "view"),
            ("u", "R", 1, "purchase"),
            ("u", "R", 2, "return"),
            ("u", "K", 3, "purchase"),
            ("u", "X", 4, "view"),  # a view is no also_bought step at all
        ],
    )
    assert "also_bought" not in index.items["K"]["partners"]
    assert index.items["K"]["counts"]["also_bought"] == pytest.approx(1.0)
    assert "also_bought" not in index.items.get("X", {"counts": {}})["counts"]
    # the sequence (next_item) still sees every earlier item
    assert set(index.items["V"]["partners"]["next_item"]) >= {"R", "K"}


def test_input_without_bought_items_field_still_decodes() -> None:
    old = {"item_id": "A", "ts": 1.0, "kind": "bought_together", "sequence_step": True}
    assert AssociationInput.from_dict(old).bought_items == ()
