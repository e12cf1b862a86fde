"""The whole relata pipeline on one machine, for the demo and the benchmark.

`Pipeline` starts (or connects to) Kafka, creates the topics under a run-unique prefix,
publishes the catalog, starts the stream processor (`relata streams`, its roles `profiles`
and `associations` as two processes) and the encoder workers (`relata workers --role all`)
as subprocesses in their own process groups, waits until they
are ready, and tears everything down on exit, Ctrl-C or error. Subprocesses (rather than
threads) give each stage its own interpreter and GIL on a small machine, and let the benchmark
measure each one's CPU and RSS. A `RecommendationProbe` records event→recommendation latency.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import orjson
from confluent_kafka import KafkaException

from relata.runtime.latency import LatencySeries
from relata.runtime.replay import (
    CatalogReport,
    ReplayProgress,
    iter_jsonl,
    make_consumer,
    make_producer,
    publish_catalog,
    replay_events,
)
from schemas.settings import KafkaSettings, StreamsSettings
from schemas.topics import (
    ALL_TOPICS,
    BEHAVIOR_EVENTS,
    DEAD_LETTER,
    ITEM_CATALOG,
    PROFILE_UPDATES,
    RECOMMENDATIONS,
)
from streams.app import association_input_topic, events_group, faust_app_id

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO_ROOT / "data" / "online-retail"
_PR_SET_PDEATHSIG = 1
_STOP_TIMEOUT_S = 20.0
CANARY_PREFIX = "relata-canary-"


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
# agent's outputs was up to 4 requests per topic (the broker ~43 -> ~37 % of a core at
# 500 events/s; README, Speed). RELATA_KAFKA_PARTITIONS (or --kafka-partitions) overrides it.
PIPELINE_PARTITIONS = 1


def pipeline_partitions(kafka: KafkaSettings) -> int:
    """Partitions of the pipeline's topics: the configured number when one was set, else
    PIPELINE_PARTITIONS (KafkaSettings' default, 4, is for deployments that scale out)."""
    return kafka.partitions if "partitions" in kafka.model_fields_set else PIPELINE_PARTITIONS


class PipelineError(RuntimeError):
    """The pipeline could not be started, or one of its processes died."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


# The child asks the kernel for SIGKILL when its parent dies (even by SIGKILL), then checks
# that the parent is still the one that started it (it may have died before the prctl). Done
# after exec, in the child's own interpreter: a preexec_fn in a process that runs librdkafka
# threads is not fork-safe. SIGKILL, not SIGTERM: without its parent the broker is going too,
# and a Faust worker told to stop gracefully then waits forever for a commit to a dead broker.
_CHILD_BOOT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl({pdeathsig}, signal.SIGKILL, 0, 0, 0)\n"
    "if os.getppid() != {parent}: sys.exit(1)\n"
    "os.nice({nice})\n"
    "from relata.cli.main import main\n"
    "main(prog_name='relata')\n"
)


@dataclass
class ManagedProcess:
    """A relata sub-command running in its own process group, its output in a log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    log_handle: IO[bytes]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, limit: int = 3000) -> str:
        try:
            return self.log_path.read_bytes()[-limit:].decode("utf-8", errors="replace")
        except OSError:
            return ""

    def first_errors(self, limit: int = 40) -> str:
        """The first traceback or ERROR/CRITICAL lines of the log (the cause, not the teardown)."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        for index, line in enumerate(lines):
            if line.startswith("Traceback") or " ERROR " in line or " CRITICAL " in line:
                return "\n".join(lines[index : index + limit])
        return ""

    def check(self) -> None:
        """Raise PipelineError (with the first errors and the log tail) when it has exited."""
        code = self.popen.poll()
        if code is not None:
            msg = (
                f"{self.name} exited with status {code}; log {self.log_path}\n"
                f"first errors:\n{self.first_errors()}\nlog tail:\n{self.log_tail(1500)}"
            )
            raise PipelineError(msg)

    def stop(self, timeout_s: float = _STOP_TIMEOUT_S) -> None:
        """SIGTERM the whole process group, then SIGKILL what is left after `timeout_s`."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("process did not stop name=%s pid=%d; killing", self.name, self.pid)
        # The group may hold children of the leader even after the leader exited.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        self.log_handle.close()


