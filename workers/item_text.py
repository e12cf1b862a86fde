"""The one text of a catalog item that the encoder embeds.

Pure logic: title first (it carries most of the meaning), then brand, the most specific
categories and a truncated description. Robust to nulls, empties and stray quoting.
"""

from __future__ import annotations

import re

from schemas.messages import CatalogItem

# The last categories are the specific ones ("Lipstick"); the root ("Beauty") says little.
MAX_CATEGORIES = 3
# MiniLM sees 128 tokens at most by default; ~400 characters of description fill what the
# title leaves without pushing the title's tokens out of the window.
MAX_DESCRIPTION_CHARS = 400

_WHITESPACE = re.compile(r"\s+")
# Some source categories arrive wrapped in leftover CSV quoting: "\"'Beauty", "Eau de Parfum'\"".
_QUOTES = "\"'`"


def _clean(value: str | None) -> str:
    """Collapse whitespace; drop trailing full stops (the parts are joined with ". ")."""
    if not value:
        return ""
    return _WHITESPACE.sub(" ", value).strip().rstrip(".").rstrip()


def _clean_category(value: str) -> str:
    return _clean(value).strip(_QUOTES).strip()


def _truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text[:limit]
    space = cut.rfind(" ")
    # Cut at a word boundary unless that would throw away most of the budget.
    return (cut[:space] if space > limit // 2 else cut).rstrip(" ,;:.") + "…"


def item_categories(item: CatalogItem, *, limit: int = MAX_CATEGORIES) -> list[str]:
    """The item's most specific `limit` categories, cleaned, de-duplicated, general to specific."""
    cleaned: list[str] = []
    for raw in item.categories:
        cat = _clean_category(raw)
        if cat and cat.lower() not in {c.lower() for c in cleaned}:
            cleaned.append(cat)
    return cleaned[-limit:] if limit > 0 else []


def item_text(item: CatalogItem) -> str:
    """Title, brand, specific categories and a truncated description, as one sentence-like text.

    Never empty: an item with no text fields at all is described by its id, so that the
    encoder still gets a deterministic input.
    """
    parts: list[str] = []
    title = _clean(item.title)
    if title:
        parts.append(title)
    brand = _clean(item.brand)
    if brand and brand.lower() not in title.lower():
        parts.append(f"Brand: {brand}")
    categories = item_categories(item)
    if categories:
        parts.append("Category: " + " > ".join(categories))
    description = _clean(item.description)
    if description:
        parts.append(_truncate(description, MAX_DESCRIPTION_CHARS))
    if not parts:
        return f"Item {item.item_id}"
    return ". ".join(parts)
