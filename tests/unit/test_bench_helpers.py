"""Unit tests of the bench/demo helpers: metric parsing, sustainability, event streams."""

from __future__ import annotations

import contextlib
import gzip
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil
import pytest

from relata.lab.bench_phases import PhaseResult, endless_events
from relata.lab.bench_report import histogram, metric_sum
from relata.lab.bench_sampler import Sampler
from relata.runtime.demo import invalid_events, mixed_lines
from relata.runtime.pipeline import PipelineOptions, canary_ts, pipeline_partitions
from relata.runtime.probes import scrape_metrics
from schemas.decoding import Rejection, decode
from schemas.messages import BehaviorEvent
from schemas.settings import KafkaSettings


def _phase(*, rate: float, sent: int, end_lag: int | None, p99: float) -> PhaseResult:
    return PhaseResult(
        rate=rate,
        sent=sent,
        elapsed_s=10.0,
        started=0.0,
        ended=10.0,
        end_lag=end_lag,
        association_lag=5000,  # related-items freshness: not part of the rule
        latency_ms={"p50": p99 / 2, "p95": p99, "p99": p99, "max": p99},
        drained=True,
        max_p99_ms=250.0,
    )


def test_sustainable_needs_rate_bounded_lag_and_p99() -> None:
    assert _phase(rate=100, sent=1000, end_lag=10, p99=50).sustainable
    assert not _phase(rate=100, sent=900, end_lag=10, p99=50).sustainable  # achieved 90 %
    assert not _phase(rate=100, sent=1000, end_lag=5000, p99=50).sustainable  # lag grew
    assert not _phase(rate=100, sent=1000, end_lag=10, p99=400).sustainable  # too slow
    assert not _phase(rate=100, sent=1000, end_lag=None, p99=50).sustainable
    assert not _phase(rate=100, sent=1000, end_lag=0, p99=math.nan).sustainable


def test_histogram_and_sum_from_prometheus_names() -> None:
    metrics = {
        'relata_encode_batch_size_bucket{le="1.0"}': 2.0,
        'relata_encode_batch_size_bucket{le="+Inf"}': 9.0,
        'relata_encode_batch_size_bucket{le="32.0"}': 7.0,
        "relata_encoded_texts_total": 100.0,
        'relata_dead_letter_total{stage="a",error_type="x"}': 3.0,
        'relata_dead_letter_total{stage="b",error_type="y"}': 4.0,
    }
    assert list(histogram(metrics, "relata_encode_batch_size").items()) == [
        ("1.0", 2.0),
        ("32.0", 7.0),
        ("+Inf", 9.0),
    ]
    assert metric_sum(metrics, "relata_dead_letter_total") == 7.0
    assert metric_sum(metrics, "relata_encoded_texts_total") == 100.0


def test_scrape_metrics_of_an_unreachable_port_is_empty() -> None:
    assert scrape_metrics("http://127.0.0.1:9/metrics", timeout_s=0.5) == {}


