"""The learned ranker: its features read the core's own terms, it re-orders what the blend
found, it travels with the model bundle, and the fit keeps it only when it wins on users it
was not trained on."""

from __future__ import annotations

import pickle
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from schemas.messages import Evidence, HistoryEntry
from tests.unit.fitting_fakes import history, ring_store
from workers.client_store import ClientVectorStore
from workers.fitting import ModelBundle, load_bundle
from workers.fitting.offline import ndcg_at
from workers.fitting.ranker_step import fit_ranker
from workers.ranking import (
    BlendWeights,
    FeatureRecorder,
    LearnedRanker,
    RankerError,
    Reranker,
    Scored,
    feature_names,
    recommend,
    score,
    train_model,
)
from workers.ranking.learned import candidate_features

from .ranking_fakes import entry, lookups, related_list

EV = Evidence(support=3, confidence=0.5, text="bought together 3 times")


def column(name: str) -> int:
    return feature_names().index(name)


def test_features_are_the_cores_terms_per_kind_position_and_rank() -> None:
    history = [entry("a"), entry("b", age=1)]
    related = {
        "a": related_list(
            "a",
            ("c", "next_item", 0.4, Evidence(support=3, confidence=0.6, text="next")),
            ("d", "also_bought", 0.3, EV),
        ),
        "b": related_list("b", ("c", "also_bought", 0.5, EV)),
    }
    w = BlendWeights(vector=0.0, popularity=0.0, recency=0.5, sequence_recency=0.5)
    scored = score(history=history, related=related, vector_hits=[], k=10, weights=w)
    x = candidate_features(history, scored)
    ids = [i for i, _ in scored.items]
    assert x.shape == (len(ids), len(feature_names()))
    c, d = ids.index("c"), ids.index("d")
    # c follows the last item a (P 0.6) and was also bought by b's buyers (cosine 0.5).
    assert x[c, column("sequence_at_0")] == pytest.approx(0.6)
    assert x[c, column("cooccurrence_at_1")] == pytest.approx(0.5)
    assert x[c, column("next_item_rows")] == 1 and x[c, column("also_bought_rows")] == 1
    assert x[d, column("cooccurrence_at_0")] == pytest.approx(0.3)
    assert x[d, column("min_source")] == 0 and x[c, column("max_value")] == pytest.approx(0.6)
    assert x[:, column("blend_rank")].tolist() == list(range(1, len(ids) + 1))
    assert x[:, column("blend")] == pytest.approx([s for _, s in scored.items])
    assert set(x[:, column("history")].tolist()) == {2.0}
    # No vector term: every candidate's cosine feature says so.
    assert set(x[:, column("scaled_cosine")].tolist()) == {-1.0}


def _planted(n_users: int, seed: int) -> tuple[list[list[str]], list[np.ndarray], list[str]]:
    """Candidate lists whose target is the item with the highest `scaled_cosine`, not the
    blend's first: a pattern a ranker learns and the blend misses."""
    rng = np.random.default_rng(seed)
    ids, xs, targets = [], [], []
    for u in range(n_users):
        names = [f"u{u}-i{j}" for j in range(20)]
        x = np.zeros((20, len(feature_names())), dtype=np.float32)
        x[:, column("blend_rank")] = np.arange(1, 21)
        x[:, column("scaled_cosine")] = rng.random(20)
        ids.append(names)
        xs.append(x)
        targets.append(names[int(np.argmax(x[:, column("scaled_cosine")]))])
    return ids, xs, targets


def _scored(ids: Sequence[str]) -> Scored:
    items = [(i, float(len(ids) - n)) for n, i in enumerate(ids)]
    return Scored(items, [], "", None, {}, {}, None, None, None, 3)


class _Validation:
    """The validation the ranker step needs: lists through a reranker, over fixed candidate
    features (the core's part is tested apart)."""

    def __init__(self, ids: list[list[str]], xs: list[np.ndarray], targets: list[str]) -> None:
        self.ids, self.xs, self.targets, self.k = ids, xs, targets, 10

    def lists(
        self,
        bundle: ModelBundle,
        *,
        users: Sequence[int] | np.ndarray | None = None,
        reranker: Reranker | None = None,
    ) -> list[list[str]]:
        picked = range(len(self.ids)) if users is None else [int(u) for u in users]
        out = []
        for u in picked:
            scored = [_scored(self.ids[u])]
            if isinstance(reranker, FeatureRecorder):
                reranker.ids.append(list(self.ids[u]))
                reranker.features.append(self.xs[u])
            elif reranker is not None:
                scored = _rerank_fixed(reranker, scored, self.xs[u])
            out.append([i for i, _ in scored[0].items][: self.k])
        return out


def _rerank_fixed(reranker: Reranker, scored: list[Scored], x: np.ndarray) -> list[Scored]:
    assert isinstance(reranker, LearnedRanker)
    odds = reranker.model.decision_function(x)
    order = np.argsort(-odds, kind="stable")
    items = scored[0].items
    return [scored[0]._replace(items=[(items[j][0], float(odds[j])) for j in order])]


def test_the_fit_keeps_a_ranker_that_wins_on_users_it_was_not_trained_on() -> None:
    ids, xs, targets = _planted(400, seed=1)
    validation = _Validation(ids, xs, targets)
    found = fit_ranker(validation, ModelBundle())
    assert found.ranker is not None
    # The blend's lists rank the target at random; the cross-fitted ranker finds it.
    assert found.blend_score == pytest.approx(ndcg_at([i[:10] for i in ids], targets, 10))
    assert found.cross_score > 2 * found.blend_score


