"""The recommender with the sequence user encoder: its vectors are searched, pooling is the
fallback, recommendations name the encoder, and swapping it while batches run is safe."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from schemas.messages import HistoryEntry
from schemas.settings import RecommenderSettings
from tests.unit import test_recommender
from tests.unit.test_recommender import Harness, _update
from tests.unit.worker_fakes import FakeEncoder
from workers.client_store import ClientVectorStore
from workers.sequence_inputs import InputConfig
from workers.user_encoder import (
    ModelConfig,
    SequenceModel,
    UserEncoder,
    UserEncoderError,
    load_user_encoder,
    save_user_encoder,
)

# The recommender tests' in-memory store of a small catalog, as a fixture here too.
store = test_recommender.store


def encoder(seed: int) -> UserEncoder:
    """A small encoder whose learned parts are not zero: its vectors are not the pooled ones."""
    torch.manual_seed(seed)
    config = ModelConfig(item_dim=FakeEncoder.dim, hidden=8, layers=1, heads=2, ff=16)
    model = SequenceModel(config, InputConfig.default(max_len=10))
    with torch.no_grad():
        for p in (*model.weigh.parameters(), *model.out.parameters(), model.query):
            p.normal_(0, 0.5)
    return UserEncoder(model, config, InputConfig.default(max_len=10), meta={})


class Spy:
    """Records the user-vector matrices the recommender searches with."""

    def __init__(self, store: ClientVectorStore) -> None:
        self.matrices: list[np.ndarray] = []
        self._search = store.search_batch

        def search_batch(matrix: np.ndarray, **kwargs: Any) -> Any:
            self.matrices.append(np.array(matrix))
            return self._search(matrix, **kwargs)

        store.search_batch = search_batch  # type: ignore[method-assign]


def _histories(*updates: dict[str, Any]) -> list[list[HistoryEntry]]:
    return [[HistoryEntry.model_validate(e) for e in u["history"]] for u in updates]


def test_user_vectors_come_from_the_encoder(store: ClientVectorStore, tmp_path: Path) -> None:
    enc = load_user_encoder(save_user_encoder(tmp_path / "enc", encoder(1)))
    h = Harness(store, user_vector="sequence")
    h.recommender.swap_user_encoder(enc)
    spy = Spy(store)
    updates = [_update("u", "lip1", "lip2"), _update("v", "sh1", "sh2")]
    for u in updates:
        h.consumer.add_json(u, key=u["user_id"])
    h.recommender.poll_once()
    recs = h.recs()
    assert {r["strategy"] for r in recs.values()} == {f"hybrid/{enc.name}"}
    # The searched vectors are the encoder's, not the pooled ones.
    expected = enc.encode(_histories(*updates), h.recommender.cache.vectors())
    assert len(spy.matrices) == 1
    np.testing.assert_allclose(spy.matrices[0], np.stack(expected), atol=1e-6)  # type: ignore[arg-type]
    pooled = list(h.recommender._pooled(_histories(*updates)))
    assert not np.allclose(spy.matrices[0][0], pooled[0])  # type: ignore[arg-type]
    assert h.metrics.user_encoder_seconds._sum.get() > 0  # type: ignore[attr-defined]


def test_users_without_item_vectors_fall_back_to_pooling(store: ClientVectorStore) -> None:
    h = Harness(store, user_vector="sequence")
    h.recommender.swap_user_encoder(encoder(1))
    h.consumer.add_json(_update("u", "lip1"), key="u")
    h.consumer.add_json(_update("cold", "not-indexed"), key="cold")
    h.recommender.poll_once()
    recs = h.recs()
    assert recs["u"]["strategy"].startswith("hybrid/sequence-")
    # No item vector: what pooling answers (no user vector: no vector hits either).
    assert recs["cold"]["strategy"] == "hybrid/pooled"
    assert not any(r["kind"] == "similar" for i in recs["cold"]["items"] for r in i["reasons"])


def test_without_an_encoder_sequence_pools(store: ClientVectorStore) -> None:
    h = Harness(store, user_vector="sequence")
    h.consumer.add_json(_update("u", "lip1", "lip2"), key="u")
    h.recommender.poll_once()
    assert h.recs()["u"]["strategy"] == "hybrid/pooled"
    assert h.recommender.swap_user_encoder(encoder(1)) is None
    h.consumer.add_json(_update("u", "lip1", "lip2"), key="u")
    h.recommender.poll_once()
    assert h.recs()["u"]["strategy"].startswith("hybrid/sequence-")


def test_swapping_while_batches_run_gives_each_batch_one_encoder(
    store: ClientVectorStore,
) -> None:
    first, second = encoder(1), encoder(2)
    h = Harness(store, user_vector="sequence", max_batch=4)
    h.recommender.swap_user_encoder(first)
    users = [f"u{n}" for n in range(4)]
    batches = 60
    for _ in range(batches):
        for user in users:
            h.consumer.add_json(_update(user, "lip1", "sh1"), key=user)
    stop = threading.Event()
    swaps = 0

    def swap() -> None:
        nonlocal swaps
        while not stop.is_set():
            h.recommender.swap_user_encoder(second if swaps % 2 == 0 else first)
            swaps += 1

    swapper = threading.Thread(target=swap)
    swapper.start()
    try:
        labels = [
            {r.strategy for r in h.recommender.poll_once().recommendations} for _ in range(batches)
        ]
    finally:
        stop.set()
        swapper.join()
    assert swaps > 0
    names = {f"hybrid/{first.name}", f"hybrid/{second.name}"}
    for batch in labels:
        assert len(batch) == 1 and batch <= names  # one encoder for the whole batch


def test_an_encoder_of_other_item_vectors_is_refused(store: ClientVectorStore) -> None:
    h = Harness(store, user_vector="sequence")
    stale = encoder(1)
    stale.meta["item_vectors"] = {"version": "another-model"}
    with pytest.raises(UserEncoderError, match="refit"):
        h.recommender.swap_user_encoder(stale)
    assert h.recommender.user_encoders.current() is None
    fitting = encoder(1)
    fitting.meta["item_vectors"] = {"version": FakeEncoder.version}
    h.recommender.swap_user_encoder(fitting)
    assert h.recommender.user_encoders.current() is fitting


def test_an_encoder_path_needs_the_sequence_user_vector(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="USER_VECTOR=sequence"):
        RecommenderSettings(user_encoder_path=tmp_path)
    assert RecommenderSettings(user_vector="sequence", user_encoder_path=tmp_path).user_encoder_path
