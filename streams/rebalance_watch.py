"""Watching the Faust consumer's rebalances: readiness while one runs, and a new rejoin when
one stops making progress while the brokers answer.

After a broker outage Faust's consumer rejoins its group and restores the tables from their
changelogs before the agents run again. Rarely, that restore reads nothing and waits for
good, and the role stops with it. A process restart clears it (liveness fails after `stall_timeout_s`), but a rejoin of the group
does too, in seconds: the rebalance it starts runs the restore again from a clean state.
`RebalanceWatch` asks for one when a rebalance has shown no progress for `rejoin_after_s`
while the brokers answer, as the workers renew a consumer left without partitions
(`kafkaio.consumer.RenewingConsumer`). A restore that advances, however slowly, is progress.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from kafkaio.health import LoopWatch

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class RebalanceWatch:
    """Called every second or so (`tick`) on the event loop.

    `rebalancing()`: a rebalance is under way (partitions revoked or lost, not yet assigned
    and restored); `progress()`: a value that changes while it advances (the generation,
    whether a restore runs, how far it has read); `rejoin()`: ask the group for a new
    rebalance; `reachable()`: whether the brokers answer (checked through another client)."""

    rebalancing: Callable[[], bool]
    progress: Callable[[], Hashable]
    rejoin: Callable[[], None]
    reachable: Callable[[], bool]
    watch: LoopWatch
    rejoin_after_s: float
    describe: Callable[[], str] = lambda: ""
    clock: Callable[[], float] = time.monotonic
    _since: float | None = None
    _last: Hashable = None
    rejoins: int = 0

    def tick(self) -> bool:
        """Update the probes' watch; returns whether a rejoin was asked for now."""
        self.watch.beat()  # the event loop runs
        if not self.rebalancing():
            self.watch.assigned()
            self._since = None
            return False
        self.watch.lost()
        now, progress = self.clock(), self.progress()
        if self._since is None or progress != self._last or not self.reachable():
            # Started, advanced, or waiting for the brokers: the wait counts from now.
            self._since, self._last = now, progress
            return False
        stalled = now - self._since
        if stalled < self.rejoin_after_s:
            return False
        logger.warning(
            "rebalance without progress for %.0f s while the brokers answer; "
            "rejoining the group %s",
            stalled,
            self.describe(),
        )
        try:
            self.rejoin()
        except Exception:  # e.g. the consumer is not started yet: try again later
            logger.warning("rejoin request failed", exc_info=True)
        self.rejoins += 1
        self._since = now  # the new rebalance gets as long
        return True


def recovery_progress(app: Any) -> Hashable:
    """How far the app's current rebalance has come: its generation, whether its tables'
    restore runs, and the changelog offsets it has read."""
    try:
        recovery = app.tables.recovery
        offsets = recovery.active_offsets
        return (
            app.consumer_generation_id,
            bool(recovery.in_recovery),
            sum(offsets.values()),
            len(offsets),
        )
    except Exception:  # cannot tell (a Faust without these): never looks stalled
        return object()


def request_rejoin(app: Any) -> None:
    """Ask the app's (aiokafka) group coordinator for a rejoin, on the consumer's own thread.

    Posted to that thread's loop, not called through Faust's method queue: a stuck rebalance
    may be holding the queue's workers."""
    thread = app.consumer._thread
    coordinator = thread._ensure_consumer()._coordinator
    thread.thread_loop.call_soon_threadsafe(coordinator.request_rejoin)


def describe_rebalance(app: Any) -> str:
    """The state a stuck rebalance is in, for the log (best effort: never raises)."""
    parts: list[str] = []
    try:
        recovery = app.tables.recovery
        parts.append(f"generation={app.consumer_generation_id}")
        parts.append(f"in_recovery={bool(recovery.in_recovery)}")
        remaining = {
            f"{tp.topic}[{tp.partition}]": n for tp, n in recovery.active_remaining().items() if n
        }
        parts.append(f"remaining={remaining}")
        consumer = app.consumer
        parts.append(f"flow_active={consumer.flow_active}")
        parts.append(f"paused={len(consumer._paused_partitions)}")
        client = consumer._thread._ensure_consumer()
        subscriptions = client._fetcher._subscriptions
        parts.append(f"reassigning={subscriptions.reassignment_in_progress}")
        parts.append(f"pending_calls={consumer._thread.method_queue._queue.qsize()}")
    except Exception as exc:  # diagnostics only
        parts.append(f"({type(exc).__name__} while describing)")
    return " ".join(parts)
