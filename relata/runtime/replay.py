"""Data in and out of Kafka: publish a catalog, replay behaviour events, tail a topic.

`relata load-catalog FILE`, `relata replay FILE`, `relata tail TOPIC`. The functions behind
them (`iter_jsonl`, `publish_catalog`, `replay_events`, `tail_records`) are reused by the demo
and the benchmark.
"""

from __future__ import annotations

import gzip
import io
import logging
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import orjson

from relata.cli.settings_cli import build_settings, settings_options
from relata.runtime.preflight import require_kafka
from schemas.access import WRITES
from schemas.decoding import Rejection, decode
from schemas.messages import CatalogItem, ErasureRequest
from schemas.settings import KafkaSettings
from schemas.topics import BEHAVIOR_EVENTS, ERASURE_REQUESTS, ITEM_CATALOG, TopicSpec

logger = logging.getLogger(__name__)

# Producer tuning: librdkafka's default linger (5 ms; events are timestamped at produce(), so
# it counts in the measured latency), while batches of up to 10k records keep the throughput of
# a replay far above any rate the pipeline can sustain. A shorter linger made a produce request
# of nearly every event at a few hundred events/s, each a fetch round trip downstream.
# Idempotence: retries never duplicate or reorder.
PRODUCER_DEFAULTS: dict[str, Any] = {
    "linger.ms": 5,
    "batch.num.messages": 10_000,
    "queue.buffering.max.messages": 200_000,
    "queue.buffering.max.kbytes": 262_144,
    "enable.idempotence": True,
    "acks": "all",
    # No compression: the stream processor's aiokafka reads lz4/snappy/zstd only with extra
    # libraries that are not installed ("Libraries for lz4 compression codec not found").
    "compression.type": "none",
}

# How many invalid catalog lines are described one by one before only counting the rest, and
# how much of each reason is shown.
MAX_REPORTED_INVALID = 20
MAX_REASON_CHARS = 300


class ReplayError(Exception):
    """Root of the errors of this module."""


class DeliveryError(ReplayError):
    """The broker did not accept some records."""


class RecordRefusedError(ReplayError):
    """The producer refused one record outright (too large for `message.max.bytes`, ...)."""


# ---------------------------------------------------------------------------------------------
# Reading


def _open(path: Path) -> io.BufferedIOBase:
    if not path.exists():
        raise click.FileError(str(path), hint="no such file")
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    return path.open("rb")


def iter_jsonl(path: Path) -> Iterator[tuple[int, bytes]]:
    """Yield `(line_number, raw_line)` of a JSON-lines file (`.gz` or plain), blank lines skipped.

    Lines are returned verbatim (without the newline) so that bad input can be forwarded as is.
    """
    with _open(path) as handle:
        for number, line in enumerate(handle, start=1):
            raw = line.rstrip(b"\r\n")
            if raw.strip():
                yield number, raw


# ---------------------------------------------------------------------------------------------
# Pacing


class TokenBucket:
    """A token-bucket pacer: on average `rate` acquisitions a second, bursts of at most `burst`.

    `rate=0` means unpaced. An acquisition may leave the bucket in debt; the caller sleeps the
    debt off once it is worth at least `min_sleep_s`, which keeps the average rate exact despite
    the OS timer granularity. 2 ms: finer than the producer's 5 ms linger (so the records reach
    the broker as they would anyway), and a sleep per event (0.5 ms) cost the benchmark driver a
    tenth of a core at 1,000 events/s on the cores it shares with the pipeline. The clock and
    sleep are injectable for tests.
    """

    def __init__(
        self,
        rate: float,
        *,
        burst: float | None = None,
        min_sleep_s: float = 0.002,
        clock: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate < 0:
            raise ValueError(f"rate must be >= 0 (0 = unpaced), got {rate}")
        # Default burst: 10 ms worth of tokens, at least one.
        self.rate = float(rate)
        self.burst = float(burst) if burst is not None else max(1.0, self.rate / 100)
        if self.burst < 1:
            raise ValueError(f"burst must be >= 1, got {self.burst}")
        self.min_sleep_s = min_sleep_s
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.burst
        self._last = clock()

    def acquire(self, n: float = 1.0) -> float:
        """Take `n` tokens, sleeping off any debt worth `min_sleep_s`; return the seconds slept."""
        if self.rate == 0:
            return 0.0
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate) - n
        self._last = now
        if self._tokens >= 0:
            return 0.0
        wait = -self._tokens / self.rate
        if wait < self.min_sleep_s:
            return 0.0
        self._sleep(wait)
        return wait


