"""`relata demo --json` end to end: real broker, real model, embedded Qdrant, subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def test_demo_json_reports_recommendations_and_exactly_the_injected_dead_letters(
    kafka_bootstrap: str,
) -> None:
    injected = 4  # one of each: malformed JSON, unknown event type, missing field, future ts
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from relata.cli.main import main; main(prog_name='relata')",
            "demo",
            "--events",
            "300",
            "--rate",
            "200",
            "--inject-invalid",
            str(injected),
            "--json",
            "--kafka-bootstrap-servers",
            kafka_bootstrap,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    last = proc.stdout.strip().splitlines()[-1]
    totals = json.loads(last)
    assert totals["events"] == 300 + injected
    assert totals["recommendations"] > 0
    # The first 300 online-retail events are all valid and name catalog items.
    assert totals["dead_letter"] == injected
    assert totals["dead_letter_by_type"] == {
        "implausible_timestamp": 1,
        "invalid_fields": 1,
        "malformed_json": 1,
        "unknown_event_type": 1,
    }
    latency = totals["latency_ms"]
    assert 0 < latency["p50"] <= latency["p99"]
    # Progress and the recommendations shown go to stderr, with their reasons.
    assert "because" in proc.stderr
    # Live quality judged the same purchases against the live and the shadow lists.
    assert totals["shadow_overrides"] == {"strategy": "vector"}
    quality = totals["live_quality"]
    assert set(quality) == {"live", "shadow"}
    for figures in quality.values():
        assert figures["judged"] > 0
        assert 0 <= figures["hits"] <= figures["judged"]
        assert 0 <= figures["ndcg"] <= figures["hit_rate"] <= 1
    assert "hit rate live" in proc.stderr
