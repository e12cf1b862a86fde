"""The profile agent's handler: behaviour events → validated → folded per user → profile
updates, one association-input message per batch, and dead letters.

Glue around the pure fold in `streams/profile.py`; its input (librdkafka batches) and its
table are in `streams/event_consumer.py`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from kafkaio.dead_letters import DeadLetters, refused
from kafkaio.producer import RecordRefusedError
from schemas.decoding import Rejection, decode
from schemas.messages import BehaviorEvent, ErasureAudit, ErasureRequest, UserProfile

from .association import AssociationInput
from .catalog import CatalogView
from .erasure import is_erasure
from .event_consumer import ProfileStore
from .metrics import StreamsMetrics
from .ports import Sender
from .profile import FoldConfig, fold_user_events, profile_update
from .records import Record, reject
from .tables import stored_json

logger = logging.getLogger(__name__)

# Association inputs of a batch travel in messages of at most this many bytes (usually one
# message; a batch of many large baskets of long item ids is split, never refused for size).
ASSOCIATION_MESSAGE_BYTES = 262_144


@dataclass(slots=True)
class ProfileAgent:
    """Folds batches of behaviour events into the `profiles` store (see `handle_events`)."""

    profiles: ProfileStore
    catalog: CatalogView
    sender: Sender
    dead_letters: DeadLetters
    metrics: StreamsMetrics
    fold_config: FoldConfig
    profile_updates_topic: str
    association_input_topic: str
    erasure_audit_topic: str

    async def handle_events(self, records: Sequence[Record]) -> None:
        """Validate, fold and forward a batch of behaviour events; bad input goes to
        dead-letter.

        Each user's events fold in order; a user's profile is written, and one profile update
        (naming every folded event) sent, once per batch: coalescing, so a burst of one
        user's events (an invoice, a session) costs one table write and one recommendation.
        A forwarded erasure request erases its user after their earlier events of the batch.
        The association inputs of the batch travel as one message (split only when large), in
        input order, each naming its source event. A record whose handling raises is
        dead-lettered (`processing_error`) and the batch goes on. Returns once every output,
        and after them the profiles' changelog records, is acknowledged (the caller then
        acknowledges the inputs).
        """
        started = time.perf_counter()
        segment = 0
        for at, record in enumerate(records):
            if is_erasure(record):  # the user's events before it are folded first
                await self._fold(records[segment:at])
                self._erase(record)
                segment = at + 1
        await self._fold(records[segment:])
        # Outputs first, then the changelog records that remember the events as folded: a
        # crash in between refolds the events from the older profiles and sends the same
        # outputs again (the association fold knows them by source event), never loses them.
        await self.sender.flush()
        await self.profiles.flush()
        self.metrics.event_batch_size.observe(len(records))
        self.metrics.event_processing_seconds.observe(time.perf_counter() - started)

    async def _fold(self, records: Sequence[Record]) -> None:
        """Fold a run of events (no erasure among them) and queue their outputs."""
        if not records:
            return
        by_user: dict[str, list[tuple[int, BehaviorEvent, Record]]] = {}
        for index, record in enumerate(records):
            try:
                event = await self._validated(record)
            except Exception as exc:  # a bug on this record: the stream goes on without it
                self._failed(exc, [(index, None, record)])
                continue
            if event is not None:
                by_user.setdefault(event.user_id, []).append((index, event, record))
        inputs: list[tuple[int, dict[str, Any]]] = []
        for user_id, events in by_user.items():
            user_inputs: list[tuple[int, dict[str, Any]]] = []
            try:
                self._fold_user(user_id, events, user_inputs)
            except Exception as exc:  # nothing of this user's batch was written or sent
                self._failed(exc, events)
                continue
            inputs.extend(user_inputs)
        if inputs:
            inputs.sort(key=lambda pair: pair[0])
            for chunk in _chunks([orjson.dumps(data) for _, data in inputs]):
                try:
                    self.sender.produce(self.association_input_topic, key=None, value=chunk)
                except RecordRefusedError:  # statistics are approximate: lose it, not the stream
                    logger.exception("association inputs dropped bytes=%d", len(chunk))

    def _erase(self, record: Record) -> None:
        """Erase the user of a forwarded erasure request: their profile (a changelog
        tombstone: the de-duplication ids go with it), and, through a profile-updates
        tombstone, their recommendations (the recommender publishes a tombstone); one audit
        record without personal data. Idempotent; a later event starts a new profile."""
        request = decode(record.value, ErasureRequest)
        if isinstance(request, Rejection) or record.key != request.user_id.encode("utf-8"):
            reason = request.reason if isinstance(request, Rejection) else "key is not user_id"
            reject(self.dead_letters, Rejection("invalid_fields", reason), record)
            return
        user_id = request.user_id
        found = self.profiles.get(record.partition, user_id) is not None
        self.profiles.delete(record.partition, user_id)
        self.sender.produce(self.profile_updates_topic, key=record.key, value=None)
        audit = ErasureAudit(
            request_id=request.request_id,
            erased_at=datetime.now(UTC),
            stage="streams",
            profile_found=found,
        )
        self.sender.produce(
            self.erasure_audit_topic,
            key=request.request_id.encode("utf-8"),
            value=audit.model_dump_json().encode("utf-8"),
        )
        self.metrics.erasures.inc()
        # The request id only: the log is no place for the user id being erased.
        logger.info("user erased request_id=%s profile_found=%s", request.request_id, found)

    async def _validated(self, record: Record) -> BehaviorEvent | None:
        decoded = decode(record.value, BehaviorEvent)
        if isinstance(decoded, Rejection):
            reject(self.dead_letters, decoded, record)
            return None
        event = decoded
        if record.key != event.user_id.encode("utf-8"):
            reason = (
                f"record key {record.key!r} is not the event's user_id {event.user_id!r}: "
                "behavior-events must be keyed by user_id so a user's events share a partition"
            )
            reject(self.dead_letters, Rejection("invalid_fields", reason), record)
            return None
        if not self.catalog.ready.is_set():
            await self.catalog.ready.wait()
        if event.item_id not in self.catalog:
            reason = f"item_id {event.item_id!r} is not an available item of the catalog"
            reject(self.dead_letters, Rejection("unknown_item", reason), record)
            return None
        self.metrics.events_consumed.labels(event.event_type).inc()
        return event

    def _fold_user(
        self,
        user_id: str,
        events: Sequence[tuple[int, BehaviorEvent, Record]],
        inputs: list[tuple[int, dict[str, Any]]],
    ) -> None:
        """Fold one user's events of a batch (in order); write the profile and send one
        update. An event that fails to fold is dead-lettered, and so is a conflicting
        duplicate (a known event id with other content); the others still count. Raises only
        before anything of the user was written or sent."""
        partition = events[0][2].partition  # keyed by user_id: a user is one partition
        stored = self.profiles.get(partition, user_id)
        profile = None if stored is None else UserProfile.model_validate_json(stored_json(stored))
        fold = fold_user_events(profile, [event for _, event, _ in events], self.fold_config)
        for at, error in fold.failed:  # dead-letter the event whose fold raised; the rest count
            self._failed(error, [events[at]])
        for at, reason in fold.conflicts:
            reject(self.dead_letters, Rejection("conflicting_duplicate", reason), events[at][2])
        self.metrics.events_duplicate.inc(fold.duplicates)
        folded: list[tuple[BehaviorEvent, Record]] = []
        for at, result in fold.changed:
            index, event, record = events[at]
            folded.append((event, record))
            assoc = AssociationInput.from_fold(
                result, event, source=(record.partition, record.offset)
            )
            if assoc is not None:
                inputs.append((index, assoc.to_dict()))
        profile = fold.profile
        if profile is None or not folded:
            return
        update = profile_update(
            profile,
            trigger_event_ids=[event.event_id for event, _ in folded],
            # The oldest folded event's produce time: latency counts from the first trigger.
            source_ts_ms=max(0, int(min(record.timestamp_s for _, record in folded) * 1000)),
            now=datetime.now(UTC),
            event=folded[-1][0],
        )
        try:
            # The changelog record first: if the producer refuses it (too large), the profile
            # is not written and no update is sent; the events are dead-lettered.
            self.profiles.put(partition, user_id, profile.model_dump_json().encode("utf-8"))
        except RecordRefusedError as exc:
            inputs.clear()
            for _, record in folded:
                reject(self.dead_letters, refused(exc, "profile"), record)
            return
        try:
            self.sender.produce(
                self.profile_updates_topic,
                key=user_id.encode("utf-8"),
                value=update.model_dump_json().encode("utf-8"),
            )
        except RecordRefusedError as exc:  # folded and stored, but not handed on
            for _, record in folded:
                reject(self.dead_letters, refused(exc, "profile update"), record)
            return
        self.metrics.profile_updates.inc()

    def _failed(
        self, exc: Exception, events: Sequence[tuple[int, BehaviorEvent | None, Record]]
    ) -> None:
        for _, event, record in events:
            logger.error(
                "processing failed %s[%d] offset=%d user_id=%s",
                record.topic,
                record.partition,
                record.offset,
                None if event is None else event.user_id,
                exc_info=exc,
            )
            rejection = Rejection("processing_error", f"{type(exc).__name__}: {exc}")
            reject(self.dead_letters, rejection, record)


def _chunks(parts: Sequence[bytes], limit: int = ASSOCIATION_MESSAGE_BYTES) -> list[bytes]:
    """JSON arrays of the JSON values `parts`, in order, each at most `limit` bytes unless one
    value alone is larger (it then travels alone)."""
    chunks: list[bytes] = []
    current: list[bytes] = []
    size = 2  # the brackets
    for part in parts:
        if current and size + len(part) + 1 > limit:
            chunks.append(b"[" + b",".join(current) + b"]")
            current, size = [], 2
        current.append(part)
        size += len(part) + 1
    if current:
        chunks.append(b"[" + b",".join(current) + b"]")
    return chunks
