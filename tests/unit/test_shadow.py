"""The shadow recommender's settings and its place in the contract: its topic, its group, its
grants, and live quality's."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from relata.runtime.topics import COPARTITIONED
from schemas.access import component_access, topics_of
from schemas.quality_settings import QualitySettings, ShadowSettings
from schemas.settings import KafkaSettings, RecommenderSettings
from schemas.topics import ALL_TOPICS, RECOMMENDATIONS, RECOMMENDATIONS_SHADOW


def test_overrides_come_from_the_environment_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELATA_SHADOW_ENABLED", "true")
    monkeypatch.setenv("RELATA_SHADOW_OVERRIDES", '{"mmr_lambda": 0.5, "strategy": "vector"}')
    shadow = ShadowSettings()
    assert shadow.enabled
    assert shadow.overrides == {"mmr_lambda": 0.5, "strategy": "vector"}
    # A command-line option arrives as text.
    assert ShadowSettings(overrides='{"k": 5}').overrides == {"k": 5}


def test_the_shadow_is_the_live_settings_with_its_overrides_in_its_own_group() -> None:
    live = RecommenderSettings(group_id="rec", mmr_lambda=0.9, k=10, candidates=80)
    shadow = ShadowSettings(enabled=True, overrides={"mmr_lambda": 0.5, "strategy": "vector"})
    derived = shadow.recommender(live)
    assert derived.group_id == "rec-shadow"
    assert (derived.mmr_lambda, derived.strategy) == (0.5, "vector")
    assert (derived.k, derived.candidates) == (10, 80)
    assert ShadowSettings().recommender(live).model_dump(exclude={"group_id"}) == live.model_dump(
        exclude={"group_id"}
    )


def test_unknown_or_fixed_or_invalid_overrides_are_refused() -> None:
    with pytest.raises(ValidationError, match=r"unknown recommender settings.*valid:.*mmr_lambda"):
        ShadowSettings(overrides={"mmr_lamda": 0.5})
    with pytest.raises(ValidationError, match="group_id"):
        ShadowSettings(overrides={"group_id": "other"})
    with pytest.raises(ValidationError, match="mmr_lambda"):
        ShadowSettings(overrides={"mmr_lambda": 2.0}).recommender(RecommenderSettings())


def test_the_shadow_topic_is_declared_like_the_live_one_and_copartitioned() -> None:
    assert RECOMMENDATIONS_SHADOW in ALL_TOPICS
    assert (RECOMMENDATIONS_SHADOW.key, RECOMMENDATIONS_SHADOW.cleanup_policy) == (
        RECOMMENDATIONS.key,
        RECOMMENDATIONS.cleanup_policy,
    )
    assert RECOMMENDATIONS_SHADOW.model is RECOMMENDATIONS.model
    # Live quality joins partition n of the events with partition n of both list topics.
    assert {"behavior-events", "recommendations", "recommendations-shadow"} <= COPARTITIONED


def test_grants_of_the_shadow_and_of_live_quality() -> None:
    kafka = KafkaSettings(topic_prefix="p.")
    access = component_access(
        kafka,
        recommender=RecommenderSettings(group_id="rec"),
        quality=QualitySettings(group_id="q"),
    )
    recommender = access["recommender"]
    assert "WRITE" in recommender.operations("topic", "p.recommendations-shadow")
    assert "READ" in recommender.operations("group", "rec-shadow")
    assert "WRITE" in access["workers"].operations("topic", "p.recommendations-shadow")
    quality = access["quality"]
    assert {spec.name for spec in topics_of(quality, kafka)} == {
        "behavior-events",
        "recommendations",
        "recommendations-shadow",
    }
    assert all("WRITE" not in ops and "CREATE" not in ops for ops in quality.topics().values())
    assert quality.operations("group", "q") == {"READ", "DESCRIBE"}
    assert quality.principal == "relata-quality"
    assert not access["streams"].operations("topic", "p.recommendations-shadow")
