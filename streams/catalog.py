"""An in-memory view of the compacted `item-catalog` topic: which items exist and are available.

Every streams worker reads *all* partitions of `item-catalog` (like a Faust GlobalTable, but
with an explicit "caught up" signal): the profile agent waits for `ready` before its first
event, so a restart does not dead-letter events of items the view has not read back yet.
A tombstone or `available=false` retires an item; invalid catalog records (too large, nested
too deeply, malformed, ...) are skipped here (the item indexer dead-letters them).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from schemas.decoding import Rejection, decode
from schemas.messages import CatalogItem

from .follow import follow_topic

logger = logging.getLogger(__name__)


class CatalogView:
    """Known, available items and their categories, fed from `item-catalog`."""

    def __init__(self) -> None:
        self._items: dict[str, tuple[str, ...]] = {}
        self.ready = asyncio.Event()
        self.records_read = 0

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._items

    def __len__(self) -> int:
        return len(self._items)

    def shown(self, item_id: str) -> bool:
        """Whether a related list may show the item: it is available, or the view is still
        loading (a partly read catalog cannot tell a retired item from one not read yet)."""
        return item_id in self._items or not self.ready.is_set()

    def categories(self, item_id: str) -> tuple[str, ...] | None:
        """The item's categories, or None when it is unknown or retired."""
        return self._items.get(item_id)

    def apply(self, key: bytes | None, value: bytes | None) -> None:
        """Fold one catalog record into the view (tombstones and available=false retire)."""
        if value is None:
            if key is not None:
                self._items.pop(key.decode("utf-8", errors="replace"), None)
            return
        item = decode(value, CatalogItem)
        if isinstance(item, Rejection):
            logger.debug("skipping invalid catalog record key=%r reason=%s", key, item.reason)
            return
        if item.available:
            self._items[item.item_id] = tuple(item.categories)
        else:
            self._items.pop(item.item_id, None)

    def set_items(self, items: Mapping[str, tuple[str, ...]]) -> None:
        """Replace the view (unit tests) and mark it ready."""
        self._items = dict(items)
        self.ready.set()

    async def follow(
        self, topic: str, *, consumer_config: Mapping[str, Any], poll_ms: int = 200
    ) -> None:
        """Read `topic` from the beginning, set `ready` once caught up, then follow it forever
        (`streams.follow.follow_topic`: every worker reads every partition)."""
        await follow_topic(
            topic,
            apply=self._apply_counted,
            ready=self.ready,
            consumer_config=consumer_config,
            what="catalog view",
            size=self.__len__,
            poll_ms=poll_ms,
        )

    def _apply_counted(self, key: bytes | None, value: bytes | None) -> None:
        self.records_read += 1
        self.apply(key, value)
