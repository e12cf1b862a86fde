"""One consumed input record as the agents' handlers see it, and its dead letter."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kafkaio.dead_letters import DeadLetters
from schemas.decoding import Rejection


@dataclass(frozen=True, slots=True)
class Record:
    """One consumed input record: what the handlers see, and where a dead letter points."""

    key: bytes | None
    value: bytes | None
    topic: str
    partition: int
    offset: int
    timestamp_s: float
    # Record headers, (name, value) pairs.
    headers: tuple[tuple[str, bytes], ...] = ()
    # The Faust event it came from, if any: made the current event before a table write (see
    # Bind).
    event: Any = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, event: Any) -> Record:
        """The record of a Faust event."""
        message = event.message
        headers = message.headers or ()
        return cls(
            headers=tuple(headers.items() if isinstance(headers, dict) else headers),
            key=message.key,
            value=message.value,
            topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            timestamp_s=message.timestamp,
            event=event,
        )

    @classmethod
    def of_message(cls, message: Any) -> Record:
        """The record of a confluent-kafka message."""
        _, timestamp_ms = message.timestamp()
        return cls(
            key=message.key(),
            value=message.value(),
            topic=message.topic(),
            partition=message.partition(),
            offset=message.offset(),
            timestamp_s=timestamp_ms / 1000,
            headers=tuple(message.headers() or ()),
        )


# Makes a record's Faust event the current one (`Stream._set_current_event`). Called before
# each table write of a batch: Faust writes a key's changelog to the partition of the *current
# event* (and the RocksDB store picks its database by it), so the current event must be one of
# that key's own records, not the batch's last.
Bind = Callable[[Any], None]


def reject(dead_letters: DeadLetters, rejection: Rejection, record: Record) -> None:
    """Send `record` to the dead-letter topic with its reason and position, and count it."""
    dead_letters.send_at(
        rejection,
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        key=record.key,
        value=record.value,
    )
