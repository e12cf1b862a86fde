"""Business rules: one validated file a merchandiser edits to shape the published lists.

Filters (keep only, exclude), boosts and buries by attribute, a cap per category and pinned
items per placement. The recommender reloads the file when it changes
(`RELATA_RECOMMENDER_RULES_PATH`); `workers.ranking.rules` applies it inside the one core.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.messages import Identifier


class _Rules(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ItemMatch(_Rules):
    """Which items a rule is about: every condition given must hold (a list: any of it)."""

    item_ids: list[Identifier] = Field(default_factory=list)
    categories: list[str] = Field(default_factory=list, description="Any of these categories.")
    brands: list[str] = Field(default_factory=list, description="Any of these brands.")
    min_price: float | None = Field(default=None, ge=0)
    max_price: float | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _price_range(self) -> ItemMatch:
        low, high = self.min_price, self.max_price
        if low is not None and high is not None and low > high:
            msg = f"min_price {low} is above max_price {high}"
            raise ValueError(msg)
        return self

    def matches(self, item_id: str, attributes: Mapping[str, Any] | None) -> bool:
        """Whether the item (its catalog attributes: categories, brand, price) matches; an
        item whose attributes are unknown matches only conditions on its id."""
        if self.item_ids and item_id not in self.item_ids:
            return False
        if not (self.categories or self.brands or self.priced):
            return True
        if attributes is None:
            return False
        if self.categories and not set(self.categories) & set(attributes.get("categories") or ()):
            return False
        if self.brands and attributes.get("brand") not in self.brands:
            return False
        if self.priced:
            price = attributes.get("price")
            if price is None:
                return False  # a price condition cannot vouch for an unpriced item
            if self.min_price is not None and price < self.min_price:
                return False
            if self.max_price is not None and price > self.max_price:
                return False
        return True

    @property
    def priced(self) -> bool:
        return self.min_price is not None or self.max_price is not None


class Boost(_Rules):
    """Multiply the score of matching items: a factor above 1 boosts, below 1 buries."""

    when: ItemMatch
    factor: float = Field(gt=0, le=100)


class Pin(_Rules):
    """Show this item at this position (1 first) of a placement's lists, when available."""

    item_id: Identifier
    position: int = Field(ge=1, le=200)


class BusinessRules(_Rules):
    """The rules file (JSON). Filters run first; if they remove every candidate, the list is
    ranked without them (boosts, the cap and pins still apply) rather than left empty."""

    only: ItemMatch | None = Field(default=None, description="Keep only matching items.")
    exclude: list[ItemMatch] = Field(default_factory=list, description="Drop matching items.")
    boosts: list[Boost] = Field(default_factory=list)
    max_per_category: int | None = Field(
        default=None, ge=1, description="At most this many items of one (first) category."
    )
    pins: dict[str, list[Pin]] = Field(
        default_factory=dict, description="Pinned items by placement (e.g. home, cart)."
    )

    @classmethod
    def load(cls, path: Path) -> BusinessRules:
        """Read and validate a rules file (raises pydantic's ValidationError, naming the
        field, or OSError)."""
        return cls.model_validate_json(path.read_bytes())

    @property
    def filters(self) -> bool:
        return self.only is not None or bool(self.exclude)
