"""relata evaluate --diversity-grid: the grid's parsing, and lambda reaching the core."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np
import pytest

from relata.lab.evaluate import rank_users
from relata.lab.evaluate_diversity import diversity_table, parse_grid
from relata.lab.protocol import prepare
from schemas.messages import BehaviorEvent
from workers.ranking import BlendWeights, VectorRows, intra_list_diversity

from .test_evaluate_protocol import _write, ev


def test_grid_parsing_accepts_lambdas_in_the_unit_interval() -> None:
    assert parse_grid("1, 0.9,0.5") == [1.0, 0.9, 0.5]
    for bad in ("", "1.5", "-0.1", "a,b"):
        with pytest.raises(click.BadParameter, match=r"\[0, 1\]"):
            parse_grid(bad)


def test_table_lists_each_lambda() -> None:
    rows = [{"lambda": 1.0, "ndcg": 0.2121, "hr": 0.2943, "diversity": 0.6825}]
    table = diversity_table(rows, 10)
    assert table.splitlines()[0].split() == ["lambda", "NDCG@10", "HR@10", "diversity"]
    assert table.splitlines()[1].split() == ["1.00", "0.2121", "0.2943", "0.6825"]


def test_lambda_reaches_the_core_in_the_evaluation(tmp_path: Path) -> None:
    # Shoppers of "a" also bought three near-duplicates (d1-d3) most often, then o1 and o2.
    events: list[BehaviorEvent] = []
    for n, partner in enumerate(["d1"] * 5 + ["d2"] * 5 + ["d3"] * 4 + ["o1"] * 3 + ["o2"] * 2):
        events += [ev(f"u{n}", "a", 0), ev(f"u{n}", partner, 1), ev(f"u{n}", "zz", 2)]
    events += [ev("q", "a", 0), ev("q", "o1", 5)]  # q's target is o1
    items = {"a", "d1", "d2", "d3", "o1", "o2", "zz"}
    _write(tmp_path / "data", events, items)
    prepared = prepare(tmp_path / "data", progress=False)
    vecs = {
        "d1": [1.0, 0.0, 0.0],
        "d2": [0.99, 0.1, 0.0],
        "d3": [0.99, 0.0, 0.1],
        "o1": [0.0, 1.0, 0.0],
        "o2": [0.0, 0.0, 1.0],
        "a": [0.5, 0.5, 0.5],
        "zz": [0.3, 0.3, 0.9],
    }
    ids = sorted(vecs)
    rows = VectorRows(
        np.array([vecs[i] for i in ids], dtype=np.float32), {i: n for n, i in enumerate(ids)}
    )
    q = next(n for n, c in enumerate(prepared.split.cases) if c.user_id == "q")
    out = {}
    for lam in (1.0, 0.3):
        result = rank_users(
            cases=prepared.split.cases,
            state=prepared.state,
            weights=BlendWeights(vector=0.0),
            k=3,
            hits=None,
            progress=False,
            item_vectors=rows,
            mmr_lambda=lam,
        )
        out[lam] = (result.lists[q], result.ranks[q])
    assert out[1.0] == (["d1", "d2", "d3"], None)
    assert out[0.3][0][0] == "d1" and set(out[0.3][0]) == {"d1", "o1", "o2"}
    assert out[0.3][1] is not None  # the target made the list
    low = intra_list_diversity(out[1.0][0], rows)
    high = intra_list_diversity(out[0.3][0], rows)
    assert low is not None and high is not None and high > low
