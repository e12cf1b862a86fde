"""An in-memory view of the compacted `similar-items` topic: `similar` neighbours of every
item, served by `GET /items/{id}/related` whatever the vector store (the embedded one is
opened by the workers' process only).

The item indexer publishes an item's nearest neighbours when it indexes the item; it does not
re-search the lists of those neighbours. Cosine is symmetric, so this view does it instead:
an item is served with its own list merged with every item whose list holds it (with the
cosine from whichever of the two lists is newer). A new item thus appears in the lists of the
items it is close to as soon as its own list arrives. What the merge cannot know: an item
indexed later that is among an older item's nearest but does not count that item among its own.
Retired items are never served (the catalog view says which are available), and their lists
go with their tombstones.
Invalid records are skipped and logged (every worker reads them).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from schemas.decoding import Rejection, decode, key_text
from schemas.messages import RelatedItem, SimilarList

from .catalog import CatalogView
from .follow import follow_topic

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Neighbours:
    updated_at: datetime
    cosines: dict[str, float]  # neighbour id -> cosine, best first


class SimilarView:
    """`SimilarItems` (streams/ports.py) from `similar-items`: each item's published list plus
    the items whose lists hold it."""

    def __init__(self, catalog: CatalogView) -> None:
        self.catalog = catalog
        self._lists: dict[str, _Neighbours] = {}
        # item id -> the items whose published lists hold it (the reverse of `_lists`)
        self._listed_by: dict[str, set[str]] = {}
        self.ready = asyncio.Event()

    def __len__(self) -> int:
        return len(self._lists)

    def apply(self, key: bytes | None, value: bytes | None) -> None:
        """Fold one record of `similar-items` (a tombstone removes the item's list)."""
        if value is None:
            item_id = key_text(key)
            if item_id:
                self._drop(item_id)
            return
        decoded = decode(value, SimilarList)
        if isinstance(decoded, Rejection):
            logger.warning("skipping invalid similar list key=%r reason=%s", key, decoded.reason)
            return
        self._drop(decoded.item_id)
        cosines = {
            r.item_id: r.evidence.cosine if r.evidence.cosine is not None else r.score
            for r in decoded.related
            if r.item_id != decoded.item_id
        }
        self._lists[decoded.item_id] = _Neighbours(decoded.updated_at, cosines)
        for neighbour in cosines:
            self._listed_by.setdefault(neighbour, set()).add(decoded.item_id)

    def _drop(self, item_id: str) -> None:
        old = self._lists.pop(item_id, None)
        if old is None:
            return
        for neighbour in old.cosines:
            holders = self._listed_by.get(neighbour)
            if holders is not None:
                holders.discard(item_id)
                if not holders:
                    del self._listed_by[neighbour]

    def similar(
        self, item_id: str, *, k: int, categories: Sequence[str] | None
    ) -> list[RelatedItem] | None:
        """Up to k available neighbours, best first; with `categories` (the item's own) only
        those that share one with it. None when no list names the item."""
        own = self._lists.get(item_id)
        holders = self._listed_by.get(item_id, set())
        if own is None and not holders:
            return None
        cosines: dict[str, float] = dict(own.cosines) if own is not None else {}
        for other in holders:
            theirs = self._lists[other]
            if other not in cosines or own is None or theirs.updated_at > own.updated_at:
                cosines[other] = theirs.cosines[item_id]
        # Only available items (a retired one stays in older lists until they are remade),
        # filtered before the k are taken so that retired neighbours never shorten the answer.
        catalog = self.catalog
        ranked = sorted(
            ((other, cosine) for other, cosine in cosines.items() if other in catalog),
            key=lambda pair: (-pair[1], pair[0]),
        )
        if categories:
            own_categories = set(categories)
            ranked = [
                (other, cosine)
                for other, cosine in ranked
                if own_categories & set(self.catalog.categories(other) or ())
            ]
        return [RelatedItem.similar(other, cosine) for other, cosine in ranked[:k]]

    async def follow(self, topic: str, *, consumer_config: Mapping[str, Any]) -> None:
        """Read `topic` from the beginning, then follow it forever."""
        await follow_topic(
            topic,
            apply=self.apply,
            ready=self.ready,
            consumer_config=consumer_config,
            what="similar view",
            size=self.__len__,
        )
