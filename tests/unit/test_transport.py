"""The stream processor's librdkafka sender: what `flush` promises when the broker is away."""

from __future__ import annotations

import asyncio

import pytest

from streams.transport import ConfluentSender, DeliveryError

# Nothing listens on port 1. librdkafka's connection-refused log lines are silenced: its
# threads keep retrying for the rest of the session and would print past pytest's summary.
UNREACHABLE = {"bootstrap.servers": "127.0.0.1:1", "log_level": "0"}


def test_flush_raises_when_records_are_not_acknowledged() -> None:
    # Nothing listens on port 1: the record stays queued, and flush must say so rather than
    # let the agent acknowledge its inputs.
    sender = ConfluentSender(
        {**UNREACHABLE, "partitioner": "murmur2_random"},
        flush_timeout_s=0.5,
    )
    sender.produce("t", key=b"k", value=b"v")
    sender.produce("t", key=b"k", value=None, partition=0)
    # Queued until the flush hands the batch to librdkafka (one produce request per batch).
    assert sender.queued == 2
    with pytest.raises(DeliveryError, match="2 records not acknowledged"):
        asyncio.run(sender.flush())
    assert sender.queued == 0


def test_flush_with_nothing_sent_returns() -> None:
    sender = ConfluentSender(UNREACHABLE, flush_timeout_s=0.5)
    asyncio.run(sender.flush())


def test_flush_leaves_the_event_loop_to_other_tasks_while_it_waits() -> None:
    sender = ConfluentSender(UNREACHABLE, flush_timeout_s=0.3)
    sender.produce("t", key=b"k", value=b"v")
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    async def main() -> None:
        task = asyncio.create_task(ticker())
        with pytest.raises(DeliveryError):
            await sender.flush()
        task.cancel()

    asyncio.run(main())
    assert ticks >= 10  # the other agents ran during the 0.3 s wait
