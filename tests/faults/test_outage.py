"""Broker outages against the whole pipeline in real processes: the two stream-processor roles
and the workers (`relata.runtime.pipeline`), on an embedded broker with a data dir of its own.

One pipeline serves the module's tests, in order: the broker is paused (SIGSTOP of its JVM)
for longer than the acknowledgement and session timeouts in the middle of a replay, then
stopped and started again on the same data dir; then the association role and the workers
are frozen (SIGSTOP) past their group sessions while the broker goes on; and last SIGTERM
reaches every process while the broker is paused. After each outage every process must be
up, the stream drained within 30 s of the broker's (or the processes') return, every event
folded exactly once into its user's profile (the changelog's profiles equal an offline fold
of the same events), every user answered after their last event, and readiness must have
said not ready while the broker was away.

`pytest tests/faults -k outage` runs them (2 to 3 minutes on 2 shared cores).
"""

from __future__ import annotations

import gzip
import itertools
import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

from relata.runtime.kafka_broker import EmbeddedKafka
from relata.runtime.pipeline import Pipeline, PipelineOptions
from relata.runtime.replay import iter_jsonl
from schemas.messages import BehaviorEvent, ProfileUpdate, Recommendation, UserProfile
from schemas.settings import KafkaSettings, StreamsSettings
from schemas.topics import PROFILE_UPDATES, RECOMMENDATIONS
from streams.naming import profiles_changelog_topic
from streams.profile import FoldConfig, fold_event

pytestmark = pytest.mark.integration

SOURCE = Path(__file__).resolve().parents[2] / "data" / "online-retail"
EVENTS_PER_OUTAGE = 2400
RATE = 400.0  # events/s: a replay lasts 6 s, the outage starts 2 s into it
PAUSE_S = 12.0  # > the workers' 10 s session timeout, the streams' 3 s, the 3 s ack timeout
DOWN_S = 6.0
DRAIN_LIMIT_S = 30.0
GRACE_S = 5.0
# The processes' settings: short timeouts so the outages stay short.
ENV = {
    "RELATA_STREAMS_SESSION_TIMEOUT_S": "3",
    "RELATA_STREAMS_HEARTBEAT_INTERVAL_S": "0.5",
    "RELATA_STREAMS_ASSOC_BATCH_WINDOW_S": "1",
    "RELATA_ACK_TIMEOUT_S": "3",
    "RELATA_BROKER_CHECK_INTERVAL_S": "1",
    "RELATA_STALL_TIMEOUT_S": "60",
    # A workers' consumer still without partitions this long after losing them, while the
    # broker answers, is replaced (> a normal rejoin, well inside the 30 s drain limit).
    "RELATA_REJOIN_TIMEOUT_S": "8",
    "RELATA_SHUTDOWN_GRACE_S": str(GRACE_S),
    "RELATA_ENCODER_DEVICE": "cpu",
}


def _subset(directory: Path, events: int) -> list[bytes]:
    """The first `events` events of online-retail and the items they name, as a data dir."""
    lines = [raw for _, raw in itertools.islice(iter_jsonl(SOURCE / "events.jsonl.gz"), events)]
    items = {json.loads(raw)["item_id"] for raw in lines}
    catalog = [raw for _, raw in iter_jsonl(SOURCE / "items.jsonl.gz")]
    catalog = [raw for raw in catalog if json.loads(raw)["item_id"] in items]
    directory.mkdir(parents=True, exist_ok=True)
    with gzip.open(directory / "events.jsonl.gz", "wb") as fh:
        fh.write(b"\n".join(lines) + b"\n")
    with gzip.open(directory / "items.jsonl.gz", "wb") as fh:
        fh.write(b"\n".join(catalog) + b"\n")
    return lines


@dataclass
class Outputs:
    """Everything the pipeline published, read from the start on a thread of its own."""

    folded: set[str] = field(default_factory=set)  # event ids named by profile updates
    answered: set[str] = field(default_factory=set)  # event ids that triggered a recommendation
    recommendations: int = 0
    profiles: dict[str, bytes] = field(default_factory=dict)  # latest changelog value per user
    lock: threading.Lock = field(default_factory=threading.Lock)


