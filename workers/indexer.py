"""Item indexer: `item-catalog` -> encoder -> vector store, in micro-batches, at least once.

Retiring (tombstone or available=false) keeps the vector and marks the point unavailable:
searches skip it, while users whose history holds it keep a pooled vector and explanations
that name it. Offsets are committed only after the store write, the similar lists and dead
letters are acknowledged, so a crash re-does the batch; re-doing is harmless (upserts are
idempotent, `similar-items` is compacted).

`similar` lists: after each batch's upsert, every available item of the batch is searched for
its `similar_k` nearest available neighbours (one batched query) and its list published to
`similar-items`; a retired item's list gets a tombstone. Neighbours' own lists are not
re-searched: cosine is symmetric, so whoever serves the lists adds a new item to the lists of
the items that appear in its list (`streams/similar.py`). Each item's list is published by
the indexer that owns the item's catalog partition: one producer per key.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt

from kafkaio.client import Consumer, Message, Producer
from kafkaio.consumer import CommitRetry, LagReporter, commit, commit_offsets, usable
from kafkaio.dead_letters import DeadLetters
from kafkaio.health import LoopWatch
from kafkaio.producer import DEFAULT_ACK_TIMEOUT_S, AckedProducer, RecordRefusedError
from schemas.decoding import Rejection, decode, key_text
from schemas.messages import CatalogItem, RelatedItem, SimilarList
from workers.encoder import Encoder
from workers.item_text import item_categories, item_text
from workers.metrics import WorkerMetrics
from workers.vector_store import ModelIdentity, VectorStore, require_model

logger = logging.getLogger(__name__)

STAGE = "item-indexer"


@dataclass(frozen=True, slots=True)
class IndexerTopics:
    catalog: str
    dead_letter: str
    # Where each indexed item's nearest neighbours go (None: not published).
    similar: str | None = None


def item_payload(item: CatalogItem) -> dict[str, Any]:
    """The payload stored with an item's vector (filters use `available` and `categories`)."""
    return {
        "item_id": item.item_id,
        "title": item.title,
        "categories": item_categories(item, limit=50),
        "brand": item.brand,
        "price": item.price,
        "available": item.available,
    }


@dataclass(slots=True)
class BatchResult:
    records: int = 0
    indexed: int = 0
    retired: int = 0
    dead_letters: int = 0
    similar_lists: int = 0


