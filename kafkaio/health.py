"""What a process's probes answer: readiness (it can make progress now) and liveness (it is
not stuck), from watches its Kafka loops keep.

- **Ready** when the brokers answer a metadata request (`BrokerWatch`), no output has waited
  for the broker's acknowledgement longer than `ack_timeout_s`, no consumer has lost its
  partitions without getting them back, and every extra condition holds (the stream
  processor's catalog view is loaded).
- **Live** unless a loop died, or, while the brokers answer, a loop has not come round for
  `stall_timeout_s`, partitions stayed lost that long, or an acknowledgement was awaited that
  long. A broker outage makes a process not ready, never not live: restarting it would not
  bring the broker back, and it resumes by itself once the broker returns.

Pure bookkeeping (no Kafka import): loops call `beat`, `lost`, `assigned` and `failed`; the
clock is injectable for tests.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

Clock = Callable[[], float]
# Since when (clock time) an output waits for acknowledgement; None: nothing waits.
WaitingSince = Callable[[], float | None]


@dataclass(frozen=True, slots=True)
class HealthReport:
    """One answer of the probes: the two verdicts and what is wrong, in words."""

    ready: bool
    live: bool
    broker_reachable: bool
    problems: tuple[str, ...]

    def as_dict(self) -> dict[str, object]:
        return {
            "ready": self.ready,
            "live": self.live,
            "broker_reachable": self.broker_reachable,
            "problems": list(self.problems),
        }


@dataclass(slots=True)
class LoopWatch:
    """The progress of one loop: when it last came round, whether its consumer's partitions
    are lost, whether it died. A loop beats at least every few seconds while it runs (an idle
    consume returns within its timeout), so a beat that does not come means it is stuck."""

    name: str
    clock: Clock = time.monotonic
    last_beat: float = 0.0
    lost_since: float | None = None
    failure: str | None = None

    def __post_init__(self) -> None:
        self.last_beat = self.clock()

    def beat(self) -> None:
        """The loop came round (consumed, handled, or waited idle)."""
        self.last_beat = self.clock()

    def lost(self) -> None:
        """Its consumer lost its partitions (a session timeout; not a cooperative revoke)."""
        if self.lost_since is None:
            self.lost_since = self.clock()

    def assigned(self) -> None:
        """Its consumer got an assignment again."""
        self.lost_since = None

    def failed(self, exc: BaseException) -> None:
        """The loop ended with an error: the process is stuck for good."""
        self.failure = f"{type(exc).__name__}: {exc}"[:300]


class BrokerWatch:
    """Whether the brokers answer: one metadata request every `interval_s` (`check(timeout)`
    raises when they do not answer in time). A paused broker keeps its connections open, so
    only a request that goes unanswered tells it is away."""

    def __init__(
        self,
        check: Callable[[float], None],
        *,
        interval_s: float = 2.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self._check = check
        self.interval_s = interval_s
        self._clock = clock
        self.reachable = True  # the start-up check has just reached them
        self.last_ok = clock()
        self.last_error: str | None = None

    def check_once(self) -> bool:
        """Ask the brokers once (blocks up to `interval_s`); returns whether they answered."""
        try:
            self._check(max(0.5, self.interval_s))
        except Exception as exc:  # any failure means: not reachable now
            if self.reachable:
                logger.warning("brokers not answering error=%s", exc)
            self.reachable, self.last_error = False, str(exc)[:200]
            return False
        if not self.reachable:
            logger.info("brokers answering again after seconds=%.1f", self._clock() - self.last_ok)
        self.reachable, self.last_error = True, None
        self.last_ok = self._clock()
        return True

    def is_reachable(self) -> bool:
        """The last answer, taken as away when no check has finished for 3 intervals."""
        return self.reachable and self._clock() - self.last_ok <= 3 * self.interval_s + 1.0

    def run(self, stop: threading.Event) -> None:
        """Check every `interval_s` until `stop` (a thread's target)."""
        while not stop.is_set():
            started = self._clock()
            self.check_once()
            stop.wait(max(0.0, self.interval_s - (self._clock() - started)))

    def start(self, stop: threading.Event) -> threading.Thread:
        """Run the checks on a daemon thread of their own."""
        thread = threading.Thread(target=self.run, args=(stop,), name="relata-broker-watch")
        thread.daemon = True
        thread.start()
        return thread


@dataclass(slots=True)
class Health:
    """A process's watches and the verdicts of its probes (see the module docstring)."""

    ack_timeout_s: float = 30.0
    stall_timeout_s: float = 180.0
    clock: Clock = time.monotonic
    broker: BrokerWatch | None = None
    loops: list[LoopWatch] = field(default_factory=list)
    waits: list[tuple[str, WaitingSince]] = field(default_factory=list)
    conditions: list[tuple[str, Callable[[], bool]]] = field(default_factory=list)

    def loop(self, name: str) -> LoopWatch:
        """A new watch of one loop, registered here."""
        watch = LoopWatch(name, clock=self.clock)
        self.loops.append(watch)
        return watch

    def wait(self, name: str, since: WaitingSince) -> None:
        """Register an output path's acknowledgement wait (`since()`: when it began)."""
        self.waits.append((name, since))

    def condition(self, name: str, holds: Callable[[], bool]) -> None:
        """Register an extra readiness condition (e.g. the catalog view is loaded)."""
        self.conditions.append((name, holds))

    def brokers_answer(self) -> bool:
        """Whether the broker watch last heard the brokers (True without a watch yet)."""
        return self.broker is None or self.broker.is_reachable()

    def report(self) -> HealthReport:
        """The probes' verdicts now."""
        now = self.clock()
        reachable = self.broker.is_reachable() if self.broker is not None else True
        problems: list[str] = []
        ready = live = True
        if not reachable:
            ready = False
            error = self.broker.last_error if self.broker is not None else None
            problems.append(f"brokers not answering ({error or 'no answer'})")
        for name, holds in self.conditions:
            if not holds():
                ready = False
                problems.append(f"{name}: not yet")
        for name, since in self.waits:
            started = since()
            if started is None:
                continue
            waited = now - started
            if waited > self.ack_timeout_s:
                ready = False
                problems.append(f"{name}: unacknowledged for {waited:.0f} s")
            if reachable and waited > self.stall_timeout_s:
                live = False
        for watch in self.loops:
            if watch.failure is not None:
                ready = live = False
                problems.append(f"{watch.name}: stopped ({watch.failure})")
                continue
            if watch.lost_since is not None:
                ready = False
                lost_s = now - watch.lost_since
                problems.append(f"{watch.name}: partitions lost {lost_s:.0f} s ago")
                if reachable and lost_s > self.stall_timeout_s:
                    live = False
            quiet_s = now - watch.last_beat
            if quiet_s > self.stall_timeout_s:
                problems.append(f"{watch.name}: no progress for {quiet_s:.0f} s")
                if reachable:
                    live = False
        return HealthReport(
            ready=ready, live=live, broker_reachable=reachable, problems=tuple(problems)
        )
