"""Business rules: validation, filters, boosts and buries, category cap, pins, the fallback,
and hot reloading in the recommender."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from schemas.reranking import place_pins
from schemas.rules import BusinessRules, ItemMatch
from workers.lookups import RulesFile
from workers.ranking import BlendWeights, Lookups, recommend
from workers.ranking.rules import apply_rules

from .ranking_fakes import entry, lookups

ATTRS = {
    "lip1": {"categories": ["Lips"], "brand": "Rosa", "price": 12.0},
    "lip2": {"categories": ["Lips"], "brand": "Nova", "price": 30.0},
    "lip3": {"categories": ["Lips"], "brand": "Rosa", "price": 8.0},
    "sh1": {"categories": ["Hair"], "brand": "Nova", "price": 9.0},
    "nail": {"categories": ["Nails"], "brand": None, "price": None},
}
POOL = [("lip1", 1.0), ("lip2", 0.9), ("lip3", 0.8), ("sh1", 0.5), ("nail", 0.4)]


def ids(items: list[tuple[str, float]]) -> list[str]:
    return [i for i, _ in items]


def test_the_rules_file_is_validated_with_named_fields() -> None:
    with pytest.raises(ValidationError, match=r"min_price 20\.0 is above max_price 10\.0"):
        BusinessRules.model_validate({"only": {"min_price": 20, "max_price": 10}})
    with pytest.raises(ValidationError, match="factor"):
        BusinessRules.model_validate({"boosts": [{"when": {"brands": ["x"]}, "factor": 0}]})
    with pytest.raises(ValidationError, match="Extra inputs"):
        BusinessRules.model_validate({"filter": {}})


def test_filters_by_category_brand_and_price() -> None:
    only_lips = BusinessRules(only=ItemMatch(categories=["Lips"], max_price=20.0))
    assert ids(apply_rules(POOL, ATTRS, only_lips).items) == ["lip1", "lip3"]
    no_nova = BusinessRules(exclude=[ItemMatch(brands=["Nova"])])
    assert ids(apply_rules(POOL, ATTRS, no_nova).items) == ["lip1", "lip3", "nail"]
    # An unpriced item never passes a price condition.
    cheap = BusinessRules(only=ItemMatch(max_price=10.0))
    assert ids(apply_rules(POOL, ATTRS, cheap).items) == ["lip3", "sh1"]


def test_boosts_bury_and_the_category_cap() -> None:
    rules = BusinessRules.model_validate(
        {
            "boosts": [
                {"when": {"categories": ["Hair"]}, "factor": 3.0},
                {"when": {"brands": ["Rosa"]}, "factor": 0.1},
            ],
            "max_per_category": 1,
        }
    )
    ruled = apply_rules(POOL, ATTRS, rules)
    # sh1 1.5, lip2 0.9, then only one Lips item; nail (no cap on its own category) stays.
    assert ids(ruled.items) == ["sh1", "lip2", "nail"]
    assert not ruled.fell_back


def test_a_filter_that_removes_everything_falls_back_to_the_unfiltered_list() -> None:
    rules = BusinessRules(only=ItemMatch(brands=["Nobody"]))
    ruled = apply_rules(POOL, ATTRS, rules)
    assert ruled.fell_back and ids(ruled.items) == ids(POOL)


def test_pins_move_or_insert_items_at_their_position() -> None:
    assert place_pins(["a", "b", "c"], [("x", 0), ("c", 1)], k=3) == ["x", "c", "a"]
    assert place_pins(["a"], [("x", 5)], k=3) == ["a", "x"]


def _look() -> Lookups:
    vectors = {i: np.eye(6, dtype=np.float32)[n] for n, i in enumerate([*ATTRS, "seen"])}
    base = lookups(
        vectors=vectors,
        popularity=[(i, 10.0 - n) for n, i in enumerate(ATTRS)],
        available=set(ATTRS) | {"seen"},
    )
    return Lookups(
        **{
            **{f: getattr(base, f) for f in base.__dataclass_fields__},
            "attributes": lambda wanted: {i: ATTRS[i] for i in wanted if i in ATTRS},
        }
    )


def test_the_core_applies_rules_and_words_pinned_items() -> None:
    rules = BusinessRules.model_validate(
        {"only": {"categories": ["Lips"]}, "pins": {"home": [{"item_id": "nail", "position": 1}]}}
    )
    (items,) = recommend(
        [[entry("seen")]], lookups=_look(), weights=BlendWeights(), k=3, rules=rules
    )
    assert items[0].item_id == "nail"
    assert items[0].reasons[0].kind == "pinned" and items[0].reasons[0].source_item_id is None
    assert {i.item_id for i in items[1:]} <= {"lip1", "lip2", "lip3"}
    # Another placement has no pins; a user with no history gets trending items, filtered.
    (cart,) = recommend(
        [[]], lookups=_look(), weights=BlendWeights(), k=3, rules=rules, placement="cart"
    )
    assert [i.item_id for i in cart] == ["lip1", "lip2", "lip3"]
    assert all(i.reasons[0].kind == "trending" for i in cart)


def test_rules_file_is_hot_reloaded_and_a_bad_edit_keeps_the_last_rules(tmp_path: Path) -> None:
    path = tmp_path / "rules.json"
    path.write_text('{"max_per_category": 2}')
    rules = RulesFile(path)
    rules.CHECK_EVERY_S = 0.0
    first = rules.current()
    assert first is not None and first.max_per_category == 2
    path.write_text('{"max_per_category": 3, "pins": {}}')
    os.utime(path, ns=(1, 10**18))  # a new modification time, whatever the clock's resolution
    assert rules.current().max_per_category == 3  # type: ignore[union-attr]
    path.write_text('{"max_per_category": 0}')  # invalid: below 1
    os.utime(path, ns=(1, 2 * 10**18))
    assert rules.current().max_per_category == 3  # type: ignore[union-attr]
    assert RulesFile(None).current() is None