def start_relata(
    name: str, args: list[str], *, env: dict[str, str], log_dir: Path, nice: int = 0
) -> ManagedProcess:
    """Start `relata ARGS` with this interpreter, in a new session (process group); `nice`
    lowers its CPU priority by that much (off-latency-path work on a small machine)."""
    log_path = log_dir / f"{name}.log"
    handle = log_path.open("wb")
    boot = _CHILD_BOOT.format(pdeathsig=_PR_SET_PDEATHSIG, parent=os.getpid(), nice=int(nice))
    cmd = [sys.executable, "-c", boot, *args]
    popen = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=handle,
        stderr=subprocess.STDOUT,
        cwd=REPO_ROOT,
        env=env,
        start_new_session=True,
    )
    logger.info("started name=%s pid=%d log=%s", name, popen.pid, log_path)
    return ManagedProcess(name, popen, log_path, handle)


# ---------------------------------------------------------------------------------------------
# Observing the pipeline from outside: latency probe, lag, metrics


@dataclass
class ProbeStats:
    recommendations: int = 0
    dead_letters: Counter[str] = field(default_factory=Counter)


class RecommendationProbe:
    """Consumes `recommendations`, `profile-updates` and `dead-letter`; records
    event→recommendation latency and the stream processor's share of it.

    Two measures: `reported` is the message's own `latency_ms` (the recommender's clock);
    `measured` is this probe's consume time minus the send time of the oldest triggering
    event that the replay recorded (independent of the pipeline's own accounting).
    `profile_stage` is the same clock for profile updates: event → profile update consumed,
    the stream processor's part (batch window, fold, acknowledgement, two broker hops).
    """

    def __init__(self, kafka: KafkaSettings, *, sent_at: MutableMapping[str, float]) -> None:
        self._kafka = kafka
        self._sent_at = sent_at
        self.reported = LatencySeries()
        self.measured = LatencySeries()
        self.profile_stage = LatencySeries()
        self.stats = ProbeStats()
        self.latest: dict[str, dict[str, Any]] = {}
        self.recent_users: deque[str] = deque(maxlen=50)
        self.last_record_at = 0.0
        self.canaries = 0
        self._stop = threading.Event()
        self._consumer = make_consumer(kafka)
        self._assign_both()
        self._thread = threading.Thread(target=self._run, name="relata-probe", daemon=True)

    def _assign_both(self) -> None:
        from confluent_kafka import OFFSET_BEGINNING, TopicPartition

        partitions = []
        for spec in (RECOMMENDATIONS, PROFILE_UPDATES, DEAD_LETTER):
            topic = self._kafka.topic(spec.name)
            meta = self._consumer.list_topics(topic, timeout=10)
            partitions += [
                TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.topics[topic].partitions
            ]
        self._consumer.assign(partitions)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._consumer.close()

    def _run(self) -> None:
        rec_topic = self._kafka.topic(RECOMMENDATIONS.name)
        update_topic = self._kafka.topic(PROFILE_UPDATES.name)
        while not self._stop.is_set():
            # poll() returns as soon as one record is there (consume(n) waits for n or timeout).
            msg = self._consumer.poll(0.1)
            if msg is None or msg.error() is not None or msg.value() is None:
                continue
            now = time.time()
            self.last_record_at = now
            if msg.topic() == rec_topic:
                self._on_recommendation(msg.value(), now)
            elif msg.topic() == update_topic:
                self._on_profile_update(msg.value(), now)
            else:
                self._on_dead_letter(msg.value())

    @staticmethod
    def _parsed(raw: bytes, what: str) -> dict[str, Any] | None:
        try:
            record = orjson.loads(raw)
        except orjson.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            logger.warning("unparsable %s", what)
            return None
        return record

    def _on_recommendation(self, raw: bytes, now: float) -> None:
        rec = self._parsed(raw, "recommendation on the output topic")
        if rec is None:
            return
        user = rec.get("user_id")
        if isinstance(user, str) and user.startswith(CANARY_PREFIX):
            self.canaries += 1
            return
        self.stats.recommendations += 1
        reported = rec.get("latency_ms")
        if isinstance(reported, int | float):
            self.reported.add(now, float(reported))
        first = self._first_sent(rec)
        if first is not None:
            self.measured.add(now, (now - first) * 1000)
        if isinstance(user, str):
            self.latest[user] = rec
            self.recent_users.append(user)

    def _first_sent(self, record: dict[str, Any]) -> float | None:
        ids = record.get("trigger_event_ids", [])
        sent = [self._sent_at[e] for e in ids if e in self._sent_at]
        return min(sent) if sent else None

    def _on_profile_update(self, raw: bytes, now: float) -> None:
        update = self._parsed(raw, "profile update")
        if update is None:
            return
        first = self._first_sent(update)
        if first is not None:
            self.profile_stage.add(now, (now - first) * 1000)

    def _on_dead_letter(self, raw: bytes) -> None:
        try:
            error_type = str(json.loads(raw).get("error_type", "unknown"))
        except (json.JSONDecodeError, AttributeError):
            error_type = "unknown"
        self.stats.dead_letters[error_type] += 1


