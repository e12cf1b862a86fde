"""The sequence user encoder learns on real data: a slice of online-retail's customers, the
real MiniLM item vectors (from the evaluation's cache when present)."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from relata.lab.protocol import prepare
from relata.lab.sequences import case_set, training_set
from relata.lab.vectors import item_vectors
from schemas.settings import EncoderSettings
from workers.sequence_inputs import InputConfig
from workers.user_encoder import ModelConfig
from workers.user_encoder_fit import FitConfig, fit_user_encoder

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data" / "online-retail"


def _slice(dest: Path, users: int) -> None:
    """The first `users` customers (by first appearance) with all their events; the whole
    catalog, so its vectors are the cached ones of the full data set."""
    keep: set[str] = set()
    dest.mkdir()
    with (
        gzip.open(DATA / "events.jsonl.gz", "rt") as fh,
        gzip.open(dest / "events.jsonl.gz", "wt") as out,
    ):
        for line in fh:
            user = json.loads(line)["user_id"]
            if user not in keep and len(keep) < users:
                keep.add(user)
            if user in keep:
                out.write(line)
    shutil.copy(DATA / "items.jsonl.gz", dest / "items.jsonl.gz")


@pytest.mark.integration
def test_training_lowers_the_loss_and_beats_pooling_on_real_histories(tmp_path: Path) -> None:
    from workers.encoder import TransformerEncoder

    _slice(tmp_path / "retail", users=200)
    prepared = prepare(tmp_path / "retail", holdout=2, progress=False)
    settings = EncoderSettings()
    cache = settings.cache_dir if settings.cache_dir.is_absolute() else ROOT / settings.cache_dir
    matrix = item_vectors(
        prepared,
        encoder=TransformerEncoder.from_settings(settings),
        cache_dir=cache,
        progress=False,
    )
    config = InputConfig.default(max_len=30)
    train, valid = training_set(prepared, config), case_set(prepared, config)
    assert len(train) > 5000 and len(valid) > 150
    _, report = fit_user_encoder(
        train,
        valid,
        matrix,
        input_config=config,
        time_budget_s=30.0,
        seed=0,
        model_config=ModelConfig(item_dim=matrix.shape[1], hidden=64, layers=1, heads=2, ff=128),
        fit_config=FitConfig(eval_every=40, patience=100, metric="recall@100"),
        threads=1,
    )
    assert report.seconds < 40  # the budget, plus the last validation
    losses = [loss for _, loss in report.losses]
    assert len(losses) >= 3 and losses[-1] < losses[0]
    assert report.best["recall@100"] > report.pooled["recall@100"]
