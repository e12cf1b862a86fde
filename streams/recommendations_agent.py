"""The recommendations agent's handler: the latest recommendation list per user, in a table
the HTTP API reads."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kafkaio.dead_letters import DeadLetters, refused
from kafkaio.producer import RecordRefusedError
from schemas.decoding import Rejection, decode
from schemas.messages import Recommendation

from .ports import Sender
from .records import Bind, Record, reject


@dataclass(slots=True)
class RecommendationsAgent:
    """Keeps table `recommendations` (user id → the latest list, raw JSON) up to date."""

    recommendations: Any
    sender: Sender
    dead_letters: DeadLetters

    async def handle_recommendations(self, records: Sequence[Record], *, bind: Bind) -> None:
        """Keep the latest recommendation list per user (a tombstone deletes it); each user's
        entry is written once per batch."""
        latest: dict[str, Record] = {}
        for record in records:
            if record.value is None:
                if record.key is not None:
                    latest[record.key.decode("utf-8", errors="replace")] = record
                continue
            decoded = decode(record.value, Recommendation)
            if isinstance(decoded, Rejection):
                reject(self.dead_letters, decoded, record)
                continue
            latest[decoded.user_id] = record
        for user_id, record in latest.items():
            bind(record.event)
            try:
                if record.value is None:
                    self.recommendations.pop(user_id, None)
                else:
                    self.recommendations[user_id] = record.value
            except RecordRefusedError as exc:  # its changelog record is too large
                reject(self.dead_letters, refused(exc, "table changelog record"), record)
        await self.sender.flush()
