"""Erasing a user: requests on `erasure-requests` are forwarded into the user's own event
stream, so that the owner of the user's `behavior-events` partition erases them in order
with their events (the profile agent, `ProfileAgent.erase`).

Why forward rather than read `erasure-requests` in the profile agent: a user's profile lives
with the consumer that owns their `behavior-events` partition, and a group assigns two topics'
partitions independently; one stream keeps the erasure after every earlier event of the user
and before every later one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kafkaio.dead_letters import DeadLetters
from schemas.decoding import Rejection, decode
from schemas.messages import ErasureRequest

from .ports import Sender
from .records import Record, reject

# The header that marks a forwarded erasure request in behavior-events.
CONTROL_HEADER = "relata-control"
ERASE = b"erase"


def is_erasure(record: Record) -> bool:
    """The record is a forwarded erasure request, not a behaviour event."""
    return (CONTROL_HEADER, ERASE) in record.headers


@dataclass(slots=True)
class ErasureForwarder:
    """Validates erasure requests and forwards each into `behavior-events`, keyed by user."""

    sender: Sender
    dead_letters: DeadLetters
    behavior_events_topic: str

    async def handle_requests(self, records: Sequence[Record]) -> None:
        """Forward valid requests (a bad one is dead-lettered); returns once forwarded."""
        for record in records:
            decoded = decode(record.value, ErasureRequest)
            if isinstance(decoded, Rejection):
                reject(self.dead_letters, decoded, record)
                continue
            if record.key != decoded.user_id.encode("utf-8"):
                reason = (
                    f"record key {record.key!r} is not the request's user_id: erasure-requests "
                    "must be keyed by user_id"
                )
                reject(self.dead_letters, Rejection("invalid_fields", reason), record)
                continue
            self.sender.produce(
                self.behavior_events_topic,
                key=record.key,
                value=decoded.model_dump_json().encode("utf-8"),
                headers=[(CONTROL_HEADER, ERASE)],
            )
        await self.sender.flush()