class LagMonitor:
    """Consumer-group lag (end offset − committed offset, summed over partitions).

    Committed offsets are read by a consumer per group that never joins it (OffsetFetch only).
    librdkafka's AdminClient group calls (list offsets / describe groups) crashed the process
    (SIGSEGV in rdk:main, librdkafka 2.16) while a group was coordinating; this path does not.

    A sample costs the broker one ListOffsets and one OffsetFetch request per topic: partitions
    are looked up once per topic (the pipeline's topics are created with their partitions), and
    the end offsets of all of a topic's partitions come in one request (`offsets_for_times` at
    OFFSET_END), not one watermark query per partition. Sampled every second, the per-partition
    queries and metadata lookups were ~30 broker requests a second, a fifth of the idle
    broker's.
    """

    def __init__(self, kafka: KafkaSettings) -> None:
        self._kafka = kafka
        self._consumer = make_consumer(kafka)
        self._group_consumers: dict[str, Any] = {}
        self._partition_ids: dict[str, list[int]] = {}

    def _partitions(self, topic: str) -> list[int]:
        found = self._partition_ids.get(topic)
        if found is None:
            meta = self._consumer.list_topics(topic, timeout=10)
            found = sorted(meta.topics[topic].partitions)
            if found:  # an unknown topic lists none: look again next time
                self._partition_ids[topic] = found
        return found

    def end_offsets(self, topic: str) -> dict[int, int]:
        from confluent_kafka import OFFSET_END, TopicPartition

        wanted = [TopicPartition(topic, p, OFFSET_END) for p in self._partitions(topic)]
        if not wanted:
            return {}
        return {
            tp.partition: tp.offset
            for tp in self._consumer.offsets_for_times(wanted, timeout=10)
            if tp.error is None and tp.offset >= 0
        }

    def committed(self, group: str, topic: str) -> dict[int, int]:
        from confluent_kafka import TopicPartition

        consumer = self._group_consumers.get(group)
        if consumer is None:
            consumer = make_consumer(self._kafka, group_id=group)
            self._group_consumers[group] = consumer
        wanted = [TopicPartition(topic, p) for p in self._partitions(topic)]
        return {
            tp.partition: tp.offset
            for tp in consumer.committed(wanted, timeout=10)
            if tp.offset >= 0
        }

    def lag(self, group: str, topic: str) -> int:
        ends = self.end_offsets(topic)
        done = self.committed(group, topic)
        return sum(max(0, end - done.get(p, 0)) for p, end in ends.items())

    def close(self) -> None:
        for consumer in [self._consumer, *self._group_consumers.values()]:
            with contextlib.suppress(Exception):
                consumer.close()


