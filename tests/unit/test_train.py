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
from relata.lab.train import fit_adapter, training_pairs
from workers.adapter import load_adapter, save_adapter
from workers.fitting import split_histories
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
    prepared = prepare(data, progress=False)
    pos = {i: n for n, i in enumerate(prepared.item_ids)}
    # The fit's split: the evaluation targets (t) are gone from the profiles, and each user's
    # latest new purchase (a: z, b: z) is its validation target.
    split = split_histories(prepared.state.profiles)
    assert {c.target for c in split.cases} == {"z"}
    prev, nxt = training_pairs(split.training, pos, window=3)
    # Validation and evaluation targets are never learned from; x was bought twice, so a's
    # history holds it once, at its last purchase (after y).
    assert pos["t"] not in nxt.tolist() and pos["z"] not in nxt.tolist()
    assert sorted(map(tuple, np.column_stack([prev, nxt]).tolist())) == sorted(
        [(pos["x"], -1, -1, pos["y"]), (pos["y"], -1, -1, pos["x"])]
    )


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
    assert blend.fitted_on["version"].startswith(("fit-", "builtin"))
    adapter_kept = blend.fitted_on["adapter"] and blend.fitted_on["chosen"] == "candidate"
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
    assert {"hybrid", "hybrid+blend", "pooled+adapter", "hybrid+adapter", "hybrid+fit"} <= set(
        methods
    )
    # The default is what the workers serve: the auto-fit, starting from the artifacts.
    assert report["default"] == "hybrid+fit"
    assert report["fit"]["current"] == BlendWeights.load(out / "blend.json").fitted_on["version"]
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


def test_train_fits_the_user_encoder_on_training_histories_only(
    tmp_path: Path, fake_encoder: HashEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fit's user encoder step learns from the training histories only: no evaluation
    target (e<u>) nor what follows it (a<u>), and not the fit's own validation targets (v<u>),
    neither as a training row, a history item nor its early-stopping target."""
    import workers.fitting.encoder_step as encoder_step

    data = _data_with_secrets(tmp_path / "ring")
    seen: dict[str, Any] = {}
    real_fit = encoder_step.fit_user_encoder

    def spy(train: Any, valid: Any, matrix: Any, **kwargs: Any) -> Any:
        seen.update(train=train, valid=valid)
        return real_fit(train, valid, matrix, **kwargs)

    monkeypatch.setattr(encoder_step, "fit_user_encoder", spy)
    out = tmp_path / "artifacts"
    args = ["train", "--data", str(data), "--out", str(out), "--epochs", "0", "--no-progress"]
    result = CliRunner().invoke(
        main, [*args, "--user-encoder-budget", "10"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    ids = prepare(data, progress=False).item_ids
    learned: set[str] = set()
    for part in (seen["train"], seen["valid"]):
        assert len(part) > 0
        rows = part.arrays.items
        learned |= {ids[i] for i in part.targets.tolist()}
        learned |= {ids[i] for i in rows[rows >= 0].tolist()}
    assert learned and not {i for i in learned if i[0] in "vea"}

    # The encoder is kept only when it wins on validation; either way the artifacts say which.
    blend = BlendWeights.load(out / "blend.json")
    assert blend.fitted_on is not None
    encoder_dir = out / "blend.json.user-encoder"
    chosen = blend.fitted_on["user_encoder"]
    assert (encoder_dir / "weights.safetensors").is_file() == (chosen is not None)

    # Without the encoder, a stale one of an earlier run is removed (it would be served).
    encoder_dir.mkdir(exist_ok=True)
    result = CliRunner().invoke(main, [*args, "--user-encoder-budget", "0"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert not encoder_dir.exists()