# ---------------------------------------------------------------------------------------------
# Producing


def make_producer(kafka: KafkaSettings, **overrides: Any) -> Any:
    """A confluent-kafka Producer with relata's batching and idempotence defaults."""
    from confluent_kafka import Producer

    config = {**kafka.librdkafka_producer_config("relata-replay"), **PRODUCER_DEFAULTS, **overrides}
    return Producer(config)


@dataclass
class _Deliveries:
    failed: int = 0
    first_error: str | None = None

    def callback(self, err: Any, _msg: Any) -> None:
        if err is not None:
            self.failed += 1
            if self.first_error is None:
                self.first_error = str(err)


def _produce(
    producer: Any,
    topic: str,
    *,
    key: bytes | None,
    value: bytes | None,
    on_delivery: Callable[[Any, Any], None],
    timestamp_ms: int | None = None,
) -> None:
    """Produce one record, waiting for queue space instead of failing when the queue is full;
    a record the producer refuses outright raises `RecordRefusedError`."""
    from confluent_kafka import KafkaException

    kwargs: dict[str, Any] = {"key": key, "value": value, "on_delivery": on_delivery}
    if timestamp_ms is not None:
        kwargs["timestamp"] = timestamp_ms
    while True:
        try:
            producer.produce(topic, **kwargs)
            return
        except BufferError:
            producer.poll(0.05)
        except KafkaException as exc:
            size = len(value or b"") + len(key or b"")
            raise RecordRefusedError(f"record of {size} bytes refused: {exc}") from exc


def _flush(producer: Any, deliveries: _Deliveries, *, timeout_s: float, what: str) -> None:
    remaining = producer.flush(timeout_s)
    if remaining:
        raise DeliveryError(f"{remaining} {what} records still undelivered after {timeout_s:.0f} s")
    if deliveries.failed:
        raise DeliveryError(
            f"{deliveries.failed} {what} records were rejected by the broker; "
            f"first error: {deliveries.first_error}"
        )


@dataclass
class CatalogReport:
    """Outcome of publishing a catalog file."""

    published: int = 0
    invalid: int = 0
    # (line number, reason) of the first MAX_REPORTED_INVALID invalid lines.
    invalid_lines: list[tuple[int, str]] = field(default_factory=list)

    def reject(self, number: int, reason: str) -> None:
        """Count line `number` as invalid for `reason` (described if among the first)."""
        self.invalid += 1
        reason = reason if len(reason) <= MAX_REASON_CHARS else f"{reason[:MAX_REASON_CHARS]}…"
        if len(self.invalid_lines) < MAX_REPORTED_INVALID:
            self.invalid_lines.append((number, reason))
        logger.warning("invalid catalog line line=%d reason=%s", number, reason)


def publish_catalog(
    lines: Iterable[tuple[int, bytes]],
    *,
    producer: Any,
    topic: str,
    flush_timeout_s: float = 60.0,
) -> CatalogReport:
    """Validate each line as a CatalogItem and publish it to `topic`, keyed by item_id.

    Invalid lines (too large, nested too deeply, malformed, invalid fields) and lines the
    producer refuses are not published; they are counted and described in the report.
    """
    report = CatalogReport()
    deliveries = _Deliveries()
    for number, raw in lines:
        result = decode(raw, CatalogItem)
        if isinstance(result, Rejection):
            report.reject(number, f"{result.error_type}: {result.reason}")
            continue
        try:
            _produce(
                producer,
                topic,
                key=result.item_id.encode(),
                value=result.model_dump_json().encode(),
                on_delivery=deliveries.callback,
            )
        except RecordRefusedError as exc:
            report.reject(number, f"refused: {exc}")
            continue
        producer.poll(0)
        report.published += 1
    _flush(producer, deliveries, timeout_s=flush_timeout_s, what="catalog")
    return report


@dataclass(frozen=True, slots=True)
class ReplayProgress:
    """A snapshot of a running replay."""

    sent: int
    unparsable: int
    elapsed_s: float
    # Lines the producer refused outright (too large for message.max.bytes): not sent.
    refused: int = 0

    @property
    def rate(self) -> float:
        return self.sent / self.elapsed_s if self.elapsed_s > 0 else 0.0


