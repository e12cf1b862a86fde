"""The sequence user encoder: inputs, pooling at the start, artifact round trip and errors,
the fit's contract, the swappable slot."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

from schemas.messages import HistoryEntry
from workers.ranking import pooled_user_vector
from workers.sequence_inputs import AGE_EDGES_S, InputConfig, history_arrays
from workers.user_encoder import (
    ModelConfig,
    SequenceModel,
    UserEncoder,
    UserEncoderError,
    UserEncoderSlot,
    load_user_encoder,
    save_user_encoder,
)
from workers.user_encoder_fit import FitConfig, SequenceSet, fit_user_encoder

DIM = 16
T0 = datetime(2024, 1, 1, tzinfo=UTC)


def entry(
    item: str, *, weight: float = 1.0, kind: str = "purchase", age_s: float = 0.0, count: int = 1
) -> HistoryEntry:
    return HistoryEntry(
        item_id=item,
        weight=weight,
        last_event_type=kind,  # type: ignore[arg-type]
        last_ts=T0 - timedelta(seconds=age_s),
        count=count,
    )


def unit_rows(n: int, seed: int = 0) -> np.ndarray:
    m = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def make_encoder(seed: int = 0, *, trained: bool = True) -> UserEncoder:
    torch.manual_seed(seed)
    config = InputConfig.default(max_len=8)
    model = SequenceModel(ModelConfig(item_dim=DIM, hidden=8, layers=1, heads=2, ff=16), config)
    if trained:  # the zero-initialised heads moved, as after a fit
        with torch.no_grad():
            for p in (*model.weigh.parameters(), *model.out.parameters(), model.query):
                p.normal_(0, 0.3)
    return UserEncoder(
        model=model,
        model_config=ModelConfig(item_dim=DIM, hidden=8, layers=1, heads=2, ff=16),
        input_config=config,
    )


ITEMS = [f"i{n}" for n in range(12)]
MATRIX = unit_rows(len(ITEMS))
VECTORS = {i: MATRIX[n] for n, i in enumerate(ITEMS)}
HISTORIES = [
    [
        entry("i1"),
        entry("i2", age_s=7200, kind="view", weight=0.5),
        entry("i3", age_s=4e7, count=4),
    ],
    [entry("i4")],
    [entry("i5"), entry("i6", weight=-1.0, kind="return"), entry("i7", age_s=90_000)],
]


def test_history_arrays_read_the_profile_most_recent_first() -> None:
    rows = {i: n for n, i in enumerate(ITEMS)}
    config = InputConfig.default(max_len=4)
    arrays = history_arrays([*HISTORIES, [entry("unknown")]], rows, config)
    assert arrays.items[0].tolist() == [1, 2, 3, -1]
    assert [config.event_types[t] for t in arrays.types[0, :3]] == ["purchase", "view", "purchase"]
    # Ages behind the newest entry: same minute, within a day, beyond the longest edge.
    assert arrays.ages[0, :3].tolist() == [0, 2, len(AGE_EDGES_S)]
    assert arrays.counts[0, :3].tolist() == [0, 0, 2]
    # The returned item is read (its type says so) but takes no share of the pooled base.
    assert arrays.items[2, 1] == 6 and arrays.pool[2, 1] == 0.0
    assert arrays.usable().tolist() == [True, True, True, False]


def test_an_untrained_encoder_is_the_pooled_vector() -> None:
    encoder = make_encoder(trained=False)
    config = encoder.input_config
    for history, vector in zip(HISTORIES, encoder.encode(HISTORIES, VECTORS), strict=True):
        pooled = pooled_user_vector(
            history,
            VECTORS,
            recency=config.pool_recency,
            weight_exponent=config.weight_exponent,
            max_items=config.pool_items,
        )
        assert vector is not None and pooled is not None
        np.testing.assert_allclose(vector, pooled, atol=1e-5)


def test_encode_answers_like_pooling_where_no_item_has_a_vector() -> None:
    encoder = make_encoder()
    out = encoder.encode(
        [[entry("nope")], HISTORIES[0], [entry("i6", weight=-1.0, kind="return")]], VECTORS
    )
    assert out[0] is None and out[2] is None
    assert out[1] is not None and abs(float(np.linalg.norm(out[1])) - 1.0) < 1e-5


def test_batch_and_one_by_one_give_the_same_vectors() -> None:
    # Padding to the batch's widest history must not change a short history's vector.
    encoder = make_encoder()
    together = encoder.encode(HISTORIES, VECTORS)
    for history, vector in zip(HISTORIES, together, strict=True):
        alone = encoder.encode([history], VECTORS)[0]
        assert alone is not None and vector is not None
        np.testing.assert_allclose(alone, vector, atol=1e-5)


def test_save_load_round_trip_gives_identical_vectors(tmp_path: Path) -> None:
    encoder = make_encoder()
    encoder.meta["item_vectors"] = {"version": "v1"}
    path = save_user_encoder(tmp_path / "enc", encoder)
    loaded = load_user_encoder(path)
    assert loaded.fingerprint == encoder.fingerprint and loaded.name.startswith("sequence-")
    assert loaded.meta["item_vectors"] == {"version": "v1"}
    for a, b in zip(
        encoder.encode(HISTORIES, VECTORS), loaded.encode(HISTORIES, VECTORS), strict=True
    ):
        assert a is not None and b is not None
        np.testing.assert_array_equal(a, b)


def test_the_fingerprint_changes_with_the_weights() -> None:
    a, b = make_encoder(seed=1), make_encoder(seed=1)
    assert a.fingerprint == b.fingerprint
    with torch.no_grad():
        b.model.out.bias[0] += 1e-3
    assert UserEncoder(b.model, b.model_config, b.input_config).fingerprint != a.fingerprint


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: (p / "weights.safetensors").unlink(), "needs config.json and weights"),
        (
            lambda p: (p / "weights.safetensors").write_bytes(b"\x00" * 40),
            "not readable safetensors",
        ),
        (
            lambda p: (p / "weights.safetensors").write_bytes(
                (p / "weights.safetensors").read_bytes()[:-100]
            ),
            "not readable safetensors",
        ),
        (lambda p: (p / "config.json").write_text("{not json"), "cannot read"),
        (
            lambda p: (p / "config.json").write_text('{"format": "other"}'),
            "not a user-encoder artifact",
        ),
        (lambda p: _edit_config(p, version=99), "version 99"),
        (lambda p: _edit_config(p, hidden=12), "does not fit"),
        (lambda p: _edit_config(p, fingerprint="0" * 16), "do not match the fingerprint"),
    ],
)
def test_a_damaged_artifact_fails_with_a_clear_error(
    tmp_path: Path, damage: object, message: str
) -> None:
    path = save_user_encoder(tmp_path / "enc", make_encoder())
    damage(path)  # type: ignore[operator]
    with pytest.raises(UserEncoderError, match=message):
        load_user_encoder(path)


def _edit_config(
    path: Path,
    *,
    version: int | None = None,
    hidden: int | None = None,
    fingerprint: str | None = None,
) -> None:
    doc = json.loads((path / "config.json").read_text())
    if version is not None:
        doc["version"] = version
    if hidden is not None:
        doc["model"]["hidden"] = hidden
    if fingerprint is not None:
        doc["fingerprint"] = fingerprint
    (path / "config.json").write_text(json.dumps(doc))


def test_a_missing_artifact_names_the_command_that_writes_one(tmp_path: Path) -> None:
    with pytest.raises(UserEncoderError, match="relata train"):
        load_user_encoder(tmp_path / "nothing")


def _ring_sets(
    n_items: int = 40, rows: int = 600, seed: int = 0
) -> tuple[SequenceSet, SequenceSet, np.ndarray]:
    """Histories on a ring of items; the next item is the one after the most recent."""
    rng = np.random.default_rng(seed)
    matrix = np.random.default_rng(1).standard_normal((n_items, DIM)).astype(np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    ids = [f"i{n}" for n in range(n_items)]
    rows_of = {i: n for n, i in enumerate(ids)}
    config = InputConfig.default(max_len=6)

    def make(count: int) -> SequenceSet:
        histories, targets = [], []
        for _ in range(count):
            start = int(rng.integers(n_items))
            length = int(rng.integers(1, 6))
            items = [(start + j) % n_items for j in range(length)]
            histories.append(
                [entry(ids[i], age_s=(length - j) * 60.0) for j, i in enumerate(items)][::-1]
            )
            targets.append((items[-1] + 1) % n_items)
        return SequenceSet(
            history_arrays(histories, rows_of, config), np.asarray(targets, dtype=np.int64)
        )

    return make(rows), make(200), matrix


def test_fit_lowers_the_loss_beats_pooling_and_is_seeded() -> None:
    train, valid, matrix = _ring_sets()
    config = InputConfig.default(max_len=6)
    small = ModelConfig(item_dim=DIM, hidden=16, layers=1, heads=2, ff=32, dropout=0.0)
    fit = FitConfig(batch=64, lr=3e-3, eval_every=10, patience=100, max_epochs=8)
    encoder, report = fit_user_encoder(
        train,
        valid,
        matrix,
        input_config=config,
        time_budget_s=60,
        seed=3,
        model_config=small,
        fit_config=fit,
        # One thread: a small model on a shared machine runs faster without thread hand-offs.
        threads=1,
    )
    assert report.losses[-1][1] < report.losses[0][1]
    assert report.best["recall@10"] > report.pooled["recall@10"]
    assert report.stopped == "epochs" and report.parameters > 0
    again, _ = fit_user_encoder(
        train,
        valid,
        matrix,
        input_config=config,
        time_budget_s=60,
        seed=3,
        model_config=small,
        fit_config=fit,
        # One thread: a small model on a shared machine runs faster without thread hand-offs.
        threads=1,
    )
    assert again.fingerprint == encoder.fingerprint


def test_fit_respects_its_time_budget() -> None:
    train, valid, matrix = _ring_sets()
    _, report = fit_user_encoder(
        train,
        valid,
        matrix,
        input_config=InputConfig.default(max_len=6),
        time_budget_s=0.0,
        model_config=ModelConfig(item_dim=DIM, hidden=8, layers=0, heads=1, ff=8),
    )
    assert report.stopped == "time budget" and report.steps == 0
    # Nothing learned: the encoder is still pooling.
    assert report.best == report.pooled


def test_the_slot_swaps_atomically_under_concurrent_readers() -> None:
    first, second = make_encoder(seed=1), make_encoder(seed=2)
    slot = UserEncoderSlot(first)
    seen: set[str] = set()
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            current = slot.current()
            assert current is first or current is second
            seen.add(current.name)

    readers = [threading.Thread(target=read) for _ in range(4)]
    for t in readers:
        t.start()
    for n in range(200):
        old = slot.swap(second if n % 2 == 0 else first)
        assert old is (first if n % 2 == 0 else second)
    stop.set()
    for t in readers:
        t.join()
    assert slot.current() is first
    assert seen <= {first.name, second.name}
