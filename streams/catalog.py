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

from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas.decoding import Rejection, decode
from schemas.messages import CatalogItem

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
        """Read `topic` from the beginning, set `ready` once caught up, then follow it forever.

        No consumer group: every worker reads every partition (group_id=None assigns all).
        """
        consumer = AIOKafkaConsumer(
            topic,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=poll_ms,
            **consumer_config,
        )
        await consumer.start()
        try:
            end: dict[TopicPartition, int] | None = None
            waited_s = 0.0
            while True:
                batches = await consumer.getmany(timeout_ms=poll_ms, max_records=10_000)
                for records in batches.values():
                    for record in records:
                        try:
                            self.apply(record.key, record.value)
                        except Exception:  # one bad record must not stop the view (or loop)
                            logger.exception(
                                "catalog record skipped %s[%d] offset=%d",
                                record.topic,
                                record.partition,
                                record.offset,
                            )
                    self.records_read += len(records)
                if self.ready.is_set():
                    continue
                assigned = consumer.assignment()
                if not assigned:
                    waited_s += poll_ms / 1000
                    if waited_s >= 10:
                        logger.warning("catalog topic has no partitions yet topic=%s", topic)
                        waited_s = 0.0
                    continue
                if end is None:
                    end = await consumer.end_offsets(list(assigned))
                    logger.info(
                        "catalog view loading topic=%s records<=%d", topic, sum(end.values())
                    )
                positions = [await consumer.position(tp) for tp in assigned]
                if all(pos >= end.get(tp, 0) for tp, pos in zip(assigned, positions, strict=True)):
                    self.ready.set()
                    logger.info(
                        "catalog view ready items=%d records=%d", len(self), self.records_read
                    )
        finally:
            await consumer.stop()
