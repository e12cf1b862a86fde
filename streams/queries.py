"""Query parameters of the HTTP API, validated: an invalid value is a `BadRequest` that names
its parameter (a 400 with a JSON body), never an exception of the server.

`GET /users/{user_id}/recommendations` takes filters (`category`, `brand`, `min_price`,
`max_price`), `diversity` and `k`; `RECOMMENDATIONS_PARAMETERS` declares them once, for the
parser and for the OpenAPI document.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from schemas.rules import ItemMatch

MAX_K = 100
# Category and brand values: as long as the catalog allows, and a bounded number of them.
MAX_TEXT = 500
MAX_VALUES = 50


class BadRequest(Exception):
    """A query parameter is invalid; the message names it and the valid values."""

    def __init__(self, message: str, **detail: Any) -> None:
        super().__init__(message)
        self.detail = detail


@dataclass(frozen=True, slots=True)
class RecommendationsQuery:
    """What a recommendations request asks for beyond the published list."""

    match: ItemMatch | None  # the filters (None: none)
    diversity: float | None  # MMR lambda = 1 - diversity (None: the list's own lambda)
    k: int | None  # at most this many items (None: as many as published)

    @property
    def mmr_lambda(self) -> float | None:
        return None if self.diversity is None else 1.0 - self.diversity


def _text_schema() -> dict[str, Any]:
    return {"type": "string", "minLength": 1, "maxLength": MAX_TEXT}


RECOMMENDATIONS_PARAMETERS: list[dict[str, Any]] = [
    {
        "name": "category",
        "in": "query",
        "description": "Keep items of any of these categories (repeat the parameter for more).",
        "schema": {"type": "array", "items": _text_schema(), "maxItems": MAX_VALUES},
        "style": "form",
        "explode": True,
    },
    {
        "name": "brand",
        "in": "query",
        "description": "Keep items of any of these brands (repeat the parameter for more).",
        "schema": {"type": "array", "items": _text_schema(), "maxItems": MAX_VALUES},
        "style": "form",
        "explode": True,
    },
    {
        "name": "min_price",
        "in": "query",
        "description": "Keep items priced at least this (an unpriced item never matches).",
        "schema": {"type": "number", "minimum": 0},
    },
    {
        "name": "max_price",
        "in": "query",
        "description": "Keep items priced at most this (an unpriced item never matches).",
        "schema": {"type": "number", "minimum": 0},
    },
    {
        "name": "diversity",
        "in": "query",
        "description": (
            "Re-rank for variety: maximal marginal relevance with lambda = 1 - diversity. 0 "
            "keeps the score order; the published lists use 1 - RELATA_RECOMMENDER_MMR_LAMBDA "
            "(0.1 by default). Absent: the published list's own."
        ),
        "schema": {"type": "number", "minimum": 0, "maximum": 1},
    },
    {
        "name": "k",
        "in": "query",
        "description": "At most this many items (absent: as many as published).",
        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_K},
    },
]
_NAMES = tuple(p["name"] for p in RECOMMENDATIONS_PARAMETERS)


def parse_recommendations_query(query: Any) -> RecommendationsQuery | None:
    """Validate a recommendations request's parameters (raises BadRequest naming the first
    invalid one); None when it has none of them (the published list is the answer). `query`
    is a mapping, or a multi-mapping (`getall`) where a parameter may be repeated."""
    values = {name: _values(query, name) for name in _NAMES}
    if not any(values.values()):
        return None
    categories = _texts("category", values["category"])
    brands = _texts("brand", values["brand"])
    min_price = _number("min_price", values["min_price"], high=None)
    max_price = _number("max_price", values["max_price"], high=None)
    if min_price is not None and max_price is not None and min_price > max_price:
        raise BadRequest(
            f"min_price {min_price} is above max_price {max_price}",
            min_price=min_price,
            max_price=max_price,
        )
    diversity = _number("diversity", values["diversity"], high=1.0)
    k = _integer("k", values["k"])
    filters = categories or brands or min_price is not None or max_price is not None
    match = (
        ItemMatch(categories=categories, brands=brands, min_price=min_price, max_price=max_price)
        if filters
        else None
    )
    return RecommendationsQuery(match=match, diversity=diversity, k=k)


def integer_param(query: Any, name: str) -> int | None:
    """An integer parameter in 1..MAX_K, given once (None: absent; raises BadRequest)."""
    return _integer(name, _values(query, name))


def _values(query: Any, name: str) -> list[str]:
    getall = getattr(query, "getall", None)
    if getall is not None:
        return [str(v) for v in getall(name, [])]
    value = query.get(name)
    return [] if value is None else [str(value)]


def _single(name: str, raw: list[str]) -> str | None:
    if len(raw) > 1:
        raise BadRequest(f"{name} may be given once, got {len(raw)} values", **{name: raw[:5]})
    return raw[0] if raw else None


def _texts(name: str, raw: list[str]) -> list[str]:
    if len(raw) > MAX_VALUES:
        raise BadRequest(f"{name} may be given at most {MAX_VALUES} times", **{name: len(raw)})
    for value in raw:
        if not 1 <= len(value) <= MAX_TEXT:
            raise BadRequest(
                f"{name} must be 1..{MAX_TEXT} characters, got {len(value)}",
                **{name: value[:MAX_TEXT]},
            )
    return raw


def _number(name: str, raw: list[str], *, high: float | None) -> float | None:
    text = _single(name, raw)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    bounds = "a number >= 0" if high is None else f"a number in [0, {high:g}]"
    if not (math.isfinite(value) and value >= 0 and (high is None or value <= high)):
        raise BadRequest(f"{name} must be {bounds}, got {text[:40]!r}", **{name: text[:40]})
    return value


def _integer(name: str, raw: list[str]) -> int | None:
    text = _single(name, raw)
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:  # also a number too long to convert
        value = -1
    if not 1 <= value <= MAX_K:
        raise BadRequest(
            f"{name} must be an integer in 1..{MAX_K}, got {text[:40]!r}", **{name: text[:40]}
        )
    return value
