"""What each component needs from a secured Kafka: the topics it reads and writes, the
consumer groups it joins, what it creates; one principal per component.

The one declaration of relata's Kafka access. The embedded broker grants exactly these ACLs,
the start-up check compares a process's granted operations with them, and the ACL table of
`docs/operations.md` is generated from them (a test checks it).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from schemas.quality_settings import QualitySettings
from schemas.settings import IndexerSettings, KafkaSettings, RecommenderSettings, StreamsSettings
from schemas.topics import (
    ALL_TOPICS,
    BEHAVIOR_EVENTS,
    DEAD_LETTER,
    ERASURE_AUDIT,
    ERASURE_REQUESTS,
    ITEM_CATALOG,
    PROFILE_UPDATES,
    RECOMMENDATIONS,
    RECOMMENDATIONS_SHADOW,
    RELATED_ITEMS,
    SIMILAR_ITEMS,
    TRENDING_ITEMS,
    TopicSpec,
)

Operation = Literal["READ", "WRITE", "CREATE", "DESCRIBE", "DESCRIBE_CONFIGS"]
Component = Literal["streams", "indexer", "recommender", "workers", "quality", "tools"]

COMPONENTS: tuple[Component, ...] = (
    "streams",
    "indexer",
    "recommender",
    "workers",
    "quality",
    "tools",
)
# What each component is, in the words of the ACL table and `relata kafka --security`.
COMPONENT_COMMANDS: dict[Component, str] = {
    "streams": "relata streams (roles profiles, associations, all)",
    "indexer": "relata workers --role indexer",
    "recommender": "relata workers --role recommender",
    "workers": "relata workers --role all (indexer and recommender in one process)",
    "quality": "relata workers --role quality (live quality of the published lists)",
    "tools": "relata load-catalog, replay, tail; topic creation",
}


@dataclass(frozen=True, slots=True)
class Grant:
    """Operations on one Kafka resource: a topic or a consumer group, named literally or by a
    prefix (every name that starts with `name`)."""

    resource: Literal["topic", "group"]
    name: str
    operations: frozenset[Operation]
    prefixed: bool = False

    def covers(self, resource: str, name: str) -> bool:
        if resource != self.resource:
            return False
        return name.startswith(self.name) if self.prefixed else name == self.name

    def describe(self) -> str:
        """`topic p.item-catalog: READ, DESCRIBE` (`name*` for a prefix)."""
        star = "*" if self.prefixed else ""
        return f"{self.resource} {self.name}{star}: {', '.join(sorted(self.operations))}"


@dataclass(frozen=True, slots=True)
class Access:
    """One component's principal (`User:<principal>`) and everything it is granted."""

    component: Component
    principal: str
    grants: tuple[Grant, ...]

    def operations(self, resource: Literal["topic", "group"], name: str) -> frozenset[Operation]:
        """The operations granted on a resource, by every grant that covers it."""
        ops: set[Operation] = set()
        for grant in self.grants:
            if grant.covers(resource, name):
                ops |= grant.operations
        return frozenset(ops)

    def topics(self) -> dict[str, frozenset[Operation]]:
        """The literally named topics and their operations (what the start-up check checks)."""
        return {
            grant.name: grant.operations
            for grant in self.grants
            if grant.resource == "topic" and not grant.prefixed
        }


# The contract check of every process (`relata.runtime.topics`) reads each of its topics'
# partitions (DESCRIBE) and cleanup policy (DESCRIBE_CONFIGS). READ and WRITE imply DESCRIBE
# in Kafka; it is listed anyway so the table says what is needed.
_CHECK: frozenset[Operation] = frozenset({"DESCRIBE", "DESCRIBE_CONFIGS"})
READS: frozenset[Operation] = frozenset({"READ", "DESCRIBE", "DESCRIBE_CONFIGS"})
WRITES: frozenset[Operation] = frozenset({"WRITE", "DESCRIBE", "DESCRIBE_CONFIGS"})
_READ = READS
_WRITE = WRITES
_READ_WRITE = _READ | _WRITE


def _topic(kafka: KafkaSettings, spec: TopicSpec, operations: frozenset[Operation]) -> Grant:
    return Grant("topic", kafka.topic(spec.name), operations)


def _merge(grants: Iterable[Grant]) -> tuple[Grant, ...]:
    """One grant per resource, operations united, in a stable order."""
    merged: dict[tuple[str, str, bool], set[Operation]] = {}
    for grant in grants:
        merged.setdefault((grant.resource, grant.name, grant.prefixed), set()).update(
            grant.operations
        )
    return tuple(
        Grant(resource, name, frozenset(ops), prefixed)  # type: ignore[arg-type]  # from a Grant
        for (resource, name, prefixed), ops in merged.items()
    )


