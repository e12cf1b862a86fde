"""Basket evaluation end to end on a slice of online-retail, with the real MiniLM encoder."""

from __future__ import annotations

import gzip
import itertools
import json
import shutil
from pathlib import Path

import pytest

from relata.lab.evaluate_basket import METHODS, run_basket
from schemas.settings import EncoderSettings

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data" / "online-retail"


@pytest.mark.integration
def test_basket_evaluation_on_online_retail_slice(tmp_path: Path) -> None:
    data = tmp_path / "retail-slice"
    data.mkdir()
    with (
        gzip.open(DATA / "events.jsonl.gz", "rt") as src,
        gzip.open(data / "events.jsonl.gz", "wt") as dst,
    ):
        dst.writelines(itertools.islice(src, 8000))
    # the whole catalog: its embeddings are cached across runs (keyed by model + texts)
    shutil.copy(DATA / "items.jsonl.gz", data / "items.jsonl.gz")
    out = tmp_path / "basket.json"

    report = run_basket(
        data,
        k=10,
        json_out=out,
        fp_min_support=0.02,
        encoder_settings=EncoderSettings(cache_dir=REPO / ".cache" / "embeddings"),
        progress=False,
    )

    assert json.loads(out.read_text()) == report
    assert report["task"] == "basket"
    assert report["basket_definition"] == "session_id"
    assert set(report["methods"]) == set(METHODS)
    queries = {m["queries"] for m in report["methods"].values()}
    assert len(queries) == 1 and queries.pop() >= 2 * report["baskets"] > 0
    chance = 10 / 3684  # a random ranking's HR@10 over the catalog
    for name, m in report["methods"].items():
        assert 0.0 <= m["ndcg"] <= m["hr"] <= 1.0, name
        assert m["hr"] > 5 * chance, f"{name} is no better than chance: {m}"
    fp = report["fpgrowth"]
    assert fp["rules"] > 0 and fp["pairs"] > 0 and fp["seconds"] > 0
    assert 0.0 <= fp["top100_overlap"] <= 1.0
    # without decay the streaming counts are FP-growth's counts, up to the bounded lists
    assert fp["top100_overlap_no_decay"] >= 0.5
    assert report["streaming_seconds"] > 0 and report["train_events"] < 8000
    assert report["state_partner_entries"] > 0
