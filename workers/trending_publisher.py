"""The trending list's publisher: the answer to a user with no list of their own, ranked by the
recommender for an empty history and published to the compacted `trending-items` topic by the
one instance that leads (the composition root: the one holding partition 0 of
`profile-updates`), so that one producer writes its key."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from kafkaio.producer import RecordRefusedError
from schemas.messages import RecommendedItem, TrendingList

logger = logging.getLogger(__name__)

# How often a follower asks again whether it leads.
LEAD_CHECK_S = 1.0


class TrendingPublisher:
    """Ranks the trending list when due (`interval_s`) and publishes it when this instance
    leads and its items changed since the last one it published (the latest wins)."""

    def __init__(
        self,
        *,
        topic: str | None,
        placement: str,
        interval_s: float,
        rank: Callable[[], list[RecommendedItem]],
        describe: Callable[[], dict[str, Any]],
        produce: Callable[..., None],
        leads: Callable[[], bool] | None = None,
    ) -> None:
        self.topic = topic
        self.placement = placement
        self.interval_s = interval_s
        self.rank = rank
        # The model fields of the published list (model, vectors, strategy), as served now.
        self.describe = describe
        self.produce = produce
        # Alone, an instance leads.
        self.leads = leads or (lambda: True)
        self.next_due = 0.0  # time.monotonic() from when it is due
        self.published_ids: list[str] | None = None  # the items of the last one published

    def maybe_publish(self) -> None:
        now = time.monotonic()
        if self.topic is None or self.interval_s <= 0 or now < self.next_due:
            return
        if not self.leads():
            self.next_due = now + min(self.interval_s, LEAD_CHECK_S)
            self.published_ids = None  # should it lead again: publish anew
            return
        self.next_due = now + self.interval_s
        try:
            items = self.rank()
        except Exception:  # a bug in ranking must not stop the answers to the users
            logger.exception("ranking the trending list failed")
            return
        ids = [item.item_id for item in items]
        if not items or ids == self.published_ids:
            return
        value = TrendingList(
            placement=self.placement,
            items=items,
            generated_at=datetime.now(UTC),
            **self.describe(),
        )
        try:
            self.produce(
                self.topic, key=self.placement.encode(), value=value.model_dump_json().encode()
            )
        except RecordRefusedError:  # k items are far below any size limit: a bug, not fatal
            logger.exception("trending list refused placement=%s", self.placement)
            return
        self.published_ids = ids
        logger.info("trending list published placement=%s items=%d", self.placement, len(items))
