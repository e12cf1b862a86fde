"""Fakes of the Kafka client and the encoder for worker unit tests (no network, no model)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from confluent_kafka import KafkaError, KafkaException


@dataclass
class FakeMessage:
    _topic: str
    _value: bytes | None
    _key: bytes | None = None
    _partition: int = 0
    _offset: int = 0
    _error: Any = None
    _ts_ms: int = 0

    def error(self) -> Any:
        return self._error

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value

    def timestamp(self) -> tuple[int, int]:
        return (1, self._ts_ms)


@dataclass
class FakeConsumer:
    """Hands out queued messages, at most `num_messages` per consume(); records commits."""

    topic: str
    queue: list[FakeMessage] = field(default_factory=list)
    consumed: int = 0
    commits: list[int] = field(default_factory=list)
    closed: bool = False

    def add(self, value: bytes | None, key: bytes | None = None) -> None:
        self.queue.append(FakeMessage(self.topic, value, key, 0, len(self.queue)))

    def add_json(self, obj: Any, key: str | None = None) -> None:
        self.add(json.dumps(obj).encode(), key.encode() if key else None)

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[FakeMessage]:
        batch = self.queue[self.consumed : self.consumed + num_messages]
        self.consumed += len(batch)
        return batch

    def commit(self, *args: Any, offsets: Sequence[Any] | None = None, **kwargs: Any) -> None:
        # Offsets are the messages' positions in the queue: the next offset = how many.
        self.commits.append(self.consumed if offsets is None else max(o.offset for o in offsets))

    def close(self) -> None:
        self.closed = True


@dataclass
class FakeProducer:
    """Records what is produced; the broker "acknowledges" every record at the next poll or
    flush, unless `hold` (then at `deliver`), and refuses the records of `refuse_topics`."""

    records: list[tuple[str, bytes | None, bytes | None]] = field(default_factory=list)
    flushed: int = 0
    hold: bool = False
    refuse_topics: set[str] = field(default_factory=set)
    # Like librdkafka's message.max.bytes: a larger record raises MSG_SIZE_TOO_LARGE at once.
    max_bytes: int | None = None
    _reports: list[tuple[Any, str]] = field(default_factory=list)

    def produce(
        self,
        topic: str,
        key: bytes | None = None,
        value: bytes | None = None,
        on_delivery: Any = None,
    ) -> None:
        if self.max_bytes is not None and len(key or b"") + len(value or b"") > self.max_bytes:
            raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
        self.records.append((topic, key, value))
        if on_delivery is not None:
            self._reports.append((on_delivery, topic))

    def deliver(self) -> int:
        """Serve the delivery reports of everything produced so far."""
        reports, self._reports = self._reports, []
        for callback, topic in reports:
            error = "REFUSED (fake broker)" if topic in self.refuse_topics else None
            callback(error, FakeMessage(topic, None))
        return len(reports)

    def poll(self, timeout: float = -1) -> int:
        return 0 if self.hold else self.deliver()

    def flush(self, timeout: float = -1) -> int:
        self.deliver()
        self.flushed = len(self.records)
        return 0

    def __len__(self) -> int:
        return len(self._reports)

    def values(self, topic: str) -> list[dict[str, Any]]:
        return [json.loads(v) for t, _, v in self.records if t == topic and v is not None]


class FakeEncoder:
    """Bag of hashed words: texts sharing words are close. Records every call."""

    name = "fake"
    version = "v1"
    dim = 32

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(list(texts))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in text.lower().replace(".", " ").replace(">", " ").split():
                h = int(hashlib.md5(word.encode()).hexdigest(), 16)
                out[row, h % self.dim] += 1.0
            out[row, 0] += 0.01  # never a zero vector
        return out / np.linalg.norm(out, axis=1, keepdims=True)