class ItemIndexer:
    """The indexing loop: `poll_once()` handles one micro-batch; `run()` loops until stopped."""

    def __init__(
        self,
        *,
        consumer: Consumer,
        producer: Producer,
        encoder: Encoder,
        store: VectorStore,
        metrics: WorkerMetrics,
        topics: IndexerTopics,
        max_batch: int = 512,
        max_wait_ms: float = 50.0,
        watch: LoopWatch | None = None,
        ack_timeout_s: float = DEFAULT_ACK_TIMEOUT_S,
        commit_retry: CommitRetry | None = None,
        similar_k: int = 0,
    ) -> None:
        self.consumer = consumer
        # Dead letters: a refused one raises from `flush` (delivery reports), never lost; a
        # broker that does not answer is waited for (until the loop is stopped).
        self.producer = AckedProducer(producer, ack_timeout_s=ack_timeout_s)
        self.watch = watch or LoopWatch("indexer")
        # Commits that failed (the consumer's on_commit reports them) are sent again when idle.
        self.commit_retry = commit_retry or CommitRetry()
        # Vectors of this encoder written into another model's version would mix the two.
        require_model(store, ModelIdentity.of(encoder))
        self.encoder = encoder
        self.store = store
        self.metrics = metrics
        self.topics = topics
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        # Neighbours per published similar list (0, or no topic: none published).
        self.similar_k = similar_k if topics.similar is not None else 0
        self._lag = LagReporter(consumer, metrics.consumer_lag)
        self._dead_letters = DeadLetters(
            self.producer, topic=topics.dead_letter, stage=STAGE, counter=metrics.dead_letter
        )

    def poll_once(self) -> BatchResult:
        """Consume up to `max_batch` records (waiting at most `max_wait_ms`) and apply them."""
        messages = self.consumer.consume(num_messages=self.max_batch, timeout=self.max_wait_s)
        result = BatchResult(records=len(messages))
        if not messages:
            retry = self.commit_retry.take()
            if retry:
                commit_offsets(self.consumer, retry)
            self._lag.maybe_report()
            return result
        # Last record per item wins, as compaction would have it.
        latest: dict[str, tuple[CatalogItem | None, Message]] = {}
        for msg in usable(messages):
            raw = msg.value()
            if raw is None:
                item_id = key_text(msg.key())
                if item_id:
                    latest[item_id] = (None, msg)
                continue
            decoded = decode(raw, CatalogItem)
            key = key_text(msg.key())
            if not isinstance(decoded, Rejection) and key is not None and key != decoded.item_id:
                decoded = Rejection(
                    "invalid_fields",
                    f"record key {key!r} does not match item_id {decoded.item_id!r}",
                )
            if isinstance(decoded, Rejection):
                self._dead_letters.send(msg, decoded)
                result.dead_letters += 1
                continue
            latest[decoded.item_id] = (decoded, msg)

        # Items with data are (re-)encoded even when retired, so their vector stays current.
        items = [(item, msg) for item, msg in latest.values() if item is not None]
        tombstoned = [item_id for item_id, (item, _) in latest.items() if item is None]
        encoded: list[CatalogItem] = []
        vectors = np.zeros((0, self.encoder.dim), dtype=np.float32)
        if items:
            encoded, vectors = self._encode(items, result)
            if encoded:
                self.store.upsert(
                    [item.item_id for item in encoded],
                    vectors,
                    [item_payload(item) for item in encoded],
                )
            result.indexed = sum(1 for item in encoded if item.available)
            result.retired = len(encoded) - result.indexed
        known: list[str] = []
        if tombstoned:
            # A tombstone for an item never indexed has nothing to retire.
            known = list(self.store.get_payloads(tombstoned))
            self.store.set_available(known, False)
            result.retired += len(known)
        if self.similar_k:
            # After every write of the batch, so that no list names an item it retires.
            rows = [n for n, item in enumerate(encoded) if item.available]
            retired = [item.item_id for item in encoded if not item.available] + known
            result.similar_lists = self._publish_similar(
                [encoded[n].item_id for n in rows], vectors[rows], retired
            )
        self.metrics.items_indexed.inc(result.indexed)
        self.metrics.items_retired.inc(result.retired)
        outputs = result.dead_letters or result.similar_lists
        if outputs and self.producer.flush():
            return result  # stopped before the outputs were acknowledged: redo the batch
        commit(self.consumer)
        self._lag.maybe_report()
        logger.debug(
            "indexed batch records=%d indexed=%d retired=%d dead_letters=%d",
            result.records,
            result.indexed,
            result.retired,
            result.dead_letters,
        )
        return result

    def _publish_similar(
        self,
        ids: Sequence[str],
        vectors: npt.NDArray[np.float32],
        retired: Sequence[str],
    ) -> int:
        """Publish the similar lists of `ids` (their vectors as rows, in order; one batched
        search) and a tombstone for each of `retired`. Returns how many records went out."""
        assert self.topics.similar is not None
        topic = self.topics.similar
        sent = 0
        if ids:
            for item_id, neighbours in zip(
                ids, similar_neighbours(self.store, ids, vectors, k=self.similar_k), strict=True
            ):
                value = SimilarList(
                    item_id=item_id,
                    related=neighbours,
                    model_name=self.encoder.name,
                    vectors_version=self.store.model.version if self.store.model else None,
                    updated_at=datetime.now(UTC),
                )
                try:
                    self.producer.produce(
                        topic, key=item_id.encode(), value=value.model_dump_json().encode()
                    )
                except RecordRefusedError:  # not with at most 100 neighbours; never fatal
                    logger.exception("similar list refused item_id=%s", item_id)
                    continue
                sent += 1
        for item_id in retired:
            self.producer.produce(topic, key=item_id.encode(), value=None)
            sent += 1
        return sent

    def _encode(
        self, items: list[tuple[CatalogItem, Message]], result: BatchResult
    ) -> tuple[list[CatalogItem], npt.NDArray[np.float32]]:
        """Encode the items' texts in one call. Should that raise, each item is encoded on its
        own and the one that raises is dead-lettered (`processing_error`), so one record the
        encoder cannot take never stops the loop (the catalog is compacted and read again
        from its start: it would stop it on every restart)."""
        start = time.perf_counter()
        try:
            vectors = self.encoder.encode([item_text(item) for item, _ in items])
        except Exception:
            logger.exception("encoding a batch failed items=%d; encoding one by one", len(items))
        else:
            self.metrics.observe_encode(len(items), time.perf_counter() - start)
            return [item for item, _ in items], vectors
        encoded: list[CatalogItem] = []
        rows: list[npt.NDArray[np.float32]] = []
        for item, msg in items:
            try:
                rows.append(self.encoder.encode([item_text(item)])[0])
            except Exception as exc:
                logger.exception("encoding failed item_id=%s", item.item_id)
                rejection = Rejection("processing_error", f"{type(exc).__name__}: {exc}")
                self._dead_letters.send(msg, rejection)
                result.dead_letters += 1
                continue
            encoded.append(item)
        self.metrics.observe_encode(len(encoded), time.perf_counter() - start)
        return encoded, np.asarray(rows, dtype=np.float32)

    def run(self, stop_event: threading.Event) -> None:
        """Loop until `stop_event` is set; the caller closes consumer, producer and store."""
        self.producer.stop = stop_event
        logger.info("item indexer started topic=%s", self.topics.catalog)
        total = 0
        while not stop_event.is_set():
            result = self.poll_once()
            total += result.records
            self.watch.beat()
        logger.info("item indexer stopped records=%d", total)


def similar_neighbours(
    store: VectorStore, ids: Sequence[str], vectors: npt.NDArray[np.float32], *, k: int
) -> list[list[RelatedItem]]:
    """Each item's `k` nearest available neighbours by its vector (itself left out), best
    first, as `similar` related items: one batched store query."""
    hits = store.search_batch(
        np.asarray(vectors, dtype=np.float32),
        k=k,
        exclude_ids=[{item_id} for item_id in ids],
        only_available=True,
    )
    return [[RelatedItem.similar(hit_id, score) for hit_id, score in found] for found in hits]
