"""A short `relata bench` on the full pipeline writes complete JSON and a latency plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def test_bench_writes_json_with_all_keys_and_a_png(kafka_bootstrap: str, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from relata.cli.main import main; main(prog_name='relata')",
            "bench",
            "--rate",
            "50",
            "--duration",
            "10",
            "--warmup",
            "2",
            "--json",
            str(out),
            "--kafka-bootstrap-servers",
            kafka_bootstrap,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    for key in (
        "rate",
        "achieved_rate",
        "latency_ms",
        "max_sustainable_rate",
        "encoder_texts_per_s",
        "encoder_ceiling_texts_per_s",
        "rss_mb",
        "cpu_percent_avg",
        "phases",
        "lag_over_time",
    ):
        assert key in report, key
    assert report["rate"] == 50
    assert set(report["latency_ms"]) == {"p50", "p95", "p99", "max"}
    assert report["latency_ms"]["p50"] <= report["latency_ms"]["p99"] <= report["latency_ms"]["max"]
    # The stream processor's share: event -> profile update, part of event -> recommendation.
    stage = report["profile_stage_latency_ms"]
    assert set(stage) == {"p50", "p95", "p99", "max"}
    assert 0 < stage["p50"] <= stage["max"]
    assert stage["p50"] < report["latency_ms"]["max"]
    assert report["achieved_rate"] > 0
    assert report["encoder_ceiling_texts_per_s"] > 0
    assert report["encoder_texts_per_s"] > 0
    assert {"streams", "workers", "driver"} <= set(report["rss_mb"])
    assert [p["rate"] for p in report["phases"]] == [50, 50]
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
