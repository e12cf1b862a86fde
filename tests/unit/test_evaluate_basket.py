"""Basket evaluation protocol on small synthetic data with a fake encoder (no model)."""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from relata.lab.evaluate_basket import (
    BasketEvaluationError,
    assign_baskets,
    run_basket,
    split_last_baskets,
)
from schemas.messages import BehaviorEvent
from schemas.settings import EncoderSettings

T0 = datetime(2020, 1, 1, tzinfo=UTC)


class WordHashEncoder:
    """Bag of hashed words: items sharing title words get a high cosine."""

    name = "word-hash"
    version = "1"
    dim = 64

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in text.lower().split():
                out[row, int(hashlib.md5(word.encode()).hexdigest(), 16) % self.dim] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def write_data(path: Path, *, sessions: bool, step: timedelta) -> None:
    """6 themes of 4 items; each user buys 3 baskets of 3 items from one theme."""
    rng = np.random.default_rng(7)
    items = [
        {"item_id": f"t{t}i{i}", "title": f"theme{t} gadget {i}", "categories": []}
        for t in range(6)
        for i in range(4)
    ]
    events = []
    ts = T0
    for u in range(60):
        theme = u % 6
        for b in range(3):
            for i in rng.choice(4, size=3, replace=False):
                ts += step
                row = {
                    "event_id": f"e{len(events)}",
                    "user_id": f"u{u}",
                    "item_id": f"t{theme}i{i}",
                    "event_type": "purchase",
                    "ts": ts.isoformat().replace("+00:00", "Z"),
                }
                if sessions:
                    row["session_id"] = f"u{u}b{b}"
                events.append(row)
    path.mkdir(parents=True, exist_ok=True)
    for name, rows in (("items", items), ("events", events)):
        with gzip.open(path / f"{name}.jsonl.gz", "wt") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)


def ev(i: int, user: str, item: str, session: str | None, hours: float) -> BehaviorEvent:
    return BehaviorEvent(
        event_id=f"e{i}",
        user_id=user,
        item_id=item,
        event_type="purchase",
        ts=T0 + timedelta(hours=hours),
        session_id=session,
    )


def test_last_basket_is_held_out_and_never_trained_on() -> None:
    events = [
        ev(0, "u", "a", "s1", 0),
        ev(1, "u", "b", "s1", 0),
        ev(2, "v", "a", "s9", 1),
        ev(3, "u", "c", "s2", 2),
        ev(4, "u", "d", "s2", 2),
        ev(5, "u", "c", "s2", 2),
    ]
    train, held = split_last_baskets(events)
    assert held == {"u": ["c", "d"], "v": ["a"]}
    assert [e.event_id for e in train] == ["e0", "e1"]


def test_sessionless_data_uses_the_time_window_or_falls_back_to_chunks() -> None:
    close = [ev(i, "u", f"x{i}", None, i * 0.1) for i in range(4)]
    events, definition = assign_baskets(close, window_s=1800, chunk_size=3)
    assert definition == "chunks of 3 events per user"  # too few users for the window rule
    assert [e.session_id for e in events] == ["u#c0", "u#c0", "u#c0", "u#c1"]
    many = [ev(i, f"u{i // 2}", f"x{i}", None, (i % 2) * 0.1) for i in range(40)]
    events, definition = assign_baskets(many, window_s=1800, chunk_size=3)
    assert definition == "time window 1800 s"
    assert events[0].session_id == events[1].session_id != events[2].session_id


@pytest.mark.parametrize(
    ("sessions", "step", "definition"),
    [
        (True, timedelta(minutes=1), "session_id"),
        (False, timedelta(days=1), "chunks of 3 events per user"),  # like amazon-beauty
    ],
)
def test_run_basket_end_to_end_with_fake_encoder(
    tmp_path: Path, sessions: bool, step: timedelta, definition: str
) -> None:
    write_data(tmp_path / "data", sessions=sessions, step=step)
    report = run_basket(
        tmp_path / "data",
        k=3,
        json_out=tmp_path / "out.json",
        fp_min_support=0.05,
        encoder=WordHashEncoder(),
        encoder_settings=EncoderSettings(cache_dir=tmp_path / "cache"),
        progress=False,
    )
    assert report["basket_definition"] == definition
    assert report["baskets"] == 60
    methods = report["methods"]
    assert {m["queries"] for m in methods.values()} == {180}
    # 24 items, 3 candidates of the hidden item's theme once 2 are in the basket: each method
    # that knows themes (words or co-purchases) ranks the hidden item in the top 3 mostly.
    for name in ("similar", "bought_together", "blend"):
        assert methods[name]["hr"] > 0.5, (name, methods)
    assert report["fpgrowth"]["rules"] > 0
    assert report["fpgrowth"]["top100_overlap_no_decay"] == pytest.approx(1.0)
    assert json.loads((tmp_path / "out.json").read_text())["methods"] == methods
    assert list((tmp_path / "cache").glob("items-word-hash-*.npy"))


def test_data_without_multi_item_baskets_is_explained(tmp_path: Path) -> None:
    path = tmp_path / "one"
    path.mkdir()
    with gzip.open(path / "items.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"item_id": "a", "title": "x", "categories": []}) + "\n")
    with gzip.open(path / "events.jsonl.gz", "wt") as fh:
        fh.write(
            json.dumps(
                {
                    "event_id": "1",
                    "user_id": "u",
                    "item_id": "a",
                    "event_type": "purchase",
                    "ts": "2020-01-01T00:00:00Z",
                    "session_id": "s",
                }
            )
            + "\n"
        )
    with pytest.raises(BasketEvaluationError, match=">= 2 catalog items"):
        run_basket(path, encoder=WordHashEncoder(), progress=False)
