"""The dead-letter route: a rejected input, verbatim with the reason and where it came from,
to the dead-letter topic, with a warning and a count."""

from __future__ import annotations

import logging

from prometheus_client import Counter

from schemas.decoding import Rejection, dead_letter

from .client import Message, RecordSink
from .producer import RecordRefusedError

logger = logging.getLogger(__name__)

# Reasons are logged up to this many characters (the dead letter keeps the whole reason).
LOGGED_REASON_CHARS = 200


def refused(exc: RecordRefusedError, what: str) -> Rejection:
    """The rejection of an input whose output `what` the producer refused (too large, ...):
    redoing it would be refused again, so the input goes to dead-letter and the stage goes on."""
    return Rejection("processing_error", f"its {what} could not be produced: {exc}")


class DeadLetters:
    """One stage's dead-letter route: sink, topic, stage and counter bound once.

    The record goes through `sink` (an `AckedProducer`, a `ConfluentSender`): it is
    acknowledged, like the stage's outputs, before the rejected input is committed. A dead
    letter is bounded in size (`schemas.decoding.dead_letter`), so no producer refuses it.
    """

    def __init__(self, sink: RecordSink, *, topic: str, stage: str, counter: Counter) -> None:
        self.sink = sink
        self.topic = topic
        self.stage = stage
        self.counter = counter

    def send(self, message: Message, rejection: Rejection) -> None:
        """Publish a consumed `message`, rejected for `rejection`."""
        partition, offset = message.partition(), message.offset()
        self.send_at(
            rejection,
            topic=message.topic() or "",
            partition=-1 if partition is None else partition,
            offset=-1 if offset is None else offset,
            key=message.key(),
            value=message.value(),
        )

    def send_at(
        self,
        rejection: Rejection,
        *,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
    ) -> None:
        """Publish the input at `topic[partition]` `offset` (key and raw value), rejected for
        `rejection`."""
        record = dead_letter(
            rejection,
            raw=value,
            key=key,
            topic=topic,
            partition=partition,
            offset=offset,
            stage=self.stage,
        )
        logger.warning(
            "dead letter %s[%d] offset=%d stage=%s error_type=%s reason=%s",
            topic,
            partition,
            offset,
            self.stage,
            rejection.error_type,
            rejection.reason[:LOGGED_REASON_CHARS],
        )
        self.sink.produce(self.topic, key=key, value=record.model_dump_json().encode())
        self.counter.labels(stage=self.stage, error_type=rejection.error_type).inc()
