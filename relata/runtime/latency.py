"""Latency bookkeeping for the demo and the benchmark: percentiles and a time series."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

PERCENTILES: tuple[float, ...] = (50.0, 95.0, 99.0)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) of ascending `sorted_values`, linearly interpolated.

    Matches numpy's default ("linear") method; NaN for an empty sequence.
    """
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be within [0, 100], got {q}")
    n = len(sorted_values)
    if n == 0:
        return math.nan
    position = (n - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, n - 1)
    fraction = position - low
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * fraction


def summarize(values: Iterable[float]) -> dict[str, float]:
    """p50, p95, p99 and max of `values` (NaN when empty), rounded to 0.01."""
    ordered = sorted(values)
    out = {f"p{q:g}": percentile(ordered, q) for q in PERCENTILES}
    out["max"] = ordered[-1] if ordered else math.nan
    return {k: round(v, 2) if not math.isnan(v) else v for k, v in out.items()}


@dataclass
class LatencySeries:
    """Thread-safe (time, latency) samples; summaries overall, since a time, or per window."""

    samples: list[tuple[float, float]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, at: float, latency_ms: float) -> None:
        with self._lock:
            self.samples.append((at, latency_ms))

    def __len__(self) -> int:
        return len(self.samples)

    def values(self, *, since: float | None = None) -> list[float]:
        with self._lock:
            snapshot = list(self.samples)
        return [v for t, v in snapshot if since is None or t >= since]

    def summary(self, *, since: float | None = None) -> dict[str, float]:
        return summarize(self.values(since=since))

    def windows(self, width_s: float, *, origin: float) -> list[tuple[float, dict[str, float]]]:
        """Per-window summaries: (window start relative to `origin`, summary), in time order."""
        with self._lock:
            snapshot = list(self.samples)
        buckets: dict[int, list[float]] = {}
        for t, v in snapshot:
            buckets.setdefault(int((t - origin) // width_s), []).append(v)
        return [(index * width_s, summarize(buckets[index])) for index in sorted(buckets)]
