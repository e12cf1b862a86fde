"""The histories the recommender has seen, for its background fitter: the latest history of
each user from `profile-updates`, least recently updated dropped first, compact.

Written by the serving loop (one short lock per update), read by the fitter as a snapshot.
An entry is kept as a plain tuple (about a third of a pydantic `HistoryEntry`), and an
erased user's history is dropped with the erasure.
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from datetime import datetime

from schemas.messages import HistoryEntry

# (item_id, weight, last_event_type, last_ts, count)
Row = tuple[str, float, str, datetime, int]
Rows = tuple[Row, ...]


def to_rows(history: Sequence[HistoryEntry]) -> Rows:
    """A history as compact rows (event types interned: a handful of strings)."""
    return tuple(
        (e.item_id, e.weight, sys.intern(e.last_event_type), e.last_ts, e.count) for e in history
    )


def from_rows(rows: Rows) -> list[HistoryEntry]:
    """The history entries back (trusted: they were validated when consumed)."""
    return [
        HistoryEntry.model_construct(
            item_id=item_id, weight=weight, last_event_type=etype, last_ts=ts, count=count
        )
        for item_id, weight, etype, ts, count in rows
    ]


def histories_of(snapshot: Mapping[str, Rows]) -> dict[str, list[HistoryEntry]]:
    """A snapshot's histories as entries, by user."""
    return {user_id: from_rows(rows) for user_id, rows in snapshot.items()}


class HistoryLog:
    """The latest history per user, at most `capacity` users (LRU), and a count of updates."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("HistoryLog needs a capacity of at least 1")
        self.capacity = capacity
        self._users: OrderedDict[str, Rows] = OrderedDict()
        self._lock = threading.Lock()
        self._updates = 0

    def record(self, user_id: str, history: Sequence[HistoryEntry] | None) -> None:
        """The user's latest history (None: the user was erased, forget them)."""
        rows = None if history is None else to_rows(history)
        with self._lock:
            if rows is None:
                self._users.pop(user_id, None)
                return
            self._users[user_id] = rows
            self._users.move_to_end(user_id)
            while len(self._users) > self.capacity:
                self._users.popitem(last=False)
            self._updates += 1

    @property
    def updates(self) -> int:
        """Histories recorded since the start (a monotonic count)."""
        return self._updates

    def __len__(self) -> int:
        return len(self._users)

    def snapshot(self) -> dict[str, Rows]:
        """Every recorded history, as of now (rows are immutable: no copy needed)."""
        with self._lock:
            return dict(self._users)