def test_the_fit_drops_a_ranker_that_cannot_beat_the_blend() -> None:
    ids, xs, _ = _planted(400, seed=2)
    targets = [names[0] for names in ids]  # the blend's first item: nothing left to gain
    found = fit_ranker(_Validation(ids, xs, targets), ModelBundle())
    assert found.blend_score == pytest.approx(1.0)
    assert found.ranker is None


def _trained() -> LearnedRanker:
    _, xs, _ = _planted(200, seed=4)
    x = np.concatenate(xs)
    y = np.concatenate(
        [(xb[:, column("scaled_cosine")] == xb[:, column("scaled_cosine")].max()) for xb in xs]
    ).astype(np.float64)
    return LearnedRanker(model=train_model(x, y), names=tuple(feature_names()), depth=20)


def test_the_core_serves_what_the_ranker_orders_and_the_recorder_changes_nothing() -> None:
    vectors = {i: np.eye(6, dtype=np.float32)[n] + 0.1 for n, i in enumerate("abcdef")}
    related = {
        "a": related_list(
            "a", *[(i, "also_bought", 0.9 - 0.1 * n, EV) for n, i in enumerate("bcdef")]
        )
    }
    look = lookups(vectors=vectors, related=related)
    history: list[HistoryEntry] = [entry("a")]
    w = BlendWeights(vector=0.0)
    plain = recommend([history], lookups=look, weights=w, k=5)[0]
    recorder = FeatureRecorder()
    recorded = recommend([history], lookups=look, weights=w, k=5, reranker=recorder)[0]
    assert [r.item_id for r in recorded] == [r.item_id for r in plain] == list("bcdef")
    assert recorder.ids[0][:5] == list("bcdef") and recorder.features[0].shape[0] >= 5

    class Reverse:
        depth = 100

        def __call__(
            self, histories: Sequence[Sequence[HistoryEntry]], scored: Sequence[Scored], keep: int
        ) -> list[Scored]:
            return [s._replace(items=list(reversed(s.items))[:keep]) for s in scored]

    reversed_ = recommend([history], lookups=look, weights=w, k=5, reranker=Reverse())[0]
    assert [r.item_id for r in reversed_] == list("fedcb")
    # Reasons are still worded from the evidence the blend found.
    assert all(r.reasons for r in reversed_)


def test_a_ranker_round_trips_with_its_bundle_and_refuses_other_files(tmp_path: Path) -> None:
    ranker = _trained()
    bundle = ModelBundle(weights=BlendWeights(vector=0.1), ranker=ranker)
    path = tmp_path / "model.json"
    bundle.save(path)
    loaded = load_bundle(path)
    assert loaded.ranker is not None and loaded.version == bundle.version
    _, xs, _ = _planted(3, seed=9)
    x = np.concatenate(xs)
    assert loaded.ranker.model.decision_function(x) == pytest.approx(
        ranker.model.decision_function(x)
    )
    # A bundle without a ranker removes a stale one, so it is not loaded with other weights.
    ModelBundle(weights=BlendWeights(vector=0.1)).save(path)
    assert load_bundle(path).ranker is None
    assert ModelBundle(weights=BlendWeights(vector=0.1)).version != bundle.version
    with pytest.raises(RankerError):
        LearnedRanker.from_bytes(b"not a ranker")
    # One fitted on other inputs (another vocabulary of relation kinds) is refused at load.
    doc = {"format": "relata.learned-ranker", "version": 1, "names": ["next_item", "blend"]}
    foreign = pickle.dumps((doc, ranker.model, 30, {}))
    with pytest.raises(RankerError, match="other features"):
        LearnedRanker.from_bytes(foreign)
    with pytest.raises(RankerError, match="other features"):
        LearnedRanker(model=ranker.model, names=("next_item", "blend"))


@pytest.fixture
def store() -> Iterator[ClientVectorStore]:
    s = ring_store()
    yield s
    s.close()


class ReverseModel:
    """A stand-in model (unit test) that ranks the blend's order backwards, and counts."""

    calls = 0

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        ReverseModel.calls += 1
        return np.asarray(x[:, column("blend_rank")], dtype=np.float64)


def test_the_recommender_serves_a_fitted_models_ranker(store: ClientVectorStore) -> None:
    from tests.unit.test_refit import Harness

    h = Harness(store)
    weights = BlendWeights(vector=0.5)

    def answer(user: str) -> dict[str, Any]:
        h.send({user: history("i1", "i2", "i3")})
        h.drain()
        found: dict[str, Any] = h.producer.values("recommendations")[-1]
        return found

    h.recommender.use_model(ModelBundle(weights=weights))
    plain = answer("u1")
    ranker = LearnedRanker(model=ReverseModel(), names=tuple(feature_names()))
    model = ModelBundle(weights=weights, ranker=ranker)
    h.recommender.use_model(model)
    calls = ReverseModel.calls
    ranked = answer("u2")
    assert ReverseModel.calls == calls + 1  # one model call for the batch
    assert ranked["ranking_version"] == model.version != plain["ranking_version"]
    plain_ids = [r["item_id"] for r in plain["items"]]
    ranked_ids = [r["item_id"] for r in ranked["items"]]
    assert ranked_ids != plain_ids and ranked_ids[0] != plain_ids[0]
