"""relata train and the evaluation of its artifacts, on synthetic data with a fake encoder."""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from relata.cli.main import main
from relata.lab.evaluate import evaluate
from relata.lab.protocol import prepare
from relata.lab.train import fit_adapter, fit_blend, training_pairs
from workers.adapter import load_adapter, save_adapter
from workers.ranking import BlendWeights

T0 = datetime(2024, 1, 1, tzinfo=UTC)
DIM = 16


class HashEncoder:
    """Deterministic stand-in for the transformer: a unit vector per text from its hash."""

    name = "hash-encoder"
    version = "v1"
    dim = DIM

    def __init__(self) -> None:
        self.calls = 0
        self.max_length = 128

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.calls += 1
        rows = []
        for t in texts:
            seed = int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)
            v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
            rows.append(v / np.linalg.norm(v))
        return np.asarray(rows, dtype=np.float32).reshape(-1, DIM)


def _event(user: str, item: str, step: int, etype: str = "purchase") -> dict[str, object]:
    return {
        "event_id": f"{user}-{step}-{item}",
        "user_id": user,
        "item_id": item,
        "event_type": etype,
        "ts": (T0 + timedelta(hours=step)).isoformat(),
    }


def _data(dir_: Path, users: int = 160, items: int = 40, seed: int = 0) -> Path:
    """Users walk a ring of items (i -> i+1 -> i+2 ...) with some noise: learnable transitions."""
    rng = np.random.default_rng(seed)
    events: list[dict[str, object]] = []
    for u in range(users):
        pos = int(rng.integers(items))
        for step in range(int(rng.integers(4, 9))):
            item = pos if rng.random() > 0.15 else int(rng.integers(items))
            events.append(_event(f"u{u}", f"i{item}", u * 100 + step))
            pos = (pos + 1) % items
    dir_.mkdir(parents=True)
    with gzip.open(dir_ / "items.jsonl.gz", "wt") as fh:
        for i in range(items):
            fh.write(json.dumps({"item_id": f"i{i}", "title": f"product {i}"}) + "\n")
    with gzip.open(dir_ / "events.jsonl.gz", "wt") as fh:
        for e in events:
            fh.write(json.dumps(e) + "\n")
    return dir_


@pytest.fixture
def fake_encoder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> HashEncoder:
    from workers.encoder import TransformerEncoder

    encoder = HashEncoder()
    monkeypatch.setattr(TransformerEncoder, "from_settings", classmethod(lambda cls, s: encoder))
    monkeypatch.setenv("RELATA_ENCODER_CACHE_DIR", str(tmp_path / "cache"))
    return encoder


def test_training_pairs_are_next_items_of_histories_without_repeats_or_returns(
    tmp_path: Path,
) -> None:
    data = tmp_path / "d"
    data.mkdir()
    rows = [
        _event("a", "x", 0),
        _event("a", "y", 1),
        _event("a", "x", 2),  # a repeat is not a new "next" choice
        _event("a", "r", 3, "return"),
        _event("a", "z", 4),
        _event("a", "t", 5),  # evaluation target
    ]
    rows += [_event("b", i, n) for n, i in enumerate(["x", "y", "z", "t"])]
    with gzip.open(data / "items.jsonl.gz", "wt") as fh:
        for i in "xyzrt":
            fh.write(json.dumps({"item_id": i, "title": i}) + "\n")
    with gzip.open(data / "events.jsonl.gz", "wt") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    prepared = prepare(data, holdout=2, progress=False)
    pos = {i: n for n, i in enumerate(prepared.item_ids)}
    prev, nxt = training_pairs(prepared, window=3)
    # Validation targets (a: z, b: z) and evaluation targets (t) are never learned from.
    assert pos["t"] not in nxt.tolist() and pos["z"] not in nxt.tolist()
    assert sorted(nxt.tolist()) == [pos["y"], pos["y"]]
    assert prev.tolist() == [[pos["x"], -1, -1]] * 2


