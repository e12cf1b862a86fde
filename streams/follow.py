"""Follow a whole topic into memory: every partition from the beginning, no consumer group,
with a "caught up" signal. The in-memory views of compacted topics (`CatalogView`,
`TrendingView`, `SimilarView`) are read this way by every worker that serves from them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

logger = logging.getLogger(__name__)

# How long a topic may have no partitions before it is logged (again).
NO_PARTITIONS_LOG_S = 10.0


async def follow_topic(
    topic: str,
    *,
    apply: Callable[[bytes | None, bytes | None], None],
    ready: asyncio.Event,
    consumer_config: Mapping[str, Any],
    what: str,
    size: Callable[[], int] = lambda: 0,
    poll_ms: int = 200,
) -> None:
    """Read `topic` from the beginning into `apply(key, value)`, set `ready` once caught up,
    then follow it forever. `what` names the view in logs, `size` says how much it holds.

    No consumer group: every worker reads every partition (group_id=None assigns all). A record
    that `apply` raises on is logged and skipped: one bad record must not stop the view.
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
    records_read = 0
    try:
        end: dict[TopicPartition, int] | None = None
        waited_s = 0.0
        while True:
            batches = await consumer.getmany(timeout_ms=poll_ms, max_records=10_000)
            for records in batches.values():
                for record in records:
                    try:
                        apply(record.key, record.value)
                    except Exception:
                        logger.exception(
                            "%s record skipped %s[%d] offset=%d",
                            what,
                            record.topic,
                            record.partition,
                            record.offset,
                        )
                records_read += len(records)
            if ready.is_set():
                continue
            assigned = consumer.assignment()
            if not assigned:
                waited_s += poll_ms / 1000
                if waited_s >= NO_PARTITIONS_LOG_S:
                    logger.warning("%s topic has no partitions yet topic=%s", what, topic)
                    waited_s = 0.0
                continue
            if end is None:
                end = await consumer.end_offsets(list(assigned))
                logger.info("%s loading topic=%s records<=%d", what, topic, sum(end.values()))
            positions = [await consumer.position(tp) for tp in assigned]
            if all(pos >= end.get(tp, 0) for tp, pos in zip(assigned, positions, strict=True)):
                ready.set()
                logger.info("%s ready size=%d records=%d", what, size(), records_read)
    finally:
        await consumer.stop()