def test_endless_events_renames_ids_after_the_first_pass(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text('{"event_id": "a", "user_id": "u"}\n{"event_id": "b", "user_id": "u"}\n')
    ids = [json.loads(raw)["event_id"] for _, raw in itertools.islice(endless_events(path), 6)]
    assert ids == ["a", "b", "a~1", "b~1", "a~2", "b~2"]
    first_only = itertools.islice(endless_events(path, cycle_events=1), 3)
    assert [json.loads(raw)["event_id"] for _, raw in first_only] == ["a", "a~1", "a~2"]


def test_invalid_events_are_each_rejected_with_the_promised_error_type() -> None:
    for error_type, raw in invalid_events(8):
        result = decode(raw, BehaviorEvent)
        assert isinstance(result, Rejection)
        assert result.error_type == error_type


def test_mixed_lines_spreads_invalid_lines_among_real_ones(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text("".join(f'{{"event_id": "e{n}"}}\n' for n in range(20)))
    bad = [("malformed_json", b"{x"), ("malformed_json", b"{y")]
    lines = [raw for _, raw in mixed_lines(path, events=10, invalid=bad)]
    assert len(lines) == 12
    assert lines.index(b"{x") not in (0, 11)
    assert [raw for raw in lines if raw.startswith(b'{"')] == [
        f'{{"event_id": "e{n}"}}'.encode() for n in range(10)
    ]


def test_rss_report_and_series_show_start_mid_end() -> None:
    from relata.lab.bench_report import rss_over_time, rss_report
    from relata.lab.bench_sampler import Sample

    samples = [
        Sample(t=100.0 + i, lag={}, cpu_percent={}, rss_mb={"streams": 50.0 + i}) for i in range(25)
    ]
    assert rss_report(samples) == {
        "streams": {"start": 50.0, "mid": 62.0, "end": 74.0, "max": 74.0}
    }
    series = rss_over_time(samples, origin=100.0, every_s=10.0)
    assert series == [
        [0.0, {"streams": 50.0}],
        [10.0, {"streams": 60.0}],
        [20.0, {"streams": 70.0}],
    ]


def test_the_canary_lives_in_the_replayed_data_sets_time(tmp_path: Path) -> None:
    # A wall-clock canary ahead of years-old replayed events decayed every association to
    # nothing; it takes the first event's time, and the wall clock only without events.
    events = tmp_path / "events.jsonl.gz"
    with gzip.open(events, "wt") as out:
        out.write('{"event_id": "e1", "ts": "2010-12-01T08:26:00Z"}\n')
        out.write('{"event_id": "e2", "ts": "2011-12-09T12:50:00Z"}\n')
    assert canary_ts(events) == "2010-12-01T08:26:00Z"
    missing = datetime.fromisoformat(canary_ts(tmp_path / "none.jsonl.gz"))
    assert abs((datetime.now(UTC) - missing).total_seconds()) < 60


def test_the_pipeline_gives_its_topics_one_partition_unless_partitions_are_configured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One instance of each stage: one partition a topic (fewer produce requests per batch).
    monkeypatch.delenv("RELATA_KAFKA_PARTITIONS", raising=False)
    assert KafkaSettings().partitions == 4  # deployments' default stays
    assert pipeline_partitions(KafkaSettings()) == 1 == PipelineOptions().partitions
    assert pipeline_partitions(KafkaSettings(partitions=6)) == 6  # --kafka-partitions
    monkeypatch.setenv("RELATA_KAFKA_PARTITIONS", "3")
    assert pipeline_partitions(KafkaSettings()) == 3


class _Pids:
    """What Sampler reads of a pipeline: its process ids by name, and lags."""

    def __init__(self, pids: dict[str, int]) -> None:
        self._pids = pids

    def pids(self) -> dict[str, int]:
        return self._pids

    def lags(self) -> dict[str, int]:
        return {"events": 3}


def test_sampler_counts_each_process_with_its_own_children_not_those_sampled_apart() -> None:
    # This process (the driver) -> a sampled stage -> its own child, which allocates 64 MiB and
    # burns CPU: it belongs to the stage's family, and neither to the driver's.
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', "
        "'b = bytearray(64 << 20)\\nwhile True: pass'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    stage = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    grandchild = None
    try:
        assert stage.stdout is not None
        grandchild = int(stage.stdout.readline())
        time.sleep(0.5)  # the 64 MiB allocated
        sampler = Sampler(_Pids({"driver": os.getpid(), "stage": stage.pid}))  # type: ignore[arg-type]
        # (the test process may have other children: a broker started by another test)
        driver = sampler.family("driver")
        assert os.getpid() in driver and not {stage.pid, grandchild} & set(driver)
        assert sampler.family("stage") == sorted([stage.pid, grandchild])
        time.sleep(0.5)
        sample = sampler.sample()
        assert sample.lag == {"events": 3}
        assert sample.rss_mb["stage"] > 64  # the grandchild's allocation, counted
        driver_mb = sum(psutil.Process(p).memory_info().rss for p in driver) / 2**20
        assert abs(sample.rss_mb["driver"] - driver_mb) < 32  # the stage's not counted again
        # The spinning grandchild, counted (any share: the machine may be busy with other work).
        assert sample.cpu_percent["stage"] > 1
    finally:
        stage.kill()
        stage.wait()
        if grandchild is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(grandchild, signal.SIGKILL)