def event_key(raw: bytes) -> tuple[bytes | None, str | None]:
    """The record key (user_id) and event_id of a raw event line; `(None, None)` if unparsable.

    Only what routing and latency tracking need is read; validation is the stream processor's.
    """
    try:
        data = orjson.loads(raw)  # the replay's own CPU shares the machine with the pipeline
    except orjson.JSONDecodeError:
        return None, None
    if not isinstance(data, dict):
        return None, None
    user_id = data.get("user_id")
    event_id = data.get("event_id")
    key = str(user_id).encode() if user_id is not None else None
    return key, (event_id if isinstance(event_id, str) else None)


def replay_events(
    lines: Iterable[tuple[int, bytes]],
    *,
    producer: Any,
    topic: str,
    rate: float,
    limit: int | None = None,
    on_progress: Callable[[ReplayProgress], None] | None = None,
    progress_every_s: float = 0.5,
    sent_at: MutableMapping[str, float] | None = None,
    should_stop: Callable[[], bool] | None = None,
    flush_timeout_s: float = 60.0,
) -> ReplayProgress:
    """Send raw event lines to `topic`, keyed by user_id, at `rate` events/s (0 = unpaced).

    Lines go out verbatim, so malformed input reaches the stream processor's dead-letter path
    (an unparsable line is sent without a key); a line the producer refuses outright (larger
    than its message.max.bytes) is skipped with a warning and counted as `refused`. Each record's Kafka timestamp is its send time;
    when `sent_at` is given it receives event_id -> send time (epoch seconds) for latency probes.
    """
    bucket = TokenBucket(rate)
    deliveries = _Deliveries()
    start = time.perf_counter()
    next_report = start + progress_every_s
    sent = unparsable = refused = 0
    for number, raw in lines:
        if limit is not None and sent >= limit:
            break
        if should_stop is not None and should_stop():
            break
        bucket.acquire()
        key, event_id = event_key(raw)
        if key is None:
            unparsable += 1
        now = time.time()
        try:
            _produce(
                producer,
                topic,
                key=key,
                value=raw,
                on_delivery=deliveries.callback,
                timestamp_ms=int(now * 1000),
            )
        except RecordRefusedError as exc:
            refused += 1
            logger.warning("event line not sent line=%d reason=%s", number, exc)
            continue
        if sent_at is not None and event_id is not None:
            sent_at[event_id] = now
        sent += 1
        producer.poll(0)
        if on_progress is not None:
            tick = time.perf_counter()
            if tick >= next_report:
                next_report = tick + progress_every_s
                on_progress(ReplayProgress(sent, unparsable, tick - start, refused))
    _flush(producer, deliveries, timeout_s=flush_timeout_s, what="event")
    final = ReplayProgress(sent, unparsable, time.perf_counter() - start, refused)
    if on_progress is not None:
        on_progress(final)
    return final


# ---------------------------------------------------------------------------------------------
# CLI


def _kafka_settings(params: dict[str, Any]) -> KafkaSettings:
    return build_settings(KafkaSettings, group="kafka", params=params)


def _ensure_topic(kafka: KafkaSettings, spec: TopicSpec) -> None:
    """Create the topic a tool writes from its spec (producers never create topics), or
    stop when the existing one differs from it."""
    from relata.runtime.topics import TopicError, ensure_topics

    try:
        ensure_topics(kafka, [spec])
    except TopicError as exc:
        raise click.ClickException(str(exc)) from exc


@click.command(name="load-catalog")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--strict", is_flag=True, help="Exit with status 1 when any line is invalid.")
@settings_options(KafkaSettings, group="kafka")
def load_catalog_command(file: Path, strict: bool, **params: Any) -> None:
    """Validate FILE (items.jsonl[.gz]) and publish each item to item-catalog, keyed by item_id."""
    kafka = _kafka_settings(params)
    require_kafka(kafka, needs={kafka.topic(ITEM_CATALOG.name): WRITES})
    _ensure_topic(kafka, ITEM_CATALOG)
    topic = kafka.topic(ITEM_CATALOG.name)
    producer = make_producer(kafka)
    started = time.perf_counter()
    try:
        report = publish_catalog(iter_jsonl(file), producer=producer, topic=topic)
    except DeliveryError as exc:
        raise click.ClickException(str(exc)) from exc
    elapsed = time.perf_counter() - started
    click.echo(
        f"published {report.published} items to {topic} in {elapsed:.1f} s; "
        f"{report.invalid} invalid lines",
        err=True,
    )
    for number, reason in report.invalid_lines:
        click.echo(f"  line {number}: {reason}", err=True)
    if report.invalid > len(report.invalid_lines):
        click.echo(f"  ... and {report.invalid - len(report.invalid_lines)} more", err=True)
    if strict and report.invalid:
        sys.exit(1)


