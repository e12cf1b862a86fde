"""The benchmark's phases: the data set's events as an endless stream, replayed at a fixed offered
rate per phase, each phase judged sustainable or not; doubling then bisection finds the maximum
sustainable rate."""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relata.lab.bench_report import json_safe, say
from relata.lab.bench_sampler import Sampler
from relata.runtime.latency import summarize
from relata.runtime.pipeline import Pipeline
from relata.runtime.replay import ReplayProgress, iter_jsonl

SUSTAINED_SHARE = 0.95  # achieved/offered rate below this: the driver or broker is the limit
MAX_RATE = 200_000.0  # stop doubling here
BISECT_STEPS = 3


def endless_events(path: Path, *, cycle_events: int | None = None) -> Iterator[tuple[int, bytes]]:
    """The data set's event lines (only the first `cycle_events` of them, if given), repeated;
    passes after the first rename event ids.

    The stream processor de-duplicates by event id, so a second pass must not reuse them. A
    short cycle replays a fixed population of users and items: after its first pass the state
    is complete, so memory that still grows is a leak (the soak test).
    """
    for cycle in itertools.count():
        for number, raw in itertools.islice(iter_jsonl(path), cycle_events):
            if cycle == 0:
                yield number, raw
                continue
            event = json.loads(raw)
            event["event_id"] = f"{event['event_id']}~{cycle}"
            yield number, json.dumps(event).encode()


@dataclass
class PhaseResult:
    rate: float
    sent: int
    elapsed_s: float
    started: float
    ended: float
    end_lag: int | None
    association_lag: int | None
    latency_ms: dict[str, float]
    drained: bool
    max_p99_ms: float

    @property
    def achieved_rate(self) -> float:
        return self.sent / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def sustainable(self) -> bool:
        p99 = self.latency_ms.get("p99", math.nan)
        lag_ok = self.end_lag is not None and self.end_lag <= max(50.0, self.rate)
        return (
            self.achieved_rate >= SUSTAINED_SHARE * self.rate
            and lag_ok
            and not math.isnan(p99)
            and p99 <= self.max_p99_ms
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "rate": self.rate,
            "achieved_rate": round(self.achieved_rate, 1),
            "sent": self.sent,
            "end_lag": self.end_lag,
            "association_lag": self.association_lag,
            "latency_ms": json_safe(self.latency_ms),
            "sustainable": self.sustainable,
            "drained": self.drained,
        }


@dataclass
class Bench:
    pipeline: Pipeline
    sampler: Sampler
    events: Iterator[tuple[int, bytes]]
    max_p99_ms: float
    phases: list[PhaseResult] = field(default_factory=list)

    def run_phase(self, rate: float, duration_s: float, *, label: str) -> PhaseResult:
        """Replay at `rate` for `duration_s`, then sample the lag and let the pipeline drain."""
        probe = self.pipeline.probe
        assert probe is not None
        started = time.time()
        deadline = time.monotonic() + duration_s
        last_note = [0.0]

        def progress(p: ReplayProgress) -> None:
            now = time.monotonic()
            if now - last_note[0] < 1.0:
                return
            last_note[0] = now
            recent = probe.measured.summary(since=time.time() - 5)
            say(
                f"[{label} {rate:.0f}/s] sent {p.sent} ({p.rate:.0f}/s) "
                f"recommendations {probe.stats.recommendations} "
                f"lag {self.sampler.latest_lag()} p99(5 s) {recent['p99']} ms"
            )

        limit = max(1, int(rate * duration_s)) if rate > 0 else None
        result = self.pipeline.replay(
            rate=rate,
            limit=limit,
            on_progress=progress,
            should_stop=lambda: time.monotonic() >= deadline,
            lines=self.events,
        )
        ended = time.time()
        lags = self.pipeline.lags()
        # The recommendation path: events before the profile agent, updates before the
        # recommender. Association inputs (related-items freshness) are reported apart.
        end_lag = sum(n for name, n in lags.items() if name != "associations")
        drained = self.pipeline.wait_drained(quiet_s=2.0, timeout_s=max(30.0, duration_s * 2))
        # Every recommendation triggered by this phase's events has arrived (or timed out).
        latencies = [v for t, v in probe.measured.samples if started <= t <= time.time()]
        phase = PhaseResult(
            rate=rate,
            sent=result.sent,
            elapsed_s=result.elapsed_s,
            started=started,
            ended=ended,
            end_lag=end_lag,
            association_lag=lags.get("associations"),
            latency_ms=summarize(latencies),
            drained=drained,
            max_p99_ms=self.max_p99_ms,
        )
        say(
            f"[{label} {rate:.0f}/s] achieved {phase.achieved_rate:.0f}/s, end lag {end_lag} "
            f"(association inputs {phase.association_lag}), "
            f"latency {phase.latency_ms} -> {'sustainable' if phase.sustainable else 'NOT sustainable'}"
        )
        self.phases.append(phase)
        return phase

    def find_max(self, start_rate: float, duration_s: float) -> float | None:
        """Doubling from `start_rate` until a rate is not sustainable, then bisection."""
        good: float | None = None
        bad: float | None = None
        rate = start_rate
        while rate <= MAX_RATE:
            if self.run_phase(rate, duration_s, label="find-max").sustainable:
                good = rate
                rate *= 2
            else:
                bad = rate
                break
        if good is None:
            # Even the start rate fails: bisect below it.
            good, bad = 0.0, start_rate
        if bad is None:
            return good
        for _ in range(BISECT_STEPS):
            mid = round((good + bad) / 2)
            if mid <= good or mid >= bad:
                break
            if self.run_phase(mid, duration_s, label="find-max").sustainable:
                good = mid
            else:
                bad = mid
        return good or None
