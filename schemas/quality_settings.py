"""Settings of live quality (`relata workers --role quality`) and of the shadow recommender.

Kept apart from `schemas/settings.py` (one file per concern, none over the layout limit); the
same rules hold: `RELATA_*` names, fail fast, nothing else reads the environment.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.settings import RecommenderSettings

# Recommender settings a shadow cannot change: its group is derived from the live one's (the
# ACLs grant the live group as a prefix), and it serves no metrics of its own.
SHADOW_FIXED = frozenset({"group_id", "metrics_port"})


class QualitySettings(BaseSettings):
    """Live quality: published lists joined with the behaviour that follows them."""

    model_config = SettingsConfigDict(
        env_prefix="RELATA_QUALITY_", extra="forbid", frozen=True, validate_default=True
    )

    group_id: str = Field(
        "relata-quality", description="Consumer group of behaviour events (and the lists)."
    )
    window_s: float = Field(
        1800.0,
        gt=0,
        le=7 * 86_400,
        description=(
            "An action is judged against the list its user had then if that list was published "
            "at most this long before; at start, the lists of this long ago are read again."
        ),
    )
    max_users: int = Field(
        100_000,
        ge=1,
        le=100_000_000,
        description=(
            "Users whose latest lists are kept (about 1-3 KiB each, live and shadow); the one "
            "whose lists changed least recently is forgotten first."
        ),
    )
    dedup_size: int = Field(
        100_000,
        ge=1,
        le=10_000_000,
        description="Recent event ids remembered, so that a re-delivered event is judged once.",
    )
    judge_delay_ms: float = Field(
        1000.0,
        ge=0,
        le=60_000,
        description=(
            "An action waits for the lists published before it; when a list partition has "
            "nothing newer to read, it is judged this long after it was read."
        ),
    )
    commit_interval_ms: float = Field(
        1000.0, ge=0, le=60_000, description="Offsets of judged events are committed this often."
    )
    metrics_port: int = Field(9110, ge=0, le=65535, description="Prometheus port; 0 disables.")


class ShadowSettings(BaseSettings):
    """A second recommender configuration run beside the live one, judged on live traffic."""

    model_config = SettingsConfigDict(
        env_prefix="RELATA_SHADOW_", extra="forbid", frozen=True, validate_default=True
    )

    enabled: bool = Field(
        False,
        description=(
            "Run a shadow recommender in the recommender's process (its own consumer group "
            "`<group>-shadow`), publishing to recommendations-shadow."
        ),
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            'The recommender settings the shadow changes, as JSON, e.g. {"mmr_lambda": 0.5} or '
            '{"strategy": "vector", "blend_path": "artifacts/blend-b.json"}; the others are '
            "the live ones."
        ),
    )

    @field_validator("overrides", mode="before")
    @classmethod
    def _parse(cls, value: Any) -> Any:
        # A command-line option arrives as text; the environment is parsed by pydantic-settings.
        return json.loads(value) if isinstance(value, str) else value

    @field_validator("overrides")
    @classmethod
    def _known(cls, value: dict[str, Any]) -> dict[str, Any]:
        allowed = set(RecommenderSettings.model_fields) - SHADOW_FIXED
        unknown = sorted(set(value) - allowed)
        if unknown:
            msg = f"unknown recommender settings {unknown}; valid: {sorted(allowed)}"
            raise ValueError(msg)
        return value

    def recommender(self, live: RecommenderSettings) -> RecommenderSettings:
        """The shadow's settings: the live ones with `overrides`, validated, in a consumer
        group of its own (under the live group's name, which the ACLs grant as a prefix)."""
        values = live.model_dump() | self.overrides | {"group_id": f"{live.group_id}-shadow"}
        return RecommenderSettings.model_validate(values)
