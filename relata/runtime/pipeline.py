"""The whole relata pipeline on one machine, for the demo and the benchmark.

`Pipeline` starts (or connects to) Kafka, creates the topics under a run-unique prefix,
publishes the catalog, starts the stream processor (`relata streams`, its roles `profiles`
and `associations` as two processes) and the encoder workers (`relata workers --role all`)
as subprocesses in their own process groups (optionally a shadow recommender in the workers
and live quality, `relata workers --role quality`, as the demo runs them), waits until they
are ready, and tears everything down on exit, Ctrl-C or error. Subprocesses (rather than
threads) give each stage its own interpreter and GIL on a small machine, and let the benchmark
measure each one's CPU and RSS. A `RecommendationProbe` records event→recommendation latency.
The processes are supervised by `relata.runtime.supervision`, observed by
`relata.runtime.probes`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from confluent_kafka import KafkaException
from pydantic import SecretStr

from relata.runtime.kafka_broker import free_ports
from relata.runtime.probes import (
    CANARY_PREFIX,
    LagMonitor,
    RecommendationProbe,
    live_quality,
    scrape_metrics,
)
from relata.runtime.replay import (
    CatalogReport,
    ReplayProgress,
    iter_jsonl,
    make_producer,
    publish_catalog,
    replay_events,
)
from relata.runtime.supervision import REPO_ROOT, ManagedProcess, PipelineError, start_relata
from schemas.access import Access, Component, component_access
from schemas.quality_settings import QualitySettings
from schemas.settings import IndexerSettings, KafkaSettings, RecommenderSettings, StreamsSettings
from schemas.topics import (
    ALL_TOPICS,
    BEHAVIOR_EVENTS,
    ITEM_CATALOG,
    PROFILE_UPDATES,
)
from streams.naming import association_input_topic, events_group, faust_app_id
from workers.model_identity import encoder_settings_of, encoder_version, version_group

logger = logging.getLogger(__name__)

DEFAULT_DATA = REPO_ROOT / "data" / "online-retail"


def canary_ts(events_path: Path) -> str:
    """The canary's event time: that of the data set's first event (a replay's clock), or now.

    Association statistics decay against the latest event time they have seen; a canary
    stamped with the wall clock, ahead of a replayed data set's years-old events, aged every
    replayed co-occurrence to nothing (2^-60 for online-retail at a 90-day half-life), so no
    related list was published and no recommendation carried association evidence.
    """
    first = next(iter(iter_jsonl(events_path)), None) if events_path.exists() else None
    if first is not None:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            return str(json.loads(first[1])["ts"])
    return datetime.now(UTC).isoformat()


# The association statistics are off the latency path (related-items are republished every
# second): on one small machine they yield the CPU to the profile agent, the recommender and the
# broker. Deployed, each role has its own pod and CPU request instead (deploy/k8s).
ASSOCIATIONS_NICE = 10

# One instance of each stage runs here, so its topics get one partition each: librdkafka sends a
# produce request per partition that has records, so with 4 partitions a batch of the profile
# agent's outputs would be up to 4 requests per topic, broker CPU for nothing on one machine.
# RELATA_KAFKA_PARTITIONS (or --kafka-partitions) overrides it.
PIPELINE_PARTITIONS = 1


def pipeline_partitions(kafka: KafkaSettings) -> int:
    """Partitions of the pipeline's topics: the configured number when one was set, else
    PIPELINE_PARTITIONS (KafkaSettings' default, 4, is for deployments that scale out)."""
    return kafka.partitions if "partitions" in kafka.model_fields_set else PIPELINE_PARTITIONS


def security_env(kafka: KafkaSettings) -> dict[str, str]:
    """The `RELATA_KAFKA_*` security settings of `kafka` (protocol, SASL, TLS files), for the
    pipeline's processes: they talk to the broker as the driver does, unless told otherwise."""
    values = {
        "SECURITY_PROTOCOL": kafka.security_protocol,
        "SASL_MECHANISM": kafka.sasl_mechanism,
        "SASL_USERNAME": kafka.sasl_username,
        "SASL_PASSWORD": kafka.sasl_password,
        "SSL_CAFILE": kafka.ssl_cafile,
        "SSL_CERTFILE": kafka.ssl_certfile,
        "SSL_KEYFILE": kafka.ssl_keyfile,
        "SSL_KEY_PASSWORD": kafka.ssl_key_password,
    }
    return {
        f"RELATA_KAFKA_{name}": (
            value.get_secret_value() if isinstance(value, SecretStr) else str(value)
        )
        for name, value in values.items()
        if value is not None
    }


@dataclass
class PipelineOptions:
    """How to run the pipeline. `kafka=None`: an embedded broker."""

    data_dir: Path = DEFAULT_DATA
    kafka: KafkaSettings | None = None
    partitions: int = PIPELINE_PARTITIONS
    ready_timeout_s: float = 600.0
    extra_env: dict[str, str] = field(default_factory=dict)
    # Per process ("workers", "streams", "associations"), on top of extra_env: e.g. each
    # component's own credentials on a broker with ACLs per component.
    process_env: dict[str, dict[str, str]] = field(default_factory=dict)
    keep_workdir: bool = False
    # A shadow recommender beside the live one (RELATA_SHADOW_OVERRIDES; None: none), and live
    # quality judging both: the demo's, not the benchmark's (they cost CPU).
    shadow_overrides: dict[str, Any] | None = None
    quality: bool = False


class Pipeline:
    """The running pipeline; use as a context manager. See the module docstring."""

    def __init__(self, options: PipelineOptions) -> None:
        self.options = options
        self.run_id = uuid.uuid4().hex[:8]
        self.workdir = Path(tempfile.mkdtemp(prefix=f"relata-pipeline-{self.run_id}-"))
        self._embedded: Any = None
        self.kafka: KafkaSettings | None = None
        self.processes: dict[str, ManagedProcess] = {}
        self.sent_at: dict[str, float] = {}
        self.probe: RecommendationProbe | None = None
        self.lag: LagMonitor | None = None
        self.catalog: CatalogReport | None = None
        self._canary_sent_at: float | None = None
        self._event_producer: Any = None
        self._streams_group = self._associations_group = self._association_input = ""
        (
            self.streams_port,
            self.associations_port,
            self.indexer_metrics_port,
            self.recommender_metrics_port,
            self.quality_metrics_port,
        ) = free_ports(5)
        self.streams_app_id = f"relata-streams-{self.run_id}"
        self.indexer_group = f"relata-indexer-{self.run_id}"
        self._indexer_version_group: str | None = None
        self.recommender_group = f"relata-recommender-{self.run_id}"
        self.quality_group = f"relata-quality-{self.run_id}"

    # -- lifecycle

    def __enter__(self) -> Pipeline:
        try:
            self.start()
        except Exception:
            self.close(keep_logs=True)
            raise
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(keep_logs=exc_type is not None and exc_type is not KeyboardInterrupt)

    def start(self, *, status: Callable[[str], None] | None = None) -> None:
        say = status or (lambda text: logger.info("%s", text))
        given = self.options.kafka
        if given is not None and "bootstrap_servers" in given.model_fields_set:
            bootstrap = given.bootstrap_servers
            say(f"using Kafka at {bootstrap}")
        else:
            from relata.runtime.kafka_broker import EmbeddedKafka

            say("starting embedded Kafka")
            self._embedded = EmbeddedKafka()
            self._embedded.start()
            bootstrap = self._embedded.bootstrap_servers
        self.kafka = self._run_settings(given or KafkaSettings()).model_copy(
            update={"bootstrap_servers": bootstrap, "partitions": self.options.partitions}
        )
        # The stream-processor roles' consumer groups (their Faust app ids) and the
        # association agent's input topic, as streams/app.py names them.
        profiles = StreamsSettings(app_id=self.streams_app_id, role="profiles")
        associations = profiles.model_copy(update={"role": "associations"})
        self._streams_group = events_group(self.kafka, profiles)
        self._associations_group = faust_app_id(self.kafka, associations)
        self._association_input = association_input_topic(self.kafka, associations)
        from relata.runtime.topics import ensure_topics

        ensure_topics(self.kafka, ALL_TOPICS)
        say("publishing the catalog")
        self.catalog = publish_catalog(
            iter_jsonl(self.options.data_dir / "items.jsonl.gz"),
            producer=make_producer(self.kafka),
            topic=self.kafka.topic(ITEM_CATALOG.name),
        )
        say(f"catalog: {self.catalog.published} items, {self.catalog.invalid} invalid lines")
        env = self._child_env()
        log_dir = self.workdir / "logs"
        log_dir.mkdir()
        say("starting workers (indexer + recommender) and the stream processor")
        own = self.options.process_env
        self.processes["workers"] = start_relata(
            "workers",
            ["workers", "--role", "all"],
            env=env | own.get("workers", {}),
            log_dir=log_dir,
        )
        # The two stream-processor roles in their own processes, as deployed (deploy/k8s).
        self.processes["streams"] = start_relata(
            "streams",
            ["streams", "--no-similar"],
            env=env | own.get("streams", {}),
            log_dir=log_dir,
        )
        self.processes["associations"] = start_relata(
            "associations",
            ["streams", "--no-similar"],
            env=env
            | {
                "RELATA_STREAMS_ROLE": "associations",
                "RELATA_STREAMS_WEB_PORT": str(self.associations_port),
                "RELATA_STREAMS_DATA_DIR": str(self.workdir / "associations"),
            }
            | own.get("associations", {}),
            log_dir=log_dir,
            nice=ASSOCIATIONS_NICE,
        )
        if self.options.quality:
            self.processes["quality"] = start_relata(
                "quality",
                ["workers", "--role", "quality"],
                env=env | own.get("quality", {}),
                log_dir=log_dir,
            )
        self.lag = LagMonitor(self.kafka)
        self.probe = RecommendationProbe(self.kafka, sent_at=self.sent_at)
        self.probe.start()
        self._wait_ready(say)

    def _run_settings(self, base: KafkaSettings) -> KafkaSettings:
        """`base` with this run's own topic prefix."""
        return base.model_copy(update={"topic_prefix": f"{base.topic_prefix}relata-{self.run_id}."})

    def component_access(self) -> dict[Component, Access]:
        """What each of this run's processes needs on a broker with ACLs: its topics (under the
        run's prefix), its groups and the stream processor's app id. Known before `start`."""
        return component_access(
            self._run_settings(self.options.kafka or KafkaSettings()),
            streams=StreamsSettings(app_id=self.streams_app_id),
            indexer=IndexerSettings(group_id=self.indexer_group),
            recommender=RecommenderSettings(group_id=self.recommender_group),
            quality=QualitySettings(group_id=self.quality_group),
        )

    def _child_env(self) -> dict[str, str]:
        assert self.kafka is not None
        # The user's RELATA_* settings (encoder device, batch sizes, SASL...) pass through; the
        # pipeline's own wiring (broker, prefix, groups, ports, dirs) overrides them.
        env = dict(os.environ)
        kafka = self.kafka
        env.update(
            {
                "RELATA_LOG_LEVEL": "INFO",
                "RELATA_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
                "RELATA_KAFKA_TOPIC_PREFIX": kafka.topic_prefix,
                "RELATA_KAFKA_PARTITIONS": str(kafka.partitions),
                **security_env(kafka),
                "RELATA_STREAMS_APP_ID": self.streams_app_id,
                "RELATA_STREAMS_ROLE": "profiles",
                "RELATA_STREAMS_DATA_DIR": str(self.workdir / "streams"),
                "RELATA_STREAMS_WEB_PORT": str(self.streams_port),
                "RELATA_STORE_PATH": str(self.workdir / "qdrant"),
                "RELATA_INDEXER_GROUP_ID": self.indexer_group,
                "RELATA_INDEXER_METRICS_PORT": str(self.indexer_metrics_port),
                "RELATA_RECOMMENDER_GROUP_ID": self.recommender_group,
                "RELATA_RECOMMENDER_METRICS_PORT": str(self.recommender_metrics_port),
                "RELATA_QUALITY_GROUP_ID": self.quality_group,
                "RELATA_QUALITY_METRICS_PORT": str(self.quality_metrics_port),
            }
        )
        if self.options.shadow_overrides is not None:
            env["RELATA_SHADOW_ENABLED"] = "true"
            env["RELATA_SHADOW_OVERRIDES"] = json.dumps(self.options.shadow_overrides)
        env.update(self.options.extra_env)
        return env

    def indexer_version_group(self) -> str:
        """The consumer group the workers' indexer commits under: the configured group of
        this run, per model version (the version of the encoder the workers will load)."""
        if self._indexer_version_group is None:
            env = self._child_env() if self.kafka is not None else dict(os.environ)
            self._indexer_version_group = version_group(
                self.indexer_group, encoder_version(encoder_settings_of(env))
            )
        return self._indexer_version_group

    def check_processes(self) -> None:
        for process in self.processes.values():
            process.check()

    def _wait_ready(self, say: Callable[[str], None]) -> None:
        assert self.kafka is not None and self.lag is not None
        deadline = time.monotonic() + self.options.ready_timeout_s
        catalog_topic = self.kafka.topic(ITEM_CATALOG.name)
        # canary: one synthetic event whose recommendation proves every stage is assigned
        # and live, so the measured events do not include consumer-group joins.
        pending = {"indexer": True, "streams": True, "associations": True, "canary": True}
        pending["quality"] = self.options.quality
        last_note = 0.0
        while any(pending.values()):
            self.check_processes()
            try:
                self._check_ready(pending, catalog_topic)
            except KafkaException as exc:  # coordinator loading, group not there yet: retry
                logger.debug("readiness check failed, retrying error=%s", exc)
            if time.monotonic() > deadline:
                waiting = ", ".join(name for name, wait in pending.items() if wait)
                msg = (
                    f"pipeline not ready after {self.options.ready_timeout_s:.0f} s "
                    f"(waiting for {waiting}); logs in {self.workdir / 'logs'}"
                )
                raise PipelineError(msg)
            if time.monotonic() - last_note > 10:
                last_note = time.monotonic()
                waiting = ", ".join(name for name, wait in pending.items() if wait)
                if waiting:
                    say(f"waiting for {waiting}")
            time.sleep(0.5)
        say("pipeline ready")

    def _check_ready(self, pending: dict[str, bool], catalog_topic: str) -> None:
        assert self.lag is not None
        if pending["indexer"]:
            group = self.indexer_version_group()
            pending["indexer"] = self.lag.lag(group, catalog_topic) > 0 or not (
                self.lag.committed(group, catalog_topic)
            )
        if pending["streams"]:
            pending["streams"] = not self._healthy(self.streams_port)
        if pending["associations"]:
            pending["associations"] = not self._healthy(self.associations_port)
        if pending["quality"]:
            pending["quality"] = not self._healthy(self.quality_metrics_port)
        started = not any(wait for name, wait in pending.items() if name != "canary")
        if started and pending["canary"]:
            pending["canary"] = not self._canary_answered()

    def _canary_answered(self) -> bool:
        assert self.kafka is not None and self.probe is not None and self.catalog is not None
        if self._canary_sent_at is None or time.monotonic() - self._canary_sent_at > 30:
            item = next(iter(iter_jsonl(self.options.data_dir / "items.jsonl.gz")))[1]
            event = {
                "event_id": f"{CANARY_PREFIX}{uuid.uuid4().hex[:8]}",
                "user_id": f"{CANARY_PREFIX}{self.run_id}",
                "item_id": json.loads(item)["item_id"],
                "event_type": "view",
                "ts": canary_ts(self.events_path),
            }
            producer = self.event_producer()
            producer.produce(
                self.kafka.topic(BEHAVIOR_EVENTS.name),
                key=event["user_id"].encode(),
                value=json.dumps(event).encode(),
            )
            producer.flush(10)
            self._canary_sent_at = time.monotonic()
        return self.probe.canaries > 0

    def event_producer(self) -> Any:
        """The one producer of behaviour events (the canary, then every replay).

        Long-lived like a production client's: connected, with its idempotence id, before the
        first measured event. A new producer per replay made the first events of every
        benchmark phase wait ~0.3-0.5 s for the connection and the id, which showed up as a
        stall in each phase's p99 and max.
        """
        assert self.kafka is not None
        if self._event_producer is None:
            self._event_producer = make_producer(self.kafka)
        return self._event_producer

    def _healthy(self, port: int) -> bool:
        url = f"http://127.0.0.1:{port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError, TimeoutError):
            return False

    def close(self, *, keep_logs: bool = False) -> None:
        """Stop everything this pipeline started; safe to call twice.

        `keep_logs` keeps the work directory (the processes' logs) for a post-mortem. A second
        Ctrl-C during teardown is ignored, so that teardown always completes.
        """
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main else None
        try:
            self._close(keep_logs=keep_logs)
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    def _close(self, *, keep_logs: bool) -> None:
        self._event_producer = None
        if self.probe is not None:
            with contextlib.suppress(Exception):
                self.probe.stop()
            self.probe = None
        if self.lag is not None:
            with contextlib.suppress(Exception):
                self.lag.close()
            self.lag = None
        for process in reversed(list(self.processes.values())):
            process.stop()
        self.processes.clear()
        if self._embedded is not None:
            self._embedded.stop()
            self._embedded = None
        if keep_logs or self.options.keep_workdir:
            logger.warning("pipeline work directory kept: %s", self.workdir)
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- driving and observing

    @property
    def events_path(self) -> Path:
        return self.options.data_dir / "events.jsonl.gz"

    def replay(
        self,
        *,
        rate: float,
        limit: int | None,
        on_progress: Callable[[ReplayProgress], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        lines: Iterable[tuple[int, bytes]] | None = None,
    ) -> ReplayProgress:
        """Replay the data set's events (or the given raw `lines`) into behavior-events."""
        assert self.kafka is not None
        return replay_events(
            lines if lines is not None else iter_jsonl(self.events_path),
            producer=self.event_producer(),
            topic=self.kafka.topic(BEHAVIOR_EVENTS.name),
            rate=rate,
            limit=limit,
            on_progress=on_progress,
            sent_at=self.sent_at,
            should_stop=should_stop,
        )

    def lags(self) -> dict[str, int]:
        """Lag of the stream processor on events and on association inputs, of the
        recommender (and its shadow) on profile updates and of live quality on events."""
        assert self.kafka is not None and self.lag is not None
        events, updates = (
            self.kafka.topic(BEHAVIOR_EVENTS.name),
            self.kafka.topic(PROFILE_UPDATES.name),
        )
        lags = {
            "streams": self.lag.lag(self._streams_group, events),
            "associations": self.lag.lag(self._associations_group, self._association_input),
            "recommender": self.lag.lag(self.recommender_group, updates),
        }
        if self.options.shadow_overrides is not None:
            lags["shadow"] = self.lag.lag(f"{self.recommender_group}-shadow", updates)
        if self.options.quality:
            lags["quality"] = self.lag.lag(self.quality_group, events)
        return lags

    def live_quality(self) -> dict[str, dict[str, float | None]]:
        """Live quality's figures per variant so far ({} without it)."""
        if not self.options.quality:
            return {}
        return live_quality(scrape_metrics(f"http://127.0.0.1:{self.quality_metrics_port}/metrics"))

    def wait_drained(self, *, quiet_s: float = 3.0, timeout_s: float = 120.0) -> bool:
        """Wait until both consumer groups have no lag and no output arrived for `quiet_s`."""
        assert self.probe is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_processes()
            try:
                lags = self.lags()
            except KafkaException as exc:
                logger.debug("lag query failed, retrying error=%s", exc)
                time.sleep(0.5)
                continue
            quiet = time.time() - self.probe.last_record_at >= quiet_s
            if not any(lags.values()) and quiet:
                return True
            time.sleep(0.5)
        return False

    def metrics(self) -> dict[str, float]:
        """The workers' and the stream processor's Prometheus metrics, merged (the two
        stream-processor roles' series summed: each counts its own work)."""
        merged: dict[str, float] = {}
        # The indexer and the recommender share one process (and registry): take either's.
        for port in (self.indexer_metrics_port, self.recommender_metrics_port):
            for name, value in scrape_metrics(f"http://127.0.0.1:{port}/metrics").items():
                merged.setdefault(name, value)
        streams: dict[str, float] = {}
        for port in (self.streams_port, self.associations_port):
            for name, value in scrape_metrics(f"http://127.0.0.1:{port}/metrics").items():
                streams[name] = streams.get(name, 0.0) + value
        for name, value in streams.items():
            merged.setdefault(name, value)
        return merged

    def pids(self) -> dict[str, int]:
        """Process ids by role (plus the broker's when embedded)."""
        out = {name: proc.pid for name, proc in self.processes.items()}
        embedded = self._embedded
        if embedded is not None and embedded.pid is not None:
            out["kafka"] = embedded.pid
        out["driver"] = os.getpid()
        return out


@contextlib.contextmanager
def running_pipeline(
    options: PipelineOptions, *, status: Callable[[str], None] | None = None
) -> Iterator[Pipeline]:
    """Start a pipeline, yield it, and always tear it down."""
    pipeline = Pipeline(options)
    failed = False
    try:
        pipeline.start(status=status)
        yield pipeline
    except Exception:
        failed = True
        raise
    finally:
        pipeline.close(keep_logs=failed)
