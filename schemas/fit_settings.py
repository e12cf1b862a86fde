"""Settings of the recommender's background fit (`workers.fitting.refit`), also what
`relata evaluate`'s default and `relata train` fit with.

Kept apart from `schemas/settings.py` (one file per concern, none over the layout limit); the
same rules hold: `RELATA_*` names, fail fast, nothing else reads the environment.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class FitSettings(BaseSettings):
    """The recommender's background fitter: refits the ranking model on the histories it has
    seen and swaps it in, without a restart, only when it wins on validation."""

    model_config = SettingsConfigDict(
        env_prefix="RELATA_FIT_", extra="forbid", frozen=True, validate_default=True
    )

    enabled: bool = Field(
        True,
        description="Refit in the background (with the `hybrid` strategy); false: keep the "
        "model the recommender starts with.",
    )
    every_updates: int = Field(
        100_000, ge=1, description="Refit after this many profile updates since the last fit."
    )
    interval_s: float = Field(
        3600.0,
        gt=0,
        description="Refit at least this often (seconds) while profile updates arrive.",
    )
    min_users: int = Field(
        1000,
        ge=10,
        description="Fit only with at least this many histories recorded (fewer validation "
        "targets make a noisy comparison).",
    )
    max_users: int = Field(
        50_000,
        ge=10,
        description="Histories recorded for fitting, the latest per user, least recently "
        "updated dropped first (about 230 bytes a history entry).",
    )
    threads: int = Field(
        1, ge=1, le=64, description="CPU threads of a fit (its own process: BLAS, OpenMP)."
    )
    nice: int = Field(
        10, ge=0, le=19, description="CPU priority of the fit process (higher: lower priority)."
    )
    min_gain: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Validation NDCG@k the candidate must beat the current model by to be "
        "swapped in.",
    )
    user_encoder_budget_s: float = Field(
        120.0,
        ge=0.0,
        le=86_400.0,
        description="Seconds each fit may train the sequence user encoder (0: none); it is "
        "served only when its vectors beat the pooled ones on validation.",
    )
    learned_ranker: bool = Field(
        True,
        description="Fit a learned ranker over the blend's best candidates; it is served only "
        "when it wins on validation users it was not trained on.",
    )
    model_path: Path | None = Field(
        None,
        description="Where each winning model is saved (blend-weights JSON) and read at start "
        "(before `RELATA_RECOMMENDER_BLEND_PATH`), so a restart serves the last winner.",
    )
