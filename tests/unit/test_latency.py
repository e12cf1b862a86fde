"""Unit tests of the percentile and latency-series code used by demo and bench."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from relata.runtime.latency import LatencySeries, percentile, summarize


def test_percentile_interpolates_like_numpy() -> None:
    rng = random.Random(7)
    for n in (1, 2, 3, 10, 101, 1000):
        values = sorted(rng.expovariate(0.1) for _ in range(n))
        for q in (0, 1, 50, 95, 99, 99.9, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_small_cases() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError, match=r"within \[0, 100\]"):
        percentile([1.0], 101)


def test_summarize_reports_p50_p95_p99_max() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    summary = summarize(reversed(values))
    assert summary == {"p50": 50.5, "p95": 95.05, "p99": 99.01, "max": 100.0}
    assert all(math.isnan(v) for v in summarize([]).values())


def test_latency_series_since_and_windows() -> None:
    series = LatencySeries()
    for t, v in [(100.0, 5.0), (100.5, 7.0), (101.2, 30.0), (103.9, 1.0)]:
        series.add(t, v)
    assert len(series) == 4
    assert series.values(since=101.0) == [30.0, 1.0]
    windows = series.windows(1.0, origin=100.0)
    assert [start for start, _ in windows] == [0.0, 1.0, 3.0]
    assert windows[0][1]["max"] == 7.0
    assert windows[0][1]["p50"] == 6.0