class OutputReader:
    def __init__(self, kafka: KafkaSettings, changelog: str) -> None:
        self.outputs = Outputs()
        self._topics = {
            kafka.topic(PROFILE_UPDATES.name): self._update,
            kafka.topic(RECOMMENDATIONS.name): self._recommendation,
            changelog: self._profile,
        }
        self._consumer = Consumer(
            kafka.librdkafka_config("outage-test-reader")
            | {"group.id": "outage-test-reader", "enable.auto.commit": False, "log_level": 0}
        )
        partitions = []
        for topic in self._topics:
            metadata = self._consumer.list_topics(topic, timeout=30).topics[topic]
            partitions += [TopicPartition(topic, p, OFFSET_BEGINNING) for p in metadata.partitions]
        self._consumer.assign(partitions)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _update(self, key: bytes | None, value: bytes) -> None:
        self.outputs.folded.update(ProfileUpdate.model_validate_json(value).trigger_event_ids)

    def _recommendation(self, key: bytes | None, value: bytes) -> None:
        self.outputs.answered.update(Recommendation.model_validate_json(value).trigger_event_ids)
        self.outputs.recommendations += 1

    def _profile(self, key: bytes | None, value: bytes) -> None:
        if key is not None:
            self.outputs.profiles[json.loads(key)] = value

    def _run(self) -> None:
        while not self._stop.is_set():
            for message in self._consumer.consume(1000, timeout=0.2):
                if message.error() is None and message.value() is not None:
                    with self.outputs.lock:
                        self._topics[message.topic()](message.key(), message.value())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._consumer.close()


class ProbeSampler:
    """Polls each process's readiness and liveness every 0.3 s while it runs."""

    def __init__(self, ports: dict[str, int]) -> None:
        self.samples: list[tuple[float, str, str, int]] = []  # (time, process, probe, status)
        self._ports = ports
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, port in self._ports.items():
                for probe in ("readyz", "livez"):
                    status = 0
                    try:
                        url = f"http://127.0.0.1:{port}/{probe}"
                        with urllib.request.urlopen(url, timeout=2) as response:
                            status = response.status
                    except urllib.error.HTTPError as exc:
                        status = exc.code
                    except (urllib.error.URLError, OSError):
                        status = -1
                    self.samples.append((time.monotonic(), name, probe, status))
            self._stop.wait(0.3)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def seen(self, name: str, probe: str, start: float, end: float) -> set[int]:
        return {s for t, n, p, s in self.samples if n == name and p == probe and start <= t <= end}


