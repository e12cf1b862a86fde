"""Recommender: `profile-updates` -> user vectors -> vector search + behaviour evidence ->
explained `recommendations`, in micro-batches, at least once.

Per batch: coalesce updates of one user into the latest (union of trigger ids, oldest source
timestamp), build every user vector (pooled history item vectors, the encoded profile text,
or the sequence user encoder's vector), run one batched store query, score each user's
candidates with `workers.ranking.score` blending in the compacted `related-items` topic (read fully by every instance into memory),
drop candidates that are unavailable, word the reasons of the k kept (`explain`; together
these are `rank`) and publish; the batch's offsets are committed once the broker acknowledged
its answers (delivery reports, `AckedProducer`), while the next batch is worked on.

The trending list, the answer to a user with no usable history (the same `recommend` call with
an empty history), is ranked every `trending_interval_s` and published to `trending-items`
(key: the placement) when its items changed, by the one instance that holds partition 0 of
`profile-updates` (`leads`): one producer of the key at a time. The stream processor answers
users with no list of their own with it.

An item the store does not hold (not indexed yet) counts as unavailable. Item vectors and
titles are cached (LRU); a catalog edit of an item's text reaches the cache only on eviction
or restart, which is harmless for pooling but worth knowing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Set
from dataclasses import replace
from datetime import UTC, datetime
from functools import partial
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from kafkaio.client import Consumer, Message, Producer
from kafkaio.consumer import CommitRetry, LagReporter, commit_offsets, usable
from kafkaio.dead_letters import DeadLetters, refused
from kafkaio.health import LoopWatch
from kafkaio.producer import DEFAULT_ACK_TIMEOUT_S, AckedProducer, RecordRefusedError
from schemas.decoding import Rejection, decode, key_text
from schemas.messages import (
    Fallback,
    HistoryEntry,
    ProfileUpdate,
    Recommendation,
    RecommendedItem,
    RelatedItems,
)
from schemas.settings import RecommenderSettings
from workers.encoder import Encoder
from workers.fitting.bundle import ModelBundle
from workers.lookups import CachedTitles, ItemCache, RelatedIndex, RulesFile
from workers.metrics import RULES_STAGE, WorkerMetrics
from workers.micro_batch import BatchResult, PendingUser, RecommenderTopics, coalesce
from workers.ranking import (
    Answer,
    BlendWeights,
    Lookups,
    VectorRows,
    pooled_user_vector,
    profile_text,
    recommend_answers,
    strategy_weights,
)
from workers.ranking.core import History
from workers.trending_publisher import TrendingPublisher
from workers.user_encoder import UserEncoder, UserEncoderError, UserEncoderSlot
from workers.vector_store import ModelIdentity, VectorStore, require_model

logger = logging.getLogger(__name__)


FloatArray = npt.NDArray[np.float32]
STAGE = "recommender"
# related-items records applied per poll, before its answers (see `poll_once`).
RELATED_PER_POLL = 25


class Recommender:
    """The recommending loop: `poll_once()` handles one micro-batch; `run()` loops."""

    def __init__(
        self,
        *,
        consumer: Consumer,
        related_consumer: Consumer | None,
        producer: Producer,
        encoder: Encoder,
        store: VectorStore,
        metrics: WorkerMetrics,
        topics: RecommenderTopics,
        settings: RecommenderSettings,
        weights: BlendWeights | None = None,
        cache_size: int = 200_000,
        clock: Callable[[], float] = time.time,
        watch: LoopWatch | None = None,
        ack_timeout_s: float = DEFAULT_ACK_TIMEOUT_S,
        stop_flush_s: float = 10.0,
        commit_retry: CommitRetry | None = None,
        leads: Callable[[], bool] | None = None,
        stage: str = STAGE,
        user_encoder: UserEncoder | None = None,
        model: ModelBundle | None = None,
        on_history: Callable[[str, Sequence[HistoryEntry] | None], None] | None = None,
    ) -> None:
        self.consumer = consumer
        self.related_consumer = related_consumer
        # Outputs are acknowledged in the background; offsets follow the acknowledgements.
        self.producer = AckedProducer(producer, ack_timeout_s=ack_timeout_s)
        # The loop's progress, for the probes; how long a stop waits for acknowledgements.
        self.watch = watch or LoopWatch("recommender")
        self.stop_flush_s = stop_flush_s
        # Commits that failed (the consumer's on_commit reports them) are sent again.
        self.commit_retry = commit_retry or CommitRetry()
        # Refused before the first search: this encoder's text vectors (and the indexer that
        # shares the store) must come from the model that made the store's item vectors.
        require_model(store, ModelIdentity.of(encoder))
        self.encoder = encoder
        self.store = store
        self.metrics = metrics
        self.topics = topics
        self.settings = settings
        # The fitted model it ranks with (`use_model` swaps it between micro-batches), and who
        # hears each user's latest history (None: an erased user), e.g. the background fitter.
        self.model = model or ModelBundle(weights=weights or BlendWeights())
        self.weights = strategy_weights(settings.strategy, self.model.weights)
        self._next_model: ModelBundle | None = None
        self._model_lock = threading.Lock()
        self.on_history = on_history
        self.strategy = f"{settings.strategy}/{settings.user_vector}"
        # The sequence user encoder, swappable while running: the one configured
        # (user_vector=sequence), or the one a fitted model brings (served whatever the
        # setting: it won its validation against the pooled vectors).
        self.user_encoders = UserEncoderSlot()
        self._configured_encoder = user_encoder
        fitted_encoder = cast(UserEncoder | None, self.model.user_encoder)
        if fitted_encoder is not None or user_encoder is not None:
            self.swap_user_encoder(fitted_encoder or user_encoder)
        elif settings.user_vector == "sequence":
            logger.warning(
                "user_vector=sequence without a user encoder: pooling until one is swapped in"
            )
        self.related = RelatedIndex()
        self.cache = ItemCache(store, capacity=cache_size)
        self.clock = clock
        self._next_commit = 0.0  # time.monotonic() from when the next commit is due
        self._lag = LagReporter(consumer, metrics.consumer_lag)
        self._lookups = Lookups(
            user_vectors=self._user_vectors,
            search=self._search,
            item_vectors=self._item_vectors,
            available=self._available,
            related=self.related.table,
            popularity=self.related.popularity_with_prior,
            titles=CachedTitles(self.cache),
            attributes=self._attributes,
        )
        self.rules = RulesFile(settings.rules_path)
        # `stage` tells a shadow recommender's dead letters from the live one's.
        self._dead_letters = DeadLetters(
            self.producer, topic=topics.dead_letter, stage=stage, counter=metrics.dead_letter
        )
        # `leads`: whether this instance publishes the trending list (the composition root:
        # it holds partition 0 of profile-updates); alone, it does.
        self.trending_publisher = TrendingPublisher(
            topic=topics.trending,
            placement=settings.placement,
            interval_s=settings.trending_interval_s,
            rank=self.trending,
            describe=self._model_fields,
            produce=self.producer.produce,
            leads=leads,
        )

    # -- related-items -------------------------------------------------------------------------

    def _apply_related(self, messages: Iterable[Message]) -> int:
        n = 0
        for msg in usable(list(messages)):
            raw = msg.value()
            key = key_text(msg.key())
            if raw is None:
                if key:
                    self.related.apply(key, None)
                continue
            decoded = decode(raw, RelatedItems)
            if isinstance(decoded, Rejection):
                self._dead_letters.send(msg, decoded)
                continue
            self.related.apply(decoded.item_id, decoded)
            n += 1
        return n

    def drain_related(self, *, max_records: int = RELATED_PER_POLL) -> int:
        """Apply up to `max_records` of what `related-items` has ready now, without waiting."""
        if self.related_consumer is None:
            return 0
        total = 0
        while total < max_records:
            batch = self.related_consumer.consume(
                num_messages=min(1000, max_records - total), timeout=0
            )
            if not batch:
                break
            total += len(batch)
            self._apply_related(batch)
        return total

    def catch_up_related(self, *, timeout_s: float = 10.0) -> int:
        """At start: read `related-items` up to its current end (bounded by `timeout_s`)."""
        if self.related_consumer is None:
            return 0
        deadline = time.monotonic() + timeout_s
        total = 0
        idle = 0
        while time.monotonic() < deadline and idle < 3:
            batch = self.related_consumer.consume(num_messages=1000, timeout=0.2)
            if not batch:
                idle += 1
                continue
            idle = 0
            total += len(batch)
            self._apply_related(batch)
        logger.info("related-items loaded records=%d items=%d", total, len(self.related))
        return total

    # -- profile updates -----------------------------------------------------------------------

    def _decode_updates(
        self, messages: list[Message], result: BatchResult
    ) -> tuple[list[ProfileUpdate], dict[str, list[Message]], set[str]]:
        """The batch's valid updates, each user's input messages (what a failure of that
        user's answer dead-letters), and the users erased (a tombstone: the user's earlier
        updates of the batch are dropped; later ones start anew)."""
        updates: list[ProfileUpdate] = []
        sources: dict[str, list[Message]] = {}
        erased: set[str] = set()
        for msg in usable(messages):
            key = msg.key()
            if msg.value() is None and key:
                user_id = key.decode("utf-8", errors="replace")
                updates = [u for u in updates if u.user_id != user_id]
                sources.pop(user_id, None)
                erased.add(user_id)
                continue
            decoded = decode(msg.value(), ProfileUpdate)
            if isinstance(decoded, Rejection):
                self._dead_letters.send(msg, decoded)
                result.dead_letters += 1
                continue
            updates.append(decoded)
            sources.setdefault(decoded.user_id, []).append(msg)
            erased.discard(decoded.user_id)  # answered anew: its list replaces the old one
        return updates, sources, erased

    def _reject_user(
        self, messages: Sequence[Message], rejection: Rejection, result: BatchResult
    ) -> None:
        for msg in messages:
            self._dead_letters.send(msg, rejection)
            result.dead_letters += 1

    def _recommend_each(
        self, users: list[PendingUser], sources: Mapping[str, list[Message]], result: BatchResult
    ) -> tuple[list[PendingUser], list[Answer], list[str]]:
        """`recommend` for the whole batch; should that raise (a bug some user's history
        triggers), for each user on their own, dead-lettering the updates of a user whose
        ranking raises (`processing_error`) so the others are still answered. Returns the
        users answered, their items and their strategy names."""
        labels: list[str] = []
        try:
            return users, self.answer(users, labels=labels), labels
        except Exception:
            logger.exception("ranking a batch failed users=%d; ranking one by one", len(users))
        kept: list[PendingUser] = []
        answers: list[Answer] = []
        labels = []
        for user in users:
            label: list[str] = []
            try:
                answers.append(self.answer([user], labels=label)[0])
                labels += label
            except Exception as exc:
                logger.exception("ranking failed user_id=%s", user.update.user_id)
                rejection = Rejection("processing_error", f"{type(exc).__name__}: {exc}")
                self._reject_user(sources.get(user.update.user_id, []), rejection, result)
                continue
            kept.append(user)
        return kept, answers, labels

    def swap_user_encoder(self, encoder: UserEncoder | None) -> UserEncoder | None:
        """Serve the next batches with `encoder` (None: pooling); the batch being ranked
        finishes with the one it started with. Thread-safe; returns the replaced encoder.
        Refuses an encoder fitted on item vectors of another model version than the store's."""
        fitted_on = None if encoder is None else encoder.meta.get("item_vectors", {}).get("version")
        serving = self.store.model.version if self.store.model else self.encoder.version
        if encoder is not None and fitted_on is not None and fitted_on != serving:
            msg = (
                f"user encoder {encoder.name} was fitted on item vectors of version {fitted_on}; "
                f"the store holds version {serving}: refit it (`relata train`) on these vectors"
            )
            raise UserEncoderError(msg)
        return self.user_encoders.swap(encoder)

    def use_model(self, model: ModelBundle) -> None:
        """Rank with `model` from the next micro-batch on; any thread, never waits for one."""
        with self._model_lock:
            self._next_model = model

    def _adopt_model(self) -> None:
        with self._model_lock:
            model, self._next_model = self._next_model, None
        if model is not None:
            self.model = model
            self.weights = strategy_weights(self.settings.strategy, model.weights)
            # A fit that learned a user encoder serves it through the same slot; one without
            # hands the slot back to the configured encoder (or pooling).
            self.swap_user_encoder(
                cast(UserEncoder | None, model.user_encoder) or self._configured_encoder
            )
            logger.info("ranking model swapped in version=%s", model.version)

    def _user_vectors(
        self, histories: Sequence[History], *, labels: list[str] | None = None
    ) -> list[FloatArray | None]:
        """One vector per history; `labels` (when given) gets, per history, the user vector's
        name for the recommendation's strategy."""
        served = self.settings.user_vector == "sequence" or self.model.user_encoder is not None
        user_encoder = self.user_encoders.current() if served else None
        max_items = self.weights.max_sources
        if user_encoder is not None:
            max_items = max(max_items, user_encoder.input_config.max_len)
        self.cache.fetch(entry.item_id for h in histories for entry in h[:max_items])
        if user_encoder is not None:
            return self._sequence_vectors(user_encoder, histories, labels)
        if labels is not None:
            # `sequence` without an encoder pools.
            mode = (
                "pooled" if self.settings.user_vector == "sequence" else self.settings.user_vector
            )
            labels[:] = [mode] * len(histories)
        if self.settings.user_vector == "text":
            titles = CachedTitles(self.cache)
            texts = [profile_text(h, titles) for h in histories]
            todo = [n for n, text in enumerate(texts) if text]
            out: list[FloatArray | None] = [None] * len(histories)
            if todo:
                start = time.perf_counter()
                encoded = self.encoder.encode([texts[n] for n in todo])
                self.metrics.observe_encode(len(todo), time.perf_counter() - start)
                for row, n in enumerate(todo):
                    out[n] = encoded[row]
            return out
        return list(self._pooled(histories))

    def _sequence_vectors(
        self,
        user_encoder: UserEncoder,
        histories: Sequence[History],
        labels: list[str] | None,
    ) -> list[FloatArray | None]:
        """The encoder's vectors (one forward pass for the batch); histories it cannot read
        (no item vector to start from) are pooled: no vector either, today, but pooling stays
        the one fallback should the two rules ever differ."""
        start = time.perf_counter()
        encoded = user_encoder.encode(histories, self.cache.vectors())
        self.metrics.user_encoder_seconds.observe(time.perf_counter() - start)
        pooled = self._pooled([h for h, v in zip(histories, encoded, strict=True) if v is None])
        if labels is not None:
            labels[:] = [user_encoder.name if v is not None else "pooled" for v in encoded]
        return [v if v is not None else next(pooled) for v in encoded]

    def _pooled(self, histories: Sequence[History]) -> Iterator[FloatArray | None]:
        vectors = self.cache.vectors()
        for h in histories:
            yield pooled_user_vector(
                h,
                vectors,
                recency=self.weights.pool_recency,
                weight_exponent=self.weights.weight_exponent,
                max_items=self.weights.max_sources,
            )

    def _search(
        self, matrix: FloatArray, excludes: list[set[str]]
    ) -> list[list[tuple[str, float]]]:
        start = time.perf_counter()
        found = self.store.search_batch(
            matrix, k=self.settings.candidates, exclude_ids=excludes, only_available=True
        )
        self.metrics.qdrant_query_seconds.observe(time.perf_counter() - start)
        return found

    def _item_vectors(self, ids: Iterable[str]) -> VectorRows:
        self.cache.fetch(ids)
        return self.cache.vectors()

    def _available(self, ids: Set[str]) -> set[str]:
        start = time.perf_counter()
        payloads = self.store.get_payloads(ids)
        self.metrics.qdrant_query_seconds.observe(time.perf_counter() - start)
        return {i for i, p in payloads.items() if p.get("available") is True}

    def _attributes(self, ids: Set[str]) -> dict[str, dict[str, Any]]:
        start = time.perf_counter()
        payloads = self.store.get_payloads(ids)
        self.metrics.qdrant_query_seconds.observe(time.perf_counter() - start)
        return payloads

    def answer(self, users: list[PendingUser], *, labels: list[str] | None = None) -> list[Answer]:
        """Ranked, explained, available items for each user, with their candidate pool
        (pure of Kafka). `labels`, when given, receives each user's strategy name
        (`<strategy>/<user vector>`)."""
        return self._answers([user.update.history for user in users], labels=labels)

    def _answers(
        self, histories: Sequence[Sequence[HistoryEntry]], *, labels: list[str] | None = None
    ) -> list[Answer]:
        lookups = self._lookups
        vector_names: list[str] = []
        if labels is not None:
            lookups = replace(
                lookups, user_vectors=partial(self._user_vectors, labels=vector_names)
            )
        answers = recommend_answers(
            histories,
            lookups=lookups,
            weights=self.weights,
            k=self.settings.k,
            mmr_lambda=self.settings.mmr_lambda,
            rules=self.rules.current(),
            placement=self.settings.placement,
            pool_size=self.settings.pool_size,
            # The learned ranker re-orders the full blend: other strategies isolate a signal.
            reranker=self.model.ranker if self.settings.strategy == "hybrid" else None,
        )
        if labels is not None:
            names = vector_names or [self.settings.user_vector] * len(histories)
            labels[:] = [f"{self.settings.strategy}/{name}" for name in names]
        return answers

    def recommend(self, users: list[PendingUser]) -> list[list[RecommendedItem]]:
        """The items of `answer`."""
        return [answer.items for answer in self.answer(users)]

    def message(
        self,
        user: PendingUser,
        answer: Answer,
        *,
        generated_at: datetime,
        now_ms: float,
        strategy: str | None = None,
    ) -> Recommendation:
        """The record published for one user's answer."""
        fallbacks: list[Fallback] = (
            ["business_rules_removed_every_candidate"] if answer.rules_fell_back else []
        )
        return Recommendation(
            user_id=user.update.user_id,
            items=answer.items,
            generated_at=generated_at,
            **{**self._model_fields(), "strategy": strategy or self.strategy},
            ranking_version=self.model.version,
            trigger_event_ids=user.trigger_event_ids,
            latency_ms=max(0.0, now_ms - user.source_ts_ms),
            fallbacks=fallbacks,
            pool=answer.pool,
        )

    def poll_once(self) -> BatchResult:
        """Consume up to `max_batch` updates (waiting at most `max_wait_ms`) and answer them.

        The answers are produced, not waited for: the broker acknowledges them while the next
        batch is worked on (a blocking flush per batch was a quarter of this loop's time at
        500 events/s), and the batch's offsets are committed once they are acknowledged
        (`AckedProducer`), so delivery stays at least once.
        """
        self.producer.settle()
        self.trending_publisher.maybe_publish()
        self._adopt_model()
        messages = list(
            self.consumer.consume(
                num_messages=self.settings.max_batch, timeout=self.settings.max_wait_ms / 1000.0
            )
        )
        # A bounded share per poll: the association agent publishes the lists that changed each
        # second in one burst (hundreds early in a stream), and draining a whole burst before
        # answering would hold the updates up for a hundred milliseconds or more.
        self.drain_related()
        result = BatchResult(records=len(messages))
        if not messages:
            self._maybe_commit()
            self._lag.maybe_report()
            return result
        self.producer.begin(messages)
        self.metrics.recommender_batch_size.observe(len(messages))
        updates, sources, erased = self._decode_updates(messages, result)
        for user_id in sorted(erased):  # the user's list goes too (a compacted topic forgets)
            self.producer.produce(self.topics.recommendations, key=user_id.encode(), value=None)
        pending, result.coalesced = coalesce(updates)
        self.metrics.profile_updates_coalesced.inc(result.coalesced)
        if self.on_history is not None:
            for user_id in erased:
                self.on_history(user_id, None)
            for user_id, user in pending.items():
                self.on_history(user_id, user.update.history)
        users = list(pending.values())
        result.users = len(users)
        if users:
            users, answers, strategies = self._recommend_each(users, sources, result)
            generated_at = datetime.now(UTC)
            now_ms = self.clock() * 1000.0
            for user, answer, strategy in zip(users, answers, strategies, strict=True):
                rec = self.message(
                    user, answer, generated_at=generated_at, now_ms=now_ms, strategy=strategy
                )
                try:
                    self.producer.produce(
                        self.topics.recommendations,
                        key=rec.user_id.encode(),
                        value=rec.model_dump_json().encode(),
                        on_acked=partial(self._acked, user.source_ts_ms),
                    )
                except RecordRefusedError as exc:  # too large, say: the updates go to dead-letter
                    rejection = refused(exc, "recommendation")
                    self._reject_user(sources.get(rec.user_id, []), rejection, result)
                    continue
                result.recommendations.append(rec)
                if answer.rules_fell_back:
                    self.metrics.rule_fallbacks.labels(RULES_STAGE).inc()
        self.producer.end()
        result.published = len(result.recommendations)
        self.metrics.recommendations_published.inc(result.published)
        self._maybe_commit()
        self._lag.maybe_report()
        return result

    def _model_fields(self) -> dict[str, Any]:
        """What a published list says ranked it (encoder, vectors, strategy)."""
        return {
            "model_name": self.encoder.name,
            "model_version": self.encoder.version,
            "vectors_version": self.store.model.version if self.store.model else None,
            "strategy": self.strategy,
        }

    def trending(self) -> list[RecommendedItem]:
        """The answer to a user with no usable history, now: `recommend` for an empty one."""
        return self._answers([[]])[0].items

    def _acked(self, source_ts_ms: int) -> None:
        # Observed once acknowledged by the broker, the latency a subscriber can actually see
        # (served by the next `settle`: at most one loop iteration late).
        self.metrics.event_to_recommendation_seconds.observe(
            max(0.0, self.clock() * 1000.0 - source_ts_ms) / 1000.0
        )

    def _maybe_commit(self, *, force: bool = False) -> None:
        """Commit the acknowledged batches' offsets when due (every `commit_interval_ms`)."""
        now = time.monotonic()
        if force or now >= self._next_commit:
            self.producer.settle()
            offsets = self.commit_retry.take()
            for key, offset in self.producer.take_committable().items():
                offsets[key] = max(offsets.get(key, -1), offset)
            if offsets:
                commit_offsets(self.consumer, offsets)
                self._next_commit = now + self.settings.commit_interval_ms / 1000.0

    def run(self, stop_event: threading.Event) -> None:
        """Loop until `stop_event` is set; the caller closes consumers, producer and store.

        A broker outage is waited out: consuming returns nothing, answers wait for their
        acknowledgements (their offsets stay uncommitted), and librdkafka reconnects and
        rejoins the group by itself once the broker is back."""
        self.producer.stop = stop_event
        self.catch_up_related()
        logger.info(
            "recommender started topic=%s strategy=%s", self.topics.profile_updates, self.strategy
        )
        total = 0
        while not stop_event.is_set():
            total += self.poll_once().records
            self.watch.beat()
        # Answers acknowledged within the stop's share of the grace period have their offsets
        # committed; the rest are redone after the restart.
        remaining = self.producer.flush(self.stop_flush_s)
        self._maybe_commit(force=True)
        logger.info("recommender stopped records=%d unacknowledged=%d", total, remaining)
