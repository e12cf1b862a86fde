"""The fit's user-encoder step: its training rows, that the fit keeps an encoder only when its
vectors win on validation, that the bundle carries it to disk and back, and that the
recommender serves a fitted model's encoder."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from schemas.messages import HistoryEntry
from tests.unit.fitting_fakes import (
    RecordingEvidence,
    entry,
    history,
    ring_histories,
    ring_items,
    ring_store,
)
from tests.unit.test_user_encoder import make_encoder
from workers.client_store import ClientVectorStore
from workers.fitting import ItemSpace, ModelBundle, TrainingData, fit, load_bundle
from workers.fitting.bundle import user_encoder_path
from workers.fitting.encoder_step import SequenceEncoderStep, prefix_rows
from workers.ranking import BlendWeights
from workers.sequence_inputs import InputConfig
from workers.user_encoder import UserEncoder

F32 = np.ndarray


class OracleEncoder:
    """A user encoder that knows the ring: it points at the item after the latest one."""

    name = "oracle"
    version = "1"

    def __init__(self, items: ItemSpace, ring: int = 40) -> None:
        self.items = items
        self.ring = ring

    def user_vectors(
        self, histories: Sequence[Sequence[HistoryEntry]], item_vectors: Mapping[str, F32]
    ) -> list[F32 | None]:
        out: list[F32 | None] = []
        for h in histories:
            latest = int(h[0].item_id[1:])
            out.append(item_vectors[f"i{(latest + 1) % self.ring}"])
        return out

    def save(self, path: Path) -> None:  # pragma: no cover - never saved here
        raise NotImplementedError


class NoiseEncoder(OracleEncoder):
    """A user encoder whose vectors have nothing to do with the user."""

    name = "noise"

    def user_vectors(
        self, histories: Sequence[Sequence[HistoryEntry]], item_vectors: Mapping[str, F32]
    ) -> list[F32 | None]:
        rng = np.random.default_rng(len(histories))
        dim = self.items.matrix.shape[1]
        out = rng.standard_normal((len(histories), dim)).astype(np.float32)
        return list(out / np.linalg.norm(out, axis=1, keepdims=True))


def test_prefix_rows_are_each_positive_entry_after_the_entries_before_it() -> None:
    rows = {"a": 0, "b": 1, "c": 2, "d": 3}
    h = [
        entry("d", step=3, etype="view"),  # not a positive: never a target
        entry("c", step=2),
        entry("x", step=1),  # no vector: never a target
        entry("b", step=1),
        entry("a", step=0),  # the oldest: nothing before it
    ]
    data = prefix_rows({"u": h}, rows, InputConfig.default(max_len=4), "purchase")
    assert data.targets.tolist() == [2, 1]
    # c's row holds x (no vector: an empty slot), b and a; b's row holds a.
    assert data.arrays.items[0].tolist() == [-1, 1, 0, -1]
    assert data.arrays.items[1].tolist() == [0, -1, -1, -1]


def test_the_fit_keeps_an_encoder_only_when_its_vectors_win() -> None:
    histories, items = ring_histories(), ring_items()
    handed: list[TrainingData] = []

    def step(encoder: Any) -> Any:
        def run(training: TrainingData) -> Any:
            handed.append(training)
            return encoder

        return run

    current = ModelBundle(weights=BlendWeights(popularity=1.0, next_item=0.0, vector=0.3))
    common = {"evidence": RecordingEvidence(), "current": current, "k": 5}
    won = fit(histories, items, user_encoder_step=step(OracleEncoder(items)), **common)
    lost = fit(histories, items, user_encoder_step=step(NoiseEncoder(items)), **common)
    pooled = fit(histories, items, **common)
    assert won.candidate.user_encoder is not None
    assert won.candidate.weights.fitted_on is not None
    assert won.candidate.weights.fitted_on["user_encoder"] == "oracle"
    assert won.score > pooled.score
    assert lost.candidate.user_encoder is None and lost.score == pooled.score
    # The step learns from the training histories only: no validation target in them.
    for training in handed:
        for case in split_cases(histories):
            assert case[1] not in {e.item_id for e in training.histories[case[0]]}


def split_cases(histories: Mapping[str, Sequence[HistoryEntry]]) -> list[tuple[str, str]]:
    from workers.fitting import split_histories

    return [(c.user_id, c.target) for c in split_histories(histories).cases]


def test_the_sequence_step_fits_an_encoder_on_the_training_histories() -> None:
    histories, items = ring_histories(), ring_items()
    encoder = SequenceEncoderStep(budget_s=3.0, threads=1)(TrainingData(histories, items))
    assert isinstance(encoder, UserEncoder)
    assert encoder.meta["training"]["rows"] > 0 and encoder.meta["training"]["validation_rows"]
    vectors = encoder.user_vectors(list(histories.values())[:3], items.vectors)
    assert all(v is not None and v.shape == (items.matrix.shape[1],) for v in vectors)


def test_a_bundle_saves_its_encoder_beside_its_weights_and_loads_it(tmp_path: Path) -> None:
    path = tmp_path / "model.json"
    encoder = make_encoder()
    bundle = ModelBundle(weights=BlendWeights(vector=0.2), user_encoder=encoder)
    bundle.save(path)
    loaded = load_bundle(path)
    assert loaded.user_encoder is not None and loaded.user_encoder.name == encoder.name
    assert loaded.version == bundle.version != ModelBundle(weights=BlendWeights(vector=0.2)).version
    # Saved again without one, the stale encoder goes: it would be served with the weights.
    ModelBundle(weights=BlendWeights(vector=0.2)).save(path)
    assert not user_encoder_path(path).exists()
    assert load_bundle(path).user_encoder is None


@pytest.fixture
def store() -> Iterator[ClientVectorStore]:
    s = ring_store()
    yield s
    s.close()


def test_the_recommender_serves_a_fitted_models_encoder(store: ClientVectorStore) -> None:
    from tests.unit.test_refit import Harness

    h = Harness(store)
    encoder = make_encoder()
    model = ModelBundle(weights=BlendWeights(vector=0.5), user_encoder=encoder)

    def answer(user: str) -> dict[str, Any]:
        h.send({user: history("i1", "i2", "i3")})
        h.drain()
        found: dict[str, Any] = h.producer.values("recommendations")[-1]
        return found

    before = answer("u1")
    assert encoder.name not in before["strategy"]
    h.recommender.use_model(model)
    after = answer("u2")
    assert after["ranking_version"] == model.version
    assert encoder.name in after["strategy"]
    # A later model without an encoder hands the slot back to pooling.
    h.recommender.use_model(ModelBundle(weights=BlendWeights(vector=0.5)))
    assert encoder.name not in answer("u3")["strategy"]
