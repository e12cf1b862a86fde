"""Names the stream processor derives from its settings: app ids, consumer groups, internal
topics and client ids.

Pure functions with no Faust import, so other processes (`relata/pipeline.py`) can name the
stream processor's groups and topics without loading Faust.
"""

from __future__ import annotations

from schemas.settings import KafkaSettings, StreamsSettings

# The internal topic from the profile agent to the association agent (key of `topic_names`).
ASSOCIATION_INPUT = "association-input"


def faust_app_id(kafka: KafkaSettings, settings: StreamsSettings) -> str:
    """The Faust app id, and so the consumer group, of the settings' role.

    Each role is its own Faust app (its own consumer group and table assignment): the prefixed
    `app_id`, `<that>-associations` for role associations. `all` keeps the base id, so its
    topics are those of the two roles run apart.
    """
    base_id = kafka.topic(settings.app_id)
    return f"{base_id}-associations" if settings.role == "associations" else base_id


def association_input_topic(kafka: KafkaSettings, settings: StreamsSettings) -> str:
    """The internal topic from the profile agent to the association agent (one partition)."""
    return f"{kafka.topic(settings.app_id)}-{ASSOCIATION_INPUT}"


def events_group(kafka: KafkaSettings, settings: StreamsSettings) -> str:
    """The profile agent's consumer group (of behavior-events): `<app id>-events`."""
    return f"{faust_app_id(kafka, settings)}-events"


def profiles_changelog_topic(kafka: KafkaSettings, settings: StreamsSettings) -> str:
    """The profiles table's compacted changelog (the name Faust gave it when it owned it)."""
    return f"{faust_app_id(kafka, settings)}-profiles-changelog"


def client_id(settings: StreamsSettings) -> str:
    """The Kafka client id of this role's Faust app and sender: `relata-streams-<role>` (the
    profile agent's own consumer is `relata-profiles`)."""
    return f"relata-streams-{settings.role}"