@dataclass
class Rig:
    broker: EmbeddedKafka
    pipeline: Pipeline
    reader: OutputReader
    lines: list[bytes]
    replayed: list[bytes] = field(default_factory=list)

    @property
    def ports(self) -> dict[str, int]:
        p = self.pipeline
        return {
            "profiles": p.streams_port,
            "associations": p.associations_port,
            "workers": p.recommender_metrics_port,
        }

    def replay(self, count: int, *, rate: float = RATE) -> threading.Thread:
        """Replay the next `count` events on a thread (it outlives an outage)."""
        lines = self.lines[len(self.replayed) : len(self.replayed) + count]
        self.replayed += lines
        thread = threading.Thread(
            target=self.pipeline.replay,
            kwargs={"rate": rate, "limit": None, "lines": list(enumerate(lines))},
            daemon=True,
        )
        thread.start()
        return thread

    def drained(self) -> bool:
        """Every replayed event folded, every user answered after their last event, and no
        consumer group behind (the association role's included)."""
        last: dict[str, str] = {}
        for raw in self.replayed:
            event = json.loads(raw)
            last[event["user_id"]] = event["event_id"]
        ids = {json.loads(raw)["event_id"] for raw in self.replayed}
        with self.reader.outputs.lock:
            outputs = self.reader.outputs
            if not (ids <= outputs.folded and set(last.values()) <= outputs.answered):
                return False
        try:
            return not any(self.pipeline.lags().values())
        except KafkaException:  # the group coordinator is still loading after a restart
            return False

    def wait_drained(self, since: float) -> float:
        """Seconds from `since` until drained (fails after DRAIN_LIMIT_S)."""
        deadline = since + DRAIN_LIMIT_S
        while not self.drained():
            self.pipeline.check_processes()
            assert time.monotonic() < deadline, self._progress()
            time.sleep(0.1)
        return time.monotonic() - since

    def _progress(self) -> str:
        ids = {json.loads(raw)["event_id"] for raw in self.replayed}
        outputs = self.reader.outputs
        try:
            lags = str(self.pipeline.lags())
        except KafkaException as exc:
            lags = str(exc)
        return (
            f"not drained {DRAIN_LIMIT_S:.0f} s after the outage: "
            f"{len(ids - outputs.folded)} of {len(ids)} events not folded, "
            f"{outputs.recommendations} recommendations, lags {lags}; "
            f"logs in {self.pipeline.workdir}; their last warnings:\n{self._warnings()}"
        )

    def _warnings(self, per_process: int = 6) -> str:
        """Each process's last WARNING/ERROR lines (librdkafka's own lines left out), so that
        a failure on a machine whose logs are gone still says where each process stood."""
        out = []
        for name, process in self.pipeline.processes.items():
            lines = process.log_tail(200_000).splitlines()
            notable = [line for line in lines if " WARNING " in line or " ERROR " in line]
            out += [f"  {name}: {line[:300]}" for line in notable[-per_process:]]
        return "\n".join(out)

    def assert_profiles_exact(self) -> int:
        """The changelog's profiles equal an offline fold of every replayed event (each event
        folded exactly once: a lost one or a double fold would change the profile)."""
        config = FoldConfig.from_settings(StreamsSettings())
        expected: dict[str, UserProfile | None] = {}
        for raw in self.replayed:
            event = BehaviorEvent.model_validate_json(raw)
            expected[event.user_id] = fold_event(expected.get(event.user_id), event, config).profile
        deadline = time.monotonic() + 10  # the reader catches up with the changelog
        while True:
            with self.reader.outputs.lock:
                stored = {u: self.reader.outputs.profiles.get(u) for u in expected}
            actual = {
                u: None if v is None else UserProfile.model_validate_json(v)
                for u, v in stored.items()
            }
            wrong = [u for u in expected if actual[u] != expected[u]]
            if not wrong or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert not wrong, f"{len(wrong)} profiles differ from the offline fold, e.g. {wrong[0]}"
        return len(expected)

    def figures(self, what: str, **numbers: float | int) -> str:
        outputs = self.reader.outputs
        parts = [f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in numbers.items()]
        parts += [
            f"events={len(self.replayed)}",
            f"users={len({json.loads(r)['user_id'] for r in self.replayed})}",
            f"recommendations={outputs.recommendations}",
        ]
        return f"\n[outage] {what}: " + " ".join(parts)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Rig]:
    failed_before = request.session.testsfailed
    base = tmp_path_factory.mktemp("outage")
    lines = _subset(base / "data", 3 * EVENTS_PER_OUTAGE + 100)
    broker = EmbeddedKafka(data_dir=base / "kafka")
    broker.start()
    options = PipelineOptions(
        data_dir=base / "data",
        kafka=KafkaSettings(bootstrap_servers=broker.bootstrap_servers),
        partitions=4,
        ready_timeout_s=240,
        extra_env=ENV,
    )
    pipeline = Pipeline(options)
    reader: OutputReader | None = None
    try:
        pipeline.start()
        assert pipeline.kafka is not None
        streams = StreamsSettings(app_id=pipeline.streams_app_id, role="profiles")
        reader = OutputReader(pipeline.kafka, profiles_changelog_topic(pipeline.kafka, streams))
        yield Rig(broker, pipeline, reader, lines)
    finally:
        if broker.pid is not None:  # never leave it paused
            os.kill(broker.pid, signal.SIGCONT)
        if reader is not None:
            reader.close()
        # The processes' logs stay (their directory is named) when a test failed.
        pipeline.close(keep_logs=request.session.testsfailed > failed_before)
        broker.stop()


def _assert_not_ready_while_away(sampler: ProbeSampler, rig: Rig, start: float, end: float) -> None:
    for name in rig.ports:
        ready = sampler.seen(name, "readyz", start, end)
        assert 503 in ready, f"{name} never said not ready while the broker was away: {ready}"
        live = sampler.seen(name, "livez", start, end)
        assert live == {200}, f"{name} liveness during the outage: {live}"