def test_adapter_training_lowers_the_loss_and_stays_near_identity() -> None:
    rng = np.random.default_rng(0)
    items = rng.standard_normal((50, DIM)).astype(np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    prev = rng.integers(0, 50, size=(2000, 3))
    nxt = (prev[:, 0] + 7) % 50  # the next item is a fixed function of the last one
    weight, bias, losses = fit_adapter(items, prev, nxt, recency=0.5, epochs=5, batch=256)
    assert weight.shape == (DIM, DIM) and bias.shape == (DIM,)
    assert losses[-1] < losses[0]
    assert not np.allclose(weight, np.eye(DIM))


def test_blend_search_never_gets_worse_than_its_start(tmp_path: Path) -> None:
    prepared = prepare(_data(tmp_path / "d"), holdout=2, progress=False)
    start = BlendWeights(popularity=0.5, next_item=0.5)
    best, score, trace = fit_blend(prepared, None, k=5, start=start, rounds=1, progress=False)
    assert score >= trace[0]["ndcg"]
    # Without item vectors the vector terms are not searched, and no absent relation kind is.
    searched = {key for row in trace[1:] for key in row if key not in ("round", "ndcg")}
    assert not searched & {"vector", "vector_sharpness", "vector_recency", "bought_together"}
    assert best.vector == start.vector


def test_train_writes_artifacts_that_evaluate_reports_with_and_without(
    tmp_path: Path, fake_encoder: HashEncoder
) -> None:
    data = _data(tmp_path / "ring")
    out = tmp_path / "artifacts"
    result = CliRunner().invoke(
        main,
        [
            "train",
            "--data",
            str(data),
            "--out",
            str(out),
            "--epochs",
            "2",
            "--user-encoder-budget",
            "0",
            "--no-progress",
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    blend = BlendWeights.load(out / "blend.json")
    assert blend.fitted_on is not None and blend.fitted_on["data"] == "ring"
    adapter_kept = blend.fitted_on["adapter"]
    # The adapter is written only when it won on validation (else a stale one is removed).
    assert (out / "adapter.npz").exists() == adapter_kept
    if adapter_kept:
        assert load_adapter(out / "adapter.npz").meta["epochs"] == 2

    # Evaluate sees the artifacts as extra methods; "hybrid" stays the built-in weights. An
    # identity adapter must reproduce the frozen-vector methods exactly.
    identity = save_adapter(tmp_path / "identity.npz", np.eye(DIM), np.zeros(DIM), {})
    report = evaluate(
        data,
        k=5,
        adapter_path=identity,
        blend_path=out / "blend.json",
        progress=False,
        echo=lambda _: None,
    )
    methods = report["methods"]
    assert {"hybrid", "hybrid+blend", "pooled+adapter", "hybrid+adapter"} <= set(methods)
    assert report["default"] == "hybrid+adapter"
    assert methods["pooled+adapter"] == methods["pooled"]
    assert methods["hybrid+adapter"] == methods["hybrid+blend"]
    assert report["protocol"]["hybrid_weights"] == BlendWeights().model_dump(exclude={"fitted_on"})
    assert report["protocol"]["fitted_weights"]["fitted_on"]["data"] == "ring"
    # Without an adapter the fitted blend is the default.
    report = evaluate(
        data,
        k=5,
        methods=["hybrid", "hybrid+blend"],
        blend_path=out / "blend.json",
        progress=False,
        echo=lambda _: None,
    )
    assert report["default"] == "hybrid+blend"


def test_profile_text_baseline_is_cached_under_its_token_limit(
    tmp_path: Path, fake_encoder: HashEncoder
) -> None:
    from relata.lab.evaluate import PROFILE_MAX_TOKENS

    data = _data(tmp_path / "ring")
    evaluate(data, k=5, methods=["profile-text"], progress=False, echo=lambda _: None)
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert any(name.startswith(f"profiles-{PROFILE_MAX_TOKENS}tok-") for name in cached)
    # The shared encoder keeps its own limit (items and the live path use it).
    assert fake_encoder.max_length == 128
    calls = fake_encoder.calls
    evaluate(data, k=5, methods=["profile-text"], progress=False, echo=lambda _: None)
    assert fake_encoder.calls == calls


def test_vectorised_blend_search_scores_as_the_ranking_core_does(tmp_path: Path) -> None:
    from relata.lab.blend_search import BlendSearch
    from relata.lab.eval_metrics import summarize
    from relata.lab.evaluate import rank_users

    prepared = prepare(_data(tmp_path / "d", users=300), holdout=2, progress=False)
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((len(prepared.item_ids), DIM)).astype(np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    search = BlendSearch(prepared, k=5, candidates=10, weights=BlendWeights())
    settings = [
        BlendWeights(vector=0.0),
        BlendWeights(vector=0.0, recency=0.85, sequence_recency=0.3, next_item=0.5),
        BlendWeights(vector=0.0, popularity=0.5),
        BlendWeights(),
        BlendWeights(vector=0.3, vector_sharpness=2.0, vector_recency=0.7),
    ]
    seen = set()
    for w in settings:
        items = matrix if w.vector > 0 else None
        fast = search.ndcg(search.features(items, w), w)
        vin = None if items is None else search.vectors(items, w)
        core = rank_users(
            cases=prepared.split.cases,
            state=prepared.state,
            weights=w,
            k=5,
            hits=None if vin is None else vin.hits,
            progress=False,
            user_vectors=None if vin is None else vin.users,
            item_vectors=None if vin is None else vin.items,
        )
        assert fast == pytest.approx(summarize(core.ranks, k=5).ndcg, abs=1e-12)
        seen.add(round(fast, 6))
    assert len(seen) > 2  # the settings rank differently: the check is not vacuous


def _data_with_secrets(dir_: Path, users: int = 160, items: int = 40) -> Path:
    """Ring walks, then per user a validation target v<u>, the evaluation target e<u> and a
    view of a<u> after it: items no other user touches, so a fit that saw them leaked."""
    _data(dir_, users=users, items=items)
    with gzip.open(dir_ / "events.jsonl.gz", "at") as fh:
        for u in range(users):
            for step, (item, kind) in enumerate(
                [(f"v{u}", "purchase"), (f"e{u}", "purchase"), (f"a{u}", "view")]
            ):
                fh.write(json.dumps(_event(f"u{u}", item, u * 100 + 20 + step, kind)) + "\n")
    with gzip.open(dir_ / "items.jsonl.gz", "at") as fh:
        for u in range(users):
            for item in (f"v{u}", f"e{u}", f"a{u}"):
                fh.write(json.dumps({"item_id": item, "title": f"secret {item}"}) + "\n")
    return dir_


def test_train_fits_the_user_encoder_on_histories_only(
    tmp_path: Path, fake_encoder: HashEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    import relata.lab.sequences as sequences

    data = _data_with_secrets(tmp_path / "ring")
    seen: dict[str, Any] = {}
    real_fit = sequences.fit_user_encoder

    def spy(train: Any, valid: Any, matrix: Any, **kwargs: Any) -> Any:
        seen.update(train=train, valid=valid, matrix=matrix)
        return real_fit(train, valid, matrix, **kwargs)

    monkeypatch.setattr(sequences, "fit_user_encoder", spy)
    out = tmp_path / "artifacts"
    result = CliRunner().invoke(
        main,
        [
            "train",
            "--data",
            str(data),
            "--out",
            str(out),
            "--epochs",
            "0",
            "--user-encoder-budget",
            "20",
            "--no-progress",
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    ids = prepare(data, progress=False).item_ids
    train, valid = seen["train"], seen["valid"]
    learned = {ids[i] for i in train.targets.tolist()}
    learned |= {ids[i] for i in train.arrays.items[train.arrays.items >= 0].tolist()}
    # Nothing of an evaluation target or after it; validation targets only as such.
    assert not {i for i in learned if i[0] in "vea"}
    assert {ids[i] for i in valid.targets.tolist()} == {f"v{u}" for u in range(160)}
    assert not {ids[i] for i in valid.arrays.items[valid.arrays.items >= 0].tolist()} & {
        f"e{u}" for u in range(160)
    }

    # The encoder is written with its blend and the validation verdict; evaluate ranks with
    # both (every evaluation target here is an item no history holds: nothing to find).
    blend = BlendWeights.load(out / "blend.json")
    assert blend.fitted_on is not None
    assert blend.fitted_on["user_encoder"]["name"].startswith("sequence-")
    assert (out / "user_encoder" / "weights.safetensors").is_file()
    fitted = BlendWeights.load(out / "blend-sequence.json").fitted_on
    assert fitted is not None and "better_than_pooled" in fitted
    report = evaluate(
        data,
        k=5,
        methods=["pooled", "sequence", "hybrid+sequence"],
        user_encoder_path=out / "user_encoder",
        sequence_blend_path=out / "blend-sequence.json",
        progress=False,
        echo=lambda _: None,
    )
    assert report["default"] == "hybrid+sequence"
    assert report["protocol"]["user_encoder"]["name"] == blend.fitted_on["user_encoder"]["name"]
    assert set(report["breakdowns"]["history_length"]["sequence"]) <= {"1", "2-3", "4-7", "8+"}

    # Without the encoder, stale artifacts of an earlier run are removed.
    result = CliRunner().invoke(
        main,
        [
            "train",
            "--data",
            str(data),
            "--out",
            str(out),
            "--epochs",
            "0",
            "--user-encoder-budget",
            "0",
            "--no-progress",
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert not (out / "user_encoder").exists() and not (out / "blend-sequence.json").exists()
