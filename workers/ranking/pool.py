"""The candidate pool a recommendation publishes beside its items (pure).

The next candidates after the k shown, and for the shown items followed by them their catalog
attributes and pairwise cosines, quantised (`schemas.messages.CandidatePool`): enough for the
HTTP API, or any subscriber, to filter by category, brand or price and re-rank for diversity
per request (`schemas.reranking.rerank`) without the item vectors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from schemas.messages import CandidatePool, ItemAttributes, RecommendedItem
from schemas.reranking import encode_similarities

from .diversity import similarity_matrix


def item_attributes(payload: Mapping[str, Any] | None) -> ItemAttributes:
    """The attributes filters read from an item's store payload (what the indexer wrote from
    the catalog; a missing or odd value is left out rather than failing the user's answer)."""
    if not payload:
        return ItemAttributes()
    categories = payload.get("categories")
    brand = payload.get("brand")
    return ItemAttributes(
        categories=[str(c) for c in categories] if isinstance(categories, list) else [],
        brand=brand if isinstance(brand, str) else None,
        price=_price(payload.get("price")),
    )


def _price(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) and value >= 0 else None


def candidate_pool(
    items: Sequence[RecommendedItem],
    following: Sequence[RecommendedItem],
    *,
    attributes: Mapping[str, ItemAttributes],
    vectors: Mapping[str, np.ndarray],
    mmr_lambda: float,
) -> CandidatePool:
    """The pool of a list of `items` whose next candidates are `following` (best first):
    attributes (`item_attributes`; none known: empty) and similarities of `items` then
    `following`, in that order."""
    ids = [item.item_id for item in (*items, *following)]
    return CandidatePool(
        items=list(following),
        attributes=[attributes.get(i) or ItemAttributes() for i in ids],
        similarities=encode_similarities(similarity_matrix(ids, vectors)),
        mmr_lambda=mmr_lambda,
    )
