"""The recommender's micro-batches: the topics it reads and writes, one user's coalesced
profile updates, and what a batch did."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from schemas.messages import ProfileUpdate, Recommendation


@dataclass(frozen=True, slots=True)
class RecommenderTopics:
    profile_updates: str
    related_items: str
    recommendations: str
    dead_letter: str
    # Where the trending list goes (None: not published).
    trending: str | None = None


@dataclass(slots=True)
class PendingUser:
    """One user's coalesced updates of a batch."""

    update: ProfileUpdate
    trigger_event_ids: list[str]
    source_ts_ms: int
    coalesced: int = 0


def coalesce(updates: Iterable[ProfileUpdate]) -> tuple[dict[str, PendingUser], int]:
    """Fold updates of one user into the latest one (in arrival order, which is per-user
    production order: the topic is keyed by user_id). Returns users and the coalesced count."""
    users: dict[str, PendingUser] = {}
    coalesced = 0
    for update in updates:
        pending = users.get(update.user_id)
        if pending is None:
            users[update.user_id] = PendingUser(
                update, list(update.trigger_event_ids), update.source_ts_ms
            )
            continue
        coalesced += 1
        seen = set(pending.trigger_event_ids)
        pending.trigger_event_ids.extend(e for e in update.trigger_event_ids if e not in seen)
        pending.update = update
        pending.source_ts_ms = min(pending.source_ts_ms, update.source_ts_ms)
        pending.coalesced += 1
    return users, coalesced


@dataclass(slots=True)
class BatchResult:
    records: int = 0
    users: int = 0
    coalesced: int = 0
    published: int = 0
    dead_letters: int = 0
    recommendations: list[Recommendation] = field(default_factory=list)
