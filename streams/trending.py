"""An in-memory view of the compacted `trending-items` topic: the latest trending list per
placement, the answer to a user with no list of their own.

The recommender ranks the trending list (the most popular available items lately, business
rules applied) and publishes it; every worker of the profiles role follows the whole topic,
so whichever worker owns a user's partition can answer. Invalid records are skipped and
logged (every worker reads them: dead-lettering here would send one dead letter per worker).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from schemas.decoding import Rejection, decode, key_text
from schemas.messages import TrendingList

from .follow import follow_topic

logger = logging.getLogger(__name__)


class TrendingView:
    """The latest `TrendingList` of each placement, and the one this process serves."""

    def __init__(self, placement: str) -> None:
        self.placement = placement
        self._lists: dict[str, TrendingList] = {}
        self.ready = asyncio.Event()

    def current(self) -> TrendingList | None:
        """The served placement's latest list (None: none published yet)."""
        return self._lists.get(self.placement)

    def apply(self, key: bytes | None, value: bytes | None) -> None:
        """Fold one record of `trending-items` (a tombstone removes its placement's list)."""
        if value is None:
            placement = key_text(key)
            if placement:
                self._lists.pop(placement, None)
            return
        decoded = decode(value, TrendingList)
        if isinstance(decoded, Rejection):
            logger.warning("skipping invalid trending list key=%r reason=%s", key, decoded.reason)
            return
        self._lists[decoded.placement] = decoded

    async def follow(self, topic: str, *, consumer_config: Mapping[str, Any]) -> None:
        """Read `topic` from the beginning, then follow it forever."""
        await follow_topic(
            topic,
            apply=self.apply,
            ready=self.ready,
            consumer_config=consumer_config,
            what="trending view",
            size=lambda: len(self._lists),
        )