def scrape_metrics(url: str, *, timeout_s: float = 2.0) -> dict[str, float]:
    """Prometheus text exposition at `url` as {"name{labels}": value}; {} when unreachable."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            text = response.read().decode("utf-8", errors="replace")
    except (urllib.error.URLError, OSError, TimeoutError):
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            out[name] = float(value)
    return out


# ---------------------------------------------------------------------------------------------
# The pipeline


@dataclass
class PipelineOptions:
    """How to run the pipeline. `kafka=None`: an embedded broker."""

    data_dir: Path = DEFAULT_DATA
    kafka: KafkaSettings | None = None
    partitions: int = PIPELINE_PARTITIONS
    ready_timeout_s: float = 600.0
    extra_env: dict[str, str] = field(default_factory=dict)
    keep_workdir: bool = False


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
        self.streams_port = free_port()
        self.associations_port = free_port()
        self.indexer_metrics_port = free_port()
        self.recommender_metrics_port = free_port()
        self.streams_app_id = f"relata-streams-{self.run_id}"
        self.indexer_group = f"relata-indexer-{self.run_id}"
        self.recommender_group = f"relata-recommender-{self.run_id}"

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
        base = given or KafkaSettings()
        self.kafka = base.model_copy(
            update={
                "bootstrap_servers": bootstrap,
                "topic_prefix": f"{base.topic_prefix}relata-{self.run_id}.",
                "partitions": self.options.partitions,
            }
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
        self.processes["workers"] = start_relata(
            "workers", ["workers", "--role", "all"], env=env, log_dir=log_dir
        )
        # The two stream-processor roles in their own processes, as deployed (deploy/k8s).
        self.processes["streams"] = start_relata(
            "streams", ["streams", "--no-similar"], env=env, log_dir=log_dir
        )
        self.processes["associations"] = start_relata(
            "associations",
            ["streams", "--no-similar"],
            env=env
            | {
                "RELATA_STREAMS_ROLE": "associations",
                "RELATA_STREAMS_WEB_PORT": str(self.associations_port),
                "RELATA_STREAMS_DATA_DIR": str(self.workdir / "associations"),
            },
            log_dir=log_dir,
            nice=ASSOCIATIONS_NICE,
        )
        self.lag = LagMonitor(self.kafka)
        self.probe = RecommendationProbe(self.kafka, sent_at=self.sent_at)
        self.probe.start()
        self._wait_ready(say)

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
                "RELATA_KAFKA_SECURITY_PROTOCOL": kafka.security_protocol,
                "RELATA_STREAMS_APP_ID": self.streams_app_id,
                "RELATA_STREAMS_ROLE": "profiles",
                "RELATA_STREAMS_DATA_DIR": str(self.workdir / "streams"),
                "RELATA_STREAMS_WEB_PORT": str(self.streams_port),
                "RELATA_STORE_PATH": str(self.workdir / "qdrant"),
                "RELATA_INDEXER_GROUP_ID": self.indexer_group,
                "RELATA_INDEXER_METRICS_PORT": str(self.indexer_metrics_port),
                "RELATA_RECOMMENDER_GROUP_ID": self.recommender_group,
                "RELATA_RECOMMENDER_METRICS_PORT": str(self.recommender_metrics_port),
            }
        )
        env.update(self.options.extra_env)
        return env

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
            pending["indexer"] = self.lag.lag(self.indexer_group, catalog_topic) > 0 or not (
                self.lag.committed(self.indexer_group, catalog_topic)
            )
        if pending["streams"]:
            pending["streams"] = not self._healthy(self.streams_port)
        if pending["associations"]:
            pending["associations"] = not self._healthy(self.associations_port)
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
        """Lag of the stream processor on events and on association inputs, and of the
        recommender on profile updates."""
        assert self.kafka is not None and self.lag is not None
        return {
            "streams": self.lag.lag(self._streams_group, self.kafka.topic(BEHAVIOR_EVENTS.name)),
            "associations": self.lag.lag(self._associations_group, self._association_input),
            "recommender": self.lag.lag(
                self.recommender_group, self.kafka.topic(PROFILE_UPDATES.name)
            ),
        }

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
