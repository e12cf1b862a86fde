"""`relata evaluate` end to end on a slice of the real Amazon Beauty data, with the real model."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from relata.cli.main import main

DATA = Path(__file__).resolve().parents[2] / "data" / "amazon-beauty"


def _slice(dest: Path, users: int = 150) -> None:
    """The first `users` users (by first appearance) with all their events and items."""
    keep: set[str] = set()
    events: list[str] = []
    with gzip.open(DATA / "events.jsonl.gz", "rt") as fh:
        for line in fh:
            row = json.loads(line)
            if row["user_id"] not in keep and len(keep) < users:
                keep.add(row["user_id"])
            if row["user_id"] in keep:
                events.append(line)
    items = {json.loads(line)["item_id"] for line in events}
    dest.mkdir()
    with gzip.open(dest / "events.jsonl.gz", "wt") as out:
        out.writelines(events)
    with (
        gzip.open(DATA / "items.jsonl.gz", "rt") as fh,
        gzip.open(dest / "items.jsonl.gz", "wt") as out,
    ):
        out.writelines(line for line in fh if json.loads(line)["item_id"] in items)


@pytest.mark.integration
def test_evaluate_cli_writes_report_and_chart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "beauty-slice"
    _slice(data)
    monkeypatch.setenv("RELATA_ENCODER_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "report.json"
    result = CliRunner().invoke(
        main,
        ["evaluate", "--data", str(data), "--json", str(out), "--no-progress"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["k"] == 10
    # The default is the recommender's own automatic fit, ranked as served.
    assert report["default"] == "hybrid+fit"
    assert report["fit"]["validation_users"] > 0
    assert report["fit"]["swapped"] == (report["fit"]["chosen"] != report["fit"]["current"])
    assert {"evidence", "search", "validate", "total"} <= set(report["fit"]["seconds"])
    assert report["protocol"]["fit_mmr_lambda"] == 0.9
    assert 0 < report["users"] <= 150
    expected = {
        "popularity",
        "knn",
        "knn+recency",
        "knn+transitions",
        "cooccurrence",
        "transitions",
        "profile-text",
        "pooled",
        "behaviour",
        "hybrid",
        "hybrid+fit",
    }
    assert set(report["methods"]) == expected
    for metrics in report["methods"].values():
        assert set(metrics) == {"hr", "ndcg", "mrr", "coverage"}
        assert 0.0 <= metrics["ndcg"] <= metrics["hr"] <= 1.0
    # The language model finds something on real titles.
    assert report["methods"]["pooled"]["hr"] > 0.0
    assert set(report["breakdowns"]["history_length"]["hybrid"]) <= {"1", "2-3", "4-7", "8+"}
    assert out.with_suffix(".png").stat().st_size > 10_000
    # Embeddings were cached: a second run encodes nothing new.
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert any(name.startswith("items-") for name in cached)
    again = CliRunner().invoke(
        main,
        ["evaluate", "--data", str(data), "--methods", "pooled", "--no-progress"],
        catch_exceptions=False,
    )
    assert again.exit_code == 0, again.output
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == cached
