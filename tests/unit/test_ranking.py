"""workers.ranking: exclusion, reasons, complements, popularity fallback, determinism."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from schemas.messages import Evidence, HistoryEntry, RelatedItem, RelatedItems
from workers.ranking import (
    BlendError,
    BlendWeights,
    RelatedTable,
    VectorRows,
    explain,
    pooled_user_vector,
    popularity_prior,
    profile_text,
    rank,
    score,
    user_evidence,
)

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def entry(item: str, *, weight: float = 8.0, age: int = 0, etype: str = "purchase") -> HistoryEntry:
    return HistoryEntry(
        item_id=item,
        weight=weight,
        last_event_type=etype,  # type: ignore[arg-type]
        last_ts=T0 - timedelta(hours=age),
        count=1,
    )


def related(source: str, *pairs: tuple[str, str, float]) -> RelatedItems:
    return RelatedItems(
        item_id=source,
        item_count=10,
        related=[
            RelatedItem(
                item_id=i, kind=kind, score=s, evidence=Evidence(support=3, text=f"{kind} x3")
            )  # type: ignore[arg-type]
            for i, kind, s in pairs
        ],
        updated_at=T0,
    )


def test_history_and_exclude_never_recommended() -> None:
    history = [entry("a"), entry("b", age=1)]
    rel = {
        "a": related(
            "a",
            ("b", "bought_together", 5.0),
            ("c", "bought_together", 4.0),
            ("d", "next_item", 1.0),
        )
    }
    hits = [("a", 0.99), ("e", 0.9), ("f", 0.8), ("g", 0.7)]
    out = rank(history=history, related=rel, vector_hits=hits, k=10, exclude={"d", "f"})
    ids = [r.item_id for r in out]
    assert set(ids) == {"c", "e", "g"}
    assert not {"a", "b", "d", "f"} & set(ids)


def test_every_reason_names_a_history_item() -> None:
    history = [entry("a"), entry("b", age=1), entry("x", weight=-8.0, age=2, etype="return")]
    rel = {
        "a": related("a", ("c", "bought_together", 2.0)),
        "b": related("b", ("d", "next_item", 1.0)),
    }
    hits = [("e", 0.9), ("f", 0.6)]
    popular = [("p1", 100.0), ("p2", 50.0)]
    vecs = {
        "a": np.array([1.0, 0.0], dtype=np.float32),
        "b": np.array([0.0, 1.0], dtype=np.float32),
        "x": np.array([0.7, 0.7], dtype=np.float32),
    }
    cands = {
        "e": np.array([0.3, 0.95], dtype=np.float32),
        "f": np.array([1.0, 0.0], dtype=np.float32),
    }
    out = rank(
        history=history,
        related=rel,
        vector_hits=hits,
        k=10,
        popularity=popular,
        history_vectors=vecs,
        candidate_vectors=cands,
    )
    assert {r.item_id for r in out} == {"c", "d", "e", "f", "p1", "p2"}
    for item in out:
        assert item.reasons
        for reason in item.reasons:
            assert reason.source_item_id in {"a", "b"}  # never the returned item
            assert reason.text
    by_id = {r.item_id: r for r in out}
    # a vector hit names the history item most similar to it, with the cosine
    assert by_id["e"].reasons[0].source_item_id == "b"
    assert "cosine 0.95" in by_id["e"].reasons[0].text
    assert by_id["f"].reasons[0].source_item_id == "a"
    assert by_id["c"].reasons[0].kind == "bought_together"


def test_complement_of_just_carted_item_ranks_in() -> None:
    history = [entry("cart", weight=4.0, etype="add_to_cart")] + [
        entry(f"old{i}", age=24 * (i + 1)) for i in range(10)
    ]
    rel = {"cart": related("cart", ("charger", "bought_together", 3.0))}
    hits = [(f"sim{i}", 0.95 - i * 0.01) for i in range(50)]
    popular = [(f"pop{i}", 1000.0 - i) for i in range(50)]
    out = rank(history=history, related=rel, vector_hits=hits, k=10, popularity=popular)
    ids = [r.item_id for r in out]
    assert "charger" in ids
    charger = out[ids.index("charger")]
    assert charger.reasons[0].source_item_id == "cart"
    assert charger.reasons[0].kind == "bought_together"
    assert "bought together" in charger.reasons[0].text


def test_popularity_fallback_for_single_event_user() -> None:
    out = rank(
        history=[entry("a")],
        related={},
        vector_hits=[],
        k=3,
        popularity=[("a", 99.0), ("p1", 50.0), ("p2", 40.0), ("p3", 30.0), ("p4", 1.0)],
        weights=BlendWeights(popularity=0.0),
    )
    assert [r.item_id for r in out] == ["p1", "p2", "p3"]
    assert all(r.reasons[0].kind == "popular" and r.reasons[0].source_item_id == "a" for r in out)


def test_order_is_deterministic_with_ties() -> None:
    history = [entry("a")]
    rel = {"a": related("a", *[(f"i{n}", "also_viewed", 1.0) for n in range(20)])}
    first = rank(history=history, related=rel, vector_hits=[], k=5)
    for _ in range(3):
        again = rank(history=history, related=dict(rel), vector_hits=[], k=5)
        assert [r.item_id for r in again] == [r.item_id for r in first]
    assert [r.item_id for r in first] == ["i0", "i1", "i10", "i11", "i12"]


def test_recent_source_outweighs_older_source() -> None:
    history = [entry("new"), entry("old", age=48)]
    rel = {
        "new": related("new", ("from_new", "next_item", 1.0)),
        "old": related("old", ("from_old", "next_item", 1.0)),
    }
    out = rank(history=history, related=rel, vector_hits=[], k=2)
    assert [r.item_id for r in out] == ["from_new", "from_old"]


def test_empty_history_gives_nothing() -> None:
    assert rank(history=[], related={}, vector_hits=[("x", 0.9)], k=5) == []


def test_pooled_user_vector_weights_recent_items_and_skips_returns() -> None:
    vecs = {"a": np.array([1.0, 0.0]), "b": np.array([0.0, 1.0]), "r": np.array([-1.0, 0.0])}
    v = pooled_user_vector(
        [entry("a"), entry("b", age=1), entry("r", weight=-8.0)], vecs, recency=0.5
    )
    assert v is not None
    assert np.isclose(np.linalg.norm(v), 1.0)
    assert v[0] > v[1] > 0  # recent "a" counts twice as much as "b"; the return is ignored
    assert pooled_user_vector([entry("zzz")], vecs) is None


def test_profile_text_lists_recent_titles() -> None:
    text = profile_text(
        [entry("a"), entry("b", etype="view"), entry("r", weight=-1.0), entry("c")],
        {"a": "Rose Lip Balm", "b": "Matte Lipstick", "r": "Returned Thing"},
    )
    assert text == "bought: Rose Lip Balm; viewed: Matte Lipstick"


def test_blend_weights_round_trip_and_version_check(tmp_path: Path) -> None:
    w = BlendWeights(vector=0.7, next_item=2.0, fitted_on={"data": "x"})
    path = tmp_path / "blend.json"
    w.save(path)
    assert BlendWeights.load(path) == w
    path.write_text('{"format": "relata.blend-weights", "version": 99, "weights": {}}')
    with pytest.raises(BlendError, match="version 99"):
        BlendWeights.load(path)
    path.write_text("{not json")
    with pytest.raises(BlendError):
        BlendWeights.load(path)


def test_association_score_is_recency_weighted_sum_of_cosines() -> None:
    # Sources a (most recent) and b; recency 0.5 -> shares 2/3 and 1/3 (weights equal).
    history = [entry("a"), entry("b", age=1)]
    rel = {
        "a": related("a", ("c", "also_bought", 0.6), ("d", "next_item", 0.3)),
        "b": related("b", ("c", "also_bought", 0.3), ("e", "also_bought", 0.9)),
    }
    w = BlendWeights(vector=0.0, popularity=0.0, recency=0.5, next_item=2.0)
    out = rank(history=history, related=rel, vector_hits=[], k=5, weights=w)
    got = {r.item_id: r.score for r in out}
    assert got["c"] == pytest.approx(2 / 3 * 0.6 + 1 / 3 * 0.3)
    assert got["d"] == pytest.approx(2 / 3 * 0.3 * 2.0)
    assert got["e"] == pytest.approx(1 / 3 * 0.9)
    assert [r.item_id for r in out] == ["c", "d", "e"]
    c = out[0]
    assert [(r.source_item_id, r.kind) for r in c.reasons] == [
        ("a", "also_bought"),
        ("b", "also_bought"),
    ]
    assert c.reasons[0].text.startswith("customers who bought a also bought it")


def test_language_model_reranks_behaviour_candidates() -> None:
    # c and d have the same behaviour evidence; only d is close to the user's taste.
    history = [entry("a")]
    rel = {"a": related("a", ("c", "also_bought", 0.5), ("d", "also_bought", 0.5))}
    hits = [("s1", 0.9), ("s2", 0.5)]
    vecs = {
        "a": np.array([1.0, 0.0], dtype=np.float32),
        "c": np.array([0.0, 1.0], dtype=np.float32),
        "d": np.array([0.8, 0.6], dtype=np.float32),
        "s1": np.array([0.9, 0.436], dtype=np.float32),
        "s2": np.array([0.5, 0.866], dtype=np.float32),
    }
    w = BlendWeights(vector=0.1, popularity=0.0, vector_floor=-1.0)
    without = rank(history=history, related=rel, vector_hits=hits, k=4, weights=w)
    assert [r.item_id for r in without][:2] == ["c", "d"]  # tie broken on id
    with_lm = rank(
        history=history,
        related=rel,
        vector_hits=hits,
        k=4,
        weights=w,
        history_vectors=vecs,
        candidate_vectors=vecs,
    )
    ids = [r.item_id for r in with_lm]
    assert ids.index("d") < ids.index("c")
    by_id = {r.item_id: r for r in with_lm}
    # d: cosine 0.8 scaled between the weakest (0.5) and best (0.9) hit -> +0.75 x 0.1;
    # c: cosine 0 is below the weakest hit -> a penalty, bounded at -1 x 0.1.
    assert by_id["d"].score == pytest.approx(0.5 + 0.1 * 0.75, abs=1e-5)
    assert by_id["c"].score == pytest.approx(0.5 - 0.1, abs=1e-5)
    assert {r.kind for r in by_id["d"].reasons} == {"also_bought", "similar"}
    assert all(r.source_item_id == "a" for r in by_id["d"].reasons)


def test_user_evidence_lists_what_evidence_can_propose_and_score_takes_it() -> None:
    history = [entry("a"), entry("r", weight=-8.0, etype="return"), entry("b", age=1)]
    rel = {
        "a": related("a", ("c", "also_bought", 0.5), ("s", "similar", 0.9), ("b", "next_item", 1)),
        "r": related("r", ("z", "also_bought", 0.5)),
    }
    found = user_evidence(history, rel)
    # No returned source, no `similar`, no history item.
    assert found.candidates == ["c"]
    assert [e.item_id for e, _ in found.sources] == ["a", "b"]
    assert found.banned == {"a", "r", "b"}
    assert user_evidence(history, rel, exclude={"c"}).candidates == []
    # Handed to score, it gives what score derives itself.
    options: dict[str, Any] = {"history": history, "related": rel, "vector_hits": [], "k": 5}
    given, derived = score(**options, evidence=found).items, score(**options).items
    assert given == derived and [i for i, _ in given] == ["c"] and given[0][1] > 0


def test_related_table_interns_ids_and_ranks_like_the_lists_it_holds() -> None:
    rel = {
        "a": related("a", ("c", "bought_together", 0.6), ("d", "next_item", 0.3)),
        "b": related("b", ("c", "also_bought", 0.3), ("e", "also_viewed", 0.9)),
    }
    table = RelatedTable.of(rel)
    assert len(table) == 2 and "a" in table and "c" not in table
    lst = table.get("a")
    assert lst is not None and lst.ids == ("c", "d") and lst.texts[0] == "bought_together x3"
    assert table.names(lst.idx.tolist()) == ["c", "d"]
    assert table.index("c") == lst.idx[0]  # one integer per item id, for the table's life
    assert table.known(["c", "zzz"]).tolist() == [lst.idx[0]]  # known() assigns none
    assert table.known(["zzz"]).tolist() == []
    history = [entry("a"), entry("b", age=1)]
    hits = [("f", 0.9), ("c", 0.5)]
    from_lists = rank(history=history, related=rel, vector_hits=hits, k=5)
    from_table = rank(history=history, related=table, vector_hits=hits, k=5)
    assert [r.model_dump() for r in from_table] == [r.model_dump() for r in from_lists]
    table.remove("a")
    assert table.get("a") is None
    assert {r.item_id for r in rank(history=history, related=table, vector_hits=[], k=5)} == {
        "c",
        "e",
    }


def test_explain_words_any_subset_of_the_scored_items_as_rank_does() -> None:
    rel = {"a": related("a", *[(f"i{n}", "also_bought", 1.0 - n / 10) for n in range(6)])}
    history = [entry("a")]
    scored = score(history=history, related=rel, vector_hits=[("v", 0.8), ("i3", 0.7)], k=6)
    full = {
        r.item_id: r
        for r in rank(history=history, related=rel, vector_hits=[("v", 0.8), ("i3", 0.7)], k=6)
    }
    assert [i for i, _ in scored.items] == list(full)
    subset = [i for i, _ in scored.items][::-2]
    worded = explain(scored, subset)
    assert [r.item_id for r in worded] == subset
    assert [r.model_dump() for r in worded] == [full[i].model_dump() for i in subset]
    assert explain(scored, []) == []


def test_vector_rows_gather_skips_unknown_ids_and_matches_the_matrix() -> None:
    matrix = np.arange(12, dtype=np.float32).reshape(4, 3)
    rows = VectorRows(matrix, {"a": 0, "b": 2, "c": 3})
    ids, got = rows.gather(["c", "x", "a"])
    assert ids == ["c", "a"]
    np.testing.assert_array_equal(got, matrix[[3, 0]])
    assert "b" in rows and "x" not in rows and len(rows) == 3 and list(rows) == ["a", "b", "c"]
    np.testing.assert_array_equal(rows["b"], matrix[2])
    ids, got = rows.gather(["x"])
    assert ids == [] and got.shape == (0, 3)


def test_related_table_unique_and_flags_match_numpy() -> None:
    table = RelatedTable()
    ids = [f"i{n}" for n in range(40)]
    for item_id in ids:
        table.index(item_id)
    rng = np.random.default_rng(7)
    for size in (1, 5, 200):
        idx = rng.integers(0, len(ids), size).astype(np.int64)
        uniq, inverse = table.unique(idx)
        want_uniq, want_inverse = np.unique(idx, return_inverse=True)
        assert uniq.tolist() == want_uniq.tolist()
        assert inverse.tolist() == want_inverse.tolist()
    flags = table.flags(["i3", "i7", "never-seen"])
    assert np.flatnonzero(flags).tolist() == [3, 7]
    assert len(flags) == len(ids)  # one flag per interned id; "never-seen" got none


def test_popularity_prior_is_log_scaled_against_the_top_item() -> None:
    weights = BlendWeights(popularity=0.5)
    prior = popularity_prior([("a", 99.0), ("b", 9.0), ("c", 0.0), ("d", -3.0)], weights)
    pw = 0.5 + 1e-6
    assert prior["a"] == pytest.approx(pw)
    assert prior["b"] == pytest.approx(pw * math.log(10.0) / math.log(100.0))
    assert prior["c"] == prior["d"] == 0.0
    assert popularity_prior([], weights) == {}


def test_popularity_prior_adds_to_the_candidates_it_covers() -> None:
    """A behaviour candidate that is also popular gets its association score plus its prior
    (and says so); an uncovered one keeps its association score; the fill comes after."""
    weights = BlendWeights(vector=0.0, popularity=0.5)
    popular = [("c", 99.0), ("b", 9.0), ("p", 5.0)]
    prior = popularity_prior(popular, weights)
    history = [entry("a")]
    rel = {
        "a": related(
            "a",
            ("b", "bought_together", 0.5),
            ("c", "bought_together", 0.5),
            ("d", "bought_together", 0.5),
        )
    }
    alone = score(history=history, related=rel, vector_hits=[], k=5, weights=weights)
    assoc = dict(alone.items)
    assert assoc["b"] == assoc["c"] == assoc["d"]  # equal evidence: the prior decides
    scored = score(
        history=history, related=rel, vector_hits=[], k=5, weights=weights, popularity=popular
    )
    assert dict(scored.items) == {
        "c": assoc["c"] + prior["c"],
        "b": assoc["b"] + prior["b"],
        "d": assoc["d"],  # not in the popularity list: no prior
        "p": prior["p"],  # the fill
    }
    assert [i for i, _ in scored.items][:3] == ["c", "b", "d"]
    assert [s for _, s in scored.items] == sorted((s for _, s in scored.items), reverse=True)
    assert scored.pop_score == {"b": prior["b"], "c": prior["c"], "p": prior["p"]}
    top = explain(scored)[0]
    assert top.item_id == "c" and {r.kind for r in top.reasons} == {"bought_together", "popular"}


def transitions(source: str, *pairs: tuple[str, float, float]) -> RelatedItems:
    """A list of next_item neighbours: (item, cosine score, confidence P(item | source))."""
    return RelatedItems(
        item_id=source,
        item_count=10,
        related=[
            RelatedItem(
                item_id=i,
                kind="next_item",
                score=s,
                evidence=Evidence(support=3, confidence=p, text="chosen next after it 3 times"),
            )
            for i, s, p in pairs
        ],
        updated_at=T0,
    )


BEHAVIOUR_ONLY = BlendWeights(vector=0.0, popularity=0.0)


def test_transitions_rank_by_probability_of_being_next_not_by_cosine() -> None:
    # c: a rare pair (cosine 0.9) that follows a 10% of the time; d follows it 60% of the time.
    rel = {"a": transitions("a", ("c", 0.9, 0.1), ("d", 0.2, 0.6))}
    out = rank(history=[entry("a")], related=rel, vector_hits=[], k=5, weights=BEHAVIOUR_ONLY)
    assert [r.item_id for r in out] == ["d", "c"]
    w = BEHAVIOUR_ONLY.next_item
    assert [r.score for r in out] == pytest.approx([w * 0.6, w * 0.1])


def test_the_last_items_decide_what_comes_next() -> None:
    # a -> c and b -> d are equally likely transitions: whichever was bought last wins.
    rel = {"a": transitions("a", ("c", 0.5, 0.5)), "b": transitions("b", ("d", 0.5, 0.5))}
    a_last = rank(
        history=[entry("a"), entry("b", age=1)],
        related=rel,
        vector_hits=[],
        k=5,
        weights=BEHAVIOUR_ONLY,
    )
    b_last = rank(
        history=[entry("b"), entry("a", age=1)],
        related=rel,
        vector_hits=[],
        k=5,
        weights=BEHAVIOUR_ONLY,
    )
    assert [r.item_id for r in a_last] == ["c", "d"]
    assert [r.item_id for r in b_last] == ["d", "c"]


def test_transitions_and_cooccurrence_decay_with_their_own_recency() -> None:
    # Sources a (last) and b. Co-occurrence without decay: shares 1/2, 1/2; transitions with
    # sequence_recency 0.25: shares 4/5 and 1/5.
    rel = {
        "a": related("a", ("c", "also_bought", 0.4)),
        "b": transitions("b", ("d", 0.3, 0.5)),
    }
    w = BEHAVIOUR_ONLY.model_copy(
        update={"recency": 1.0, "sequence_recency": 0.25, "next_item": 2.0}
    )
    out = rank(history=[entry("a"), entry("b", age=1)], related=rel, vector_hits=[], k=5, weights=w)
    got = {r.item_id: r.score for r in out}
    assert got["c"] == pytest.approx(1 / 2 * 0.4)
    assert got["d"] == pytest.approx(2.0 * 1 / 5 * 0.5)
    reasons = {r.item_id: r.reasons[0] for r in out}
    assert (reasons["d"].source_item_id, reasons["d"].kind) == ("b", "next_item")