def component_access(
    kafka: KafkaSettings,
    *,
    streams: StreamsSettings | None = None,
    indexer: IndexerSettings | None = None,
    recommender: RecommenderSettings | None = None,
    quality: QualitySettings | None = None,
    principal_prefix: str = "relata-",
) -> dict[Component, Access]:
    """Every component's access under these settings (topic prefix, app id, group ids).

    The stream processor owns every name that starts with its prefixed app id: its consumer
    groups (`<id>`, `<id>-events`, `<id>-associations`) and internal topics (table
    changelogs, `association-input`, Faust's leader topic), which it creates. The recommender's
    group is a prefix too: its related-items reader is assigned under `<group>-related-...`; so
    is the indexer's, one group per model version (`<group>-<version>`), and the shadow
    recommender's group is `<group>-shadow`. Live quality reads the events and both list
    topics under a group of its own.
    """
    streams = streams or StreamsSettings()
    indexer = indexer or IndexerSettings()
    recommender = recommender or RecommenderSettings()
    quality = quality or QualitySettings()
    app_prefix = kafka.topic(streams.app_id)
    owned: frozenset[Operation] = _READ_WRITE | frozenset({"CREATE"})
    grants: dict[Component, tuple[Grant, ...]] = {
        "streams": (
            # WRITE too: erasure requests are forwarded into the user's event stream, so the
            # owner of the user's partition erases them in order with their events.
            _topic(kafka, BEHAVIOR_EVENTS, _READ_WRITE),
            _topic(kafka, ITEM_CATALOG, _READ),
            _topic(kafka, ERASURE_REQUESTS, _READ),
            _topic(kafka, ERASURE_AUDIT, _WRITE),
            _topic(kafka, PROFILE_UPDATES, _WRITE),
            _topic(kafka, RELATED_ITEMS, _WRITE),
            _topic(kafka, RECOMMENDATIONS, _READ),
            # Every worker follows these whole (GET /items/.../related?kind=similar, the
            # trending answer of GET /users/...), assigned and never committed.
            _topic(kafka, SIMILAR_ITEMS, _READ),
            _topic(kafka, TRENDING_ITEMS, _READ),
            _topic(kafka, DEAD_LETTER, _WRITE),
            Grant("topic", app_prefix, owned, prefixed=True),
            Grant("group", app_prefix, frozenset({"READ", "DESCRIBE"}), prefixed=True),
        ),
        "indexer": (
            _topic(kafka, ITEM_CATALOG, _READ),
            _topic(kafka, SIMILAR_ITEMS, _WRITE),
            _topic(kafka, DEAD_LETTER, _WRITE),
            Grant("group", indexer.group_id, frozenset({"READ", "DESCRIBE"}), prefixed=True),
        ),
        "recommender": (
            _topic(kafka, PROFILE_UPDATES, _READ),
            _topic(kafka, RELATED_ITEMS, _READ),
            _topic(kafka, RECOMMENDATIONS, _WRITE),
            _topic(kafka, TRENDING_ITEMS, _WRITE),
            _topic(kafka, RECOMMENDATIONS_SHADOW, _WRITE),
            _topic(kafka, DEAD_LETTER, _WRITE),
            Grant("group", recommender.group_id, frozenset({"READ", "DESCRIBE"}), prefixed=True),
        ),
        "quality": (
            _topic(kafka, BEHAVIOR_EVENTS, _READ),
            _topic(kafka, RECOMMENDATIONS, _READ),
            _topic(kafka, RECOMMENDATIONS_SHADOW, _READ),
            Grant("group", quality.group_id, frozenset({"READ", "DESCRIBE"}), prefixed=True),
        ),
        # `relata tail` reads any topic, assigned, under a group `relata-tail-<random>` it
        # never commits; the tools create the declared topics (the components need not).
        "tools": (
            *(_topic(kafka, spec, _READ | frozenset({"CREATE"})) for spec in ALL_TOPICS),
            _topic(kafka, BEHAVIOR_EVENTS, _WRITE),
            _topic(kafka, ITEM_CATALOG, _WRITE),
            _topic(kafka, ERASURE_REQUESTS, _WRITE),
            Grant("group", "relata-tail-", frozenset({"READ", "DESCRIBE"}), prefixed=True),
        ),
    }
    grants["workers"] = grants["indexer"] + grants["recommender"]
    return {
        component: Access(component, f"{principal_prefix}{component}", _merge(grants[component]))
        for component in COMPONENTS
    }


def topics_of(access: Access, kafka: KafkaSettings) -> tuple[TopicSpec, ...]:
    """The declared topics a component uses (those its start-up check compares)."""
    names = access.topics()
    return tuple(spec for spec in ALL_TOPICS if kafka.topic(spec.name) in names)
