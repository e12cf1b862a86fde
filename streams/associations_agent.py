"""The association agent's handlers: association-input batches folded into the statistics,
the related items of an item, and the related lists republished when they change.

Glue around the pure statistics in `streams/association.py`; the state lives in the two
one-partition tables `associations` and `association-totals`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from kafkaio.dead_letters import DeadLetters
from kafkaio.producer import RecordRefusedError
from schemas.decoding import Rejection
from schemas.messages import DEFAULT_MAX_RECORD_BYTES, RelatedItems, RelationKind

from .association import (
    AssociationConfig,
    AssociationFold,
    AssociationInput,
    InputPosition,
    ItemRecord,
    TotalsRecord,
)
from .metrics import StreamsMetrics
from .neighbours import (
    CountMemo,
    Membership,
    membership,
    membership_changed,
    related_items,
    top_partners,
)
from .ports import Sender
from .records import Record, reject

logger = logging.getLogger(__name__)

TOTALS_KEY = "totals"
# Inputs folded (and records written) between two yields of the event loop.
ASSOCIATION_SLICE = 32
RELATED_YIELD_EVERY = 16


@dataclass(slots=True)
class InputCursor:
    """Per association-input partition, the offset of the next message the fold may take.

    The fold's watermarks (`AssociationFold`) are exact only if each partition's messages are
    folded in offset order with none left out: a message folded before an earlier one moves
    the watermarks of the records it touches past the earlier one, which is then skipped for
    them as already held, and a message never folded is lost once a later offset is committed.
    Faust does not guarantee that order around a rebalance: records fetched before it can be
    handed over after the seek back to the committed offset, and a message can go missing from
    the middle of a fetch. `admit` keeps each partition's messages that continue what was
    folded (re-delivered ones included) and holds back the rest, telling where the partition
    must be read again from; held-back messages are neither folded nor acknowledged, so they
    come again in order."""

    next_offset: dict[int, int] = field(default_factory=dict)

    def admit(self, records: Sequence[Record]) -> tuple[list[Record], dict[int, int]]:
        """The records to fold, in order, and per partition found with a gap the offset to
        read it again from. Asked again for every batch that still shows the gap: a seek can
        be undone by records fetched before it, and asking again costs only a fetch."""
        kept: list[Record] = []
        rewind: dict[int, int] = {}
        for record in records:
            partition, offset = record.partition, record.offset
            expected = self.next_offset.get(partition)
            if expected is None or offset <= expected:
                # The first message seen, the next one, or one folded before (re-delivered).
                kept.append(record)
                self.next_offset[partition] = max(offset + 1, expected or 0)
            else:
                rewind.setdefault(partition, expected)
        return kept, rewind

    def skip_to(self, partition: int, offset: int) -> None:
        """Go on from `offset`: the partition no longer holds the messages before it
        (deleted by retention before they were folded)."""
        self.next_offset[partition] = offset


@dataclass(slots=True)
class AssociationAgent:
    """Folds association inputs into tables `associations` (item → `ItemRecord`) and
    `association-totals`, and publishes related lists to `related_items_topic`."""

    associations: Any
    association_totals: Any
    sender: Sender
    metrics: StreamsMetrics
    config: AssociationConfig
    related_items_topic: str
    dead_letters: DeadLetters
    # Membership of the last published related lists (in memory: a restart republishes once).
    published: dict[str, Membership] = field(default_factory=dict)
    # Whether a published list may show an item (the catalog view: available items); None
    # shows every neighbour.
    shown: Callable[[str], bool] | None = None
    dirty: set[str] = field(default_factory=set)

    def _inputs(
        self, records: Sequence[Record]
    ) -> tuple[list[AssociationInput], list[InputPosition]]:
        """The association inputs of a batch of association-input records, in order, and where
        each was read. A record that is not a JSON list of inputs, or holds an invalid one, is
        dead-lettered (its valid inputs still count): the topic is internal, so that is a bug
        or a foreign producer."""
        inputs: list[AssociationInput] = []
        at: list[InputPosition] = []
        for record in records:
            if record.value is None:
                reject(self.dead_letters, Rejection("invalid_fields", "null value"), record)
                continue
            if len(record.value) > DEFAULT_MAX_RECORD_BYTES:
                reason = f"value of {len(record.value)} bytes"
                reject(self.dead_letters, Rejection("too_large", reason), record)
                continue
            try:
                message = orjson.loads(record.value)
            except orjson.JSONDecodeError as exc:  # orjson refuses deep nesting here too
                deep = "depth limit" in str(exc) or "ecursion" in str(exc)
                rejection = Rejection("too_deep" if deep else "malformed_json", str(exc))
                reject(self.dead_letters, rejection, record)
                continue
            bad: list[str] = []
            # A list per profile batch; a single input from a version before batching.
            for data in message if isinstance(message, list) else [message]:
                try:
                    inputs.append(AssociationInput.from_dict(data))
                except Exception as exc:  # any shape of bad input is data
                    bad.append(f"{type(exc).__name__}: {exc}")
            at += [
                InputPosition.of(inp, partition=record.partition, offset=record.offset)
                for inp in inputs[len(at) :]
            ]
            if bad:
                reason = f"{len(bad)} invalid association inputs, first: {bad[0]}"
                reject(self.dead_letters, Rejection("invalid_fields", reason), record)
        return inputs, at

    async def handle_association_batch(self, records: Sequence[Record]) -> None:
        """Fold a batch of association-input records (each a JSON list of inputs, in order)
        into the records and the totals.

        The statistics equal one-by-one application; each touched record (and the totals) is
        written to its changelog-backed table once per batch, not once per input: a record
        holds up to capacity x kinds partners, and serialising it was the agent's main cost.
        The fold is exact over re-delivery: each record stores the offset of
        the last message folded into it and skips the inputs it already holds
        (`AssociationFold`); their items' related lists are still republished, since a crash
        may have come before they were. The work is done in slices of ASSOCIATION_SLICE
        inputs (and record writes) with the event loop let go between them, so a large batch
        never holds up the profile agent, which shares the loop, for more than a few
        milliseconds.
        """
        inputs, at = self._inputs(records)
        if not inputs:
            return
        state = self.association_totals.get(TOTALS_KEY) or {"totals": None, "clock": 0.0}
        fold = AssociationFold(
            lookup=self.associations.get, totals=state["totals"], config=self.config
        )
        for start in range(0, len(inputs), ASSOCIATION_SLICE):
            if start:
                await asyncio.sleep(0)
            end = start + ASSOCIATION_SLICE
            fold.apply(inputs[start:end], at[start:end])
        table = self.associations
        for n, (item_id, record) in enumerate(fold.touched.items(), start=1):
            try:
                table[item_id] = record
            except RecordRefusedError:  # its changelog record is too large: lose this update
                logger.exception("association record not written item_id=%r", item_id[:100])
            if n % ASSOCIATION_SLICE == 0:
                await asyncio.sleep(0)
        self.dirty.update(fold.touched)
        self.dirty.update(fold.skipped)
        clock = max(float(state["clock"]), *(inp.ts for inp in inputs))
        self.association_totals[TOTALS_KEY] = {"totals": fold.totals, "clock": clock}
        self.metrics.association_updates.inc(len(inputs))

    def association_clock(self) -> tuple[TotalsRecord | None, float]:
        """The global totals and the event-time clock (latest event ts) of the statistics."""
        state = self.association_totals.get(TOTALS_KEY)
        if state is None:
            return None, 0.0
        return state["totals"], float(state["clock"])

    def related_of(
        self, item_id: str, *, kinds: Iterable[RelationKind] | None = None
    ) -> RelatedItems | None:
        """Current association neighbours of one item (None: no behaviour seen)."""
        record: ItemRecord | None = self.associations.get(item_id)
        if record is None:
            return None
        totals, clock = self.association_clock()
        return related_items(
            record,
            lookup=self.associations.get,
            totals=totals,
            now=clock,
            config=self.config,
            kinds=kinds,
        )

    async def flush_related(self) -> int:
        """Publish the related lists of touched items that changed materially.

        Membership is checked on the scored top list; the evidence objects are built only for
        the lists that are published.
        """
        if not self.dirty:
            return 0
        items, self.dirty = self.dirty, set()
        totals, clock = self.association_clock()
        lookup = self.associations.get
        # The partners' counts at `clock`, looked up once per flush (lists share partners).
        memo: CountMemo = {}
        published = 0
        for n, item_id in enumerate(sorted(items), start=1):
            if n % RELATED_YIELD_EVERY == 0:
                # Many dirty items take tens of milliseconds: let the profile agent run between.
                await asyncio.sleep(0)
            record: ItemRecord | None = lookup(item_id)
            if record is None:
                continue
            top = top_partners(record, lookup=lookup, now=clock, config=self.config, memo=memo)
            after = membership(top)
            before = self.published.get(item_id)
            if not membership_changed(before, after, self.config.republish_change):
                continue
            new = related_items(
                record,
                lookup=lookup,
                totals=totals,
                now=clock,
                config=self.config,
                top=top,
            )
            if self.shown is not None:
                new = new.model_copy(
                    update={"related": [r for r in new.related if self.shown(r.item_id)]}
                )
            try:
                self.sender.produce(
                    self.related_items_topic,
                    key=item_id.encode("utf-8"),
                    value=new.model_dump_json().encode("utf-8"),
                )
            except RecordRefusedError:  # too large to publish: keep the last list, go on
                logger.exception("related list not published item_id=%r", item_id[:100])
                continue
            self.published[item_id] = after
            published += 1
        await self.sender.flush()
        self.metrics.related_items_published.inc(published)
        return published