@click.command(name="replay")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--rate",
    type=click.FloatRange(min=0),
    default=1000.0,
    show_default=True,
    envvar="RELATA_REPLAY_RATE",
    show_envvar=True,
    help="Offered rate in events/s (0 = as fast as possible).",
)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=None,
    envvar="RELATA_REPLAY_LIMIT",
    show_envvar=True,
    help="Send at most this many events.",
)
@settings_options(KafkaSettings, group="kafka")
def replay_command(file: Path, rate: float, limit: int | None, **params: Any) -> None:
    """Replay FILE (events.jsonl[.gz]) into behavior-events, keyed by user_id, at a fixed rate.

    Lines are sent verbatim: invalid ones reach the stream processor's dead-letter topic.
    """
    from tqdm import tqdm

    kafka = _kafka_settings(params)
    require_kafka(kafka, needs={kafka.topic(BEHAVIOR_EVENTS.name): WRITES})
    _ensure_topic(kafka, BEHAVIOR_EVENTS)
    topic = kafka.topic(BEHAVIOR_EVENTS.name)
    producer = make_producer(kafka)
    bar = tqdm(total=limit, unit="ev", file=sys.stderr, desc=f"replay -> {topic}")

    def show(progress: ReplayProgress) -> None:
        bar.update(progress.sent - bar.n)
        bar.set_postfix(rate=f"{progress.rate:.0f}/s", unparsable=progress.unparsable)

    try:
        final = replay_events(
            iter_jsonl(file),
            producer=producer,
            topic=topic,
            rate=rate,
            limit=limit,
            on_progress=show,
        )
    except DeliveryError as exc:
        raise click.ClickException(str(exc)) from exc
    except KeyboardInterrupt:
        producer.flush(10)
        raise
    finally:
        bar.close()
    click.echo(
        f"sent {final.sent} events to {topic} in {final.elapsed_s:.1f} s "
        f"({final.rate:.0f} events/s; {final.unparsable} unparsable lines sent unkeyed; "
        f"{final.refused} lines refused by the producer, not sent)",
        err=True,
    )


def erasure_request(user_id: str, request_id: str | None = None) -> ErasureRequest:
    """A validated erasure request for `user_id` (a random request id unless given)."""
    return ErasureRequest(
        user_id=user_id,
        request_id=request_id or f"erase-{uuid.uuid4().hex}",
        requested_at=datetime.now(UTC),
    )


def send_erasure(kafka: KafkaSettings, request: ErasureRequest) -> None:
    """Send `request` to erasure-requests, keyed by user; raises `DeliveryError` unless the
    broker acknowledged it."""
    producer = make_producer(kafka)
    failures = _Deliveries()
    producer.produce(
        kafka.topic(ERASURE_REQUESTS.name),
        key=request.user_id.encode("utf-8"),
        value=request.model_dump_json().encode("utf-8"),
        on_delivery=failures.callback,
    )
    _flush(producer, failures, timeout_s=30, what="erasure request")


@click.command(name="erase")
@click.argument("user_id")
@click.option("--request-id", default=None, help="Your id for the request (echoed in the audit).")
@settings_options(KafkaSettings, group="kafka")
def erase_command(user_id: str, request_id: str | None, **params: Any) -> None:
    """Erase USER_ID from every state and output topic relata keeps (see the README)."""
    kafka = _kafka_settings(params)
    try:
        request = erasure_request(user_id, request_id)
    except ValueError as exc:
        raise click.ClickException(f"not a valid request: {exc}") from exc
    require_kafka(kafka, needs={kafka.topic(ERASURE_REQUESTS.name): WRITES})
    _ensure_topic(kafka, ERASURE_REQUESTS)
    try:
        send_erasure(kafka, request)
    except DeliveryError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"erasure requested request_id={request.request_id}", err=True)