def test_outage_broker_paused_mid_replay_is_waited_out(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    assert rig.broker.pid is not None
    sampler = ProbeSampler(rig.ports)
    replay = rig.replay(EVENTS_PER_OUTAGE)
    time.sleep(2.0)
    paused = time.monotonic()
    os.kill(rig.broker.pid, signal.SIGSTOP)
    try:
        time.sleep(PAUSE_S)
    finally:
        os.kill(rig.broker.pid, signal.SIGCONT)
    resumed = time.monotonic()
    replay.join(60)
    drained_s = rig.wait_drained(resumed)
    sampler.stop()
    rig.pipeline.check_processes()
    _assert_not_ready_while_away(sampler, rig, paused + 4, resumed)
    users = rig.assert_profiles_exact()
    with capsys.disabled():
        print(rig.figures("broker paused", paused_s=PAUSE_S, drained_s=drained_s, profiles=users))


def test_outage_broker_restarted_on_its_data_dir_is_waited_out(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    sampler = ProbeSampler(rig.ports)
    replay = rig.replay(EVENTS_PER_OUTAGE)
    time.sleep(2.0)
    stopped = time.monotonic()
    rig.broker.stop()
    time.sleep(DOWN_S)
    down = time.monotonic()
    rig.broker.start()
    back = time.monotonic()
    replay.join(60)
    drained_s = rig.wait_drained(back)
    sampler.stop()
    rig.pipeline.check_processes()
    _assert_not_ready_while_away(sampler, rig, stopped + 3, down)
    users = rig.assert_profiles_exact()
    with capsys.disabled():
        print(
            rig.figures(
                "broker restarted",
                down_s=back - stopped,
                drained_s=drained_s,
                profiles=users,
            )
        )


def test_outage_processes_frozen_past_their_sessions_rejoin_and_drain(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    """A process frozen longer than its group session (a long GC pause, a starved or
    suspended VM) is dropped from its groups while the broker goes on; thawed, it rejoins in
    place: the association role's Faust consumer restores its tables from their changelogs
    again, the workers' consumers get their partitions back."""
    frozen = [rig.pipeline.processes[name] for name in ("associations", "workers")]
    replay = rig.replay(EVENTS_PER_OUTAGE)
    time.sleep(2.0)
    for process in frozen:
        os.killpg(process.pid, signal.SIGSTOP)
    try:
        time.sleep(PAUSE_S)  # > the workers' 10 s session and the streams' 3 s
    finally:
        for process in frozen:
            os.killpg(process.pid, signal.SIGCONT)
    thawed = time.monotonic()
    replay.join(60)
    drained_s = rig.wait_drained(thawed)
    rig.pipeline.check_processes()
    users = rig.assert_profiles_exact()
    log = frozen[0].log_path.read_text(errors="replace")
    restores = log.count("Restoring state from changelog topics")
    assert restores >= 1, "the association role was not dropped from its group"
    with capsys.disabled():
        print(
            rig.figures(
                "processes frozen",
                frozen_s=PAUSE_S,
                drained_s=drained_s,
                restores=restores,
                profiles=users,
            )
        )


def test_outage_sigterm_while_the_broker_is_paused_stops_within_the_grace_period(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    assert rig.broker.pid is not None
    rig.replay(100, rate=0).join(60)  # work in flight when the broker goes
    os.kill(rig.broker.pid, signal.SIGSTOP)
    try:
        time.sleep(4.0)  # longer than the ack timeout: outputs wait, readiness is off
        started = time.monotonic()
        processes = list(rig.pipeline.processes.values())
        for process in processes:
            os.killpg(process.pid, signal.SIGTERM)
        took: dict[str, float] = {}
        codes: dict[str, int | None] = {}
        while len(took) < len(processes) and time.monotonic() - started < GRACE_S + 10:
            for process in processes:
                if process.name not in took and not process.alive():
                    took[process.name] = time.monotonic() - started
                    codes[process.name] = process.popen.returncode
            time.sleep(0.05)
    finally:
        os.kill(rig.broker.pid, signal.SIGCONT)
    rig.pipeline.processes.clear()  # stopped here; the fixture's teardown must not wait
    for process in processes:
        process.stop(timeout_s=1)
    with capsys.disabled():
        figures = " ".join(f"{n}={t:.1f}s(exit {codes[n]})" for n, t in sorted(took.items()))
        print(f"\n[outage] SIGTERM while paused: grace={GRACE_S:.0f}s {figures}")
    assert set(took) == {p.name for p in processes}, f"still running: {took}"
    # The grace period, plus the interpreter's own start of the exit.
    assert max(took.values()) <= GRACE_S + 2.0, took
