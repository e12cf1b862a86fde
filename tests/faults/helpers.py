"""What the kill -9 fault tests share: the processes under test, reading topics back, waiting
until drained, and a clean run of the same events through the pure cores to compare with."""

from __future__ import annotations

import contextlib
import gzip
import json
import math
import os
import signal
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import TopicPartition

from relata.runtime.kafka_broker import free_ports
from relata.runtime.probes import LagMonitor
from relata.runtime.replay import make_producer, replay_events
from relata.runtime.supervision import REPO_ROOT, ManagedProcess, start_relata
from relata.runtime.tail import make_consumer
from schemas.decoding import Rejection, decode
from schemas.messages import BehaviorEvent, DeadLetter, ProfileUpdate, UserProfile
from schemas.settings import KafkaSettings, StreamsSettings
from schemas.topics import BEHAVIOR_EVENTS, DEAD_LETTER, ITEM_CATALOG, PROFILE_UPDATES
from streams.association import AssociationConfig, AssociationInput
from streams.associations_agent import TOTALS_KEY
from streams.catalog import CatalogView
from streams.naming import (
    association_input_topic,
    events_group,
    faust_app_id,
    profiles_changelog_topic,
)
from streams.neighbours import AssociationIndex
from streams.profile import FoldConfig, fold_event
from workers.model_identity import encoder_settings_of, encoder_version, version_group

DATA = REPO_ROOT / "data" / "online-retail"
READY_S = 180.0
DRAIN_S = 180.0
REL_TOL = 1e-9

Records = list[tuple[int, bytes | None, bytes | None]]


def event_lines(count: int) -> list[tuple[int, bytes]]:
    """The data set's first `count` event lines, numbered from 1 (replayed verbatim)."""
    with gzip.open(DATA / "events.jsonl.gz", "rb") as f:
        return [(n, line.rstrip(b"\n")) for n, line in enumerate(islice(f, count), start=1)]


def catalog_lines() -> list[tuple[int, bytes]]:
    with gzip.open(DATA / "items.jsonl.gz", "rb") as f:
        return [(n, line.rstrip(b"\n")) for n, line in enumerate(f, start=1)]


class Roles:
    """The pipeline's processes as subprocesses (the stream processor's `profiles` and
    `associations` roles, optionally the encoder `workers`), and what observes them.

    `extra_env[name]` is added to that process's environment (short windows, rare commits).
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        workdir: Path,
        app_id: str,
        extra_env: dict[str, dict[str, str]] | None = None,
    ) -> None:
        self.kafka = kafka
        self.workdir = workdir
        self.app_id = app_id
        self.extra_env = extra_env or {}
        profiles = StreamsSettings(app_id=app_id, role="profiles")
        associations = profiles.model_copy(update={"role": "associations"})
        self.events_group = events_group(kafka, profiles)
        self.associations_group = faust_app_id(kafka, associations)
        self.association_input = association_input_topic(kafka, associations)
        self.profiles_changelog = profiles_changelog_topic(kafka, profiles)
        base = kafka.topic(app_id)
        self.associations_changelog = f"{base}-associations-changelog"
        self.totals_changelog = f"{base}-association-totals-changelog"
        self.indexer_group = f"{app_id}-indexer"
        # The indexer commits under its group per model version (of the encoder it loads);
        # computed once: the version hashes the model's weights.
        self.indexer_version_group = version_group(
            self.indexer_group, encoder_version(encoder_settings_of(os.environ))
        )
        self.recommender_group = f"{app_id}-recommender"
        roles = ("profiles", "associations", "indexer", "recommender")
        self.ports = dict(zip(roles, free_ports(len(roles)), strict=True))
        self.processes: dict[str, ManagedProcess] = {}
        self.starts = Counter[str]()

    def env(self, name: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "RELATA_LOG_LEVEL": "INFO",
                "RELATA_KAFKA_BOOTSTRAP_SERVERS": self.kafka.bootstrap_servers,
                "RELATA_KAFKA_TOPIC_PREFIX": self.kafka.topic_prefix,
                "RELATA_KAFKA_PARTITIONS": str(self.kafka.partitions),
                "RELATA_KAFKA_REPLICATION_FACTOR": "1",
                "RELATA_KAFKA_SECURITY_PROTOCOL": "PLAINTEXT",
            }
        )
        if name == "workers":
            env.update(
                {
                    # One store across restarts, as a deployed worker's volume.
                    "RELATA_STORE_PATH": str(self.workdir / "qdrant"),
                    "RELATA_INDEXER_GROUP_ID": self.indexer_group,
                    "RELATA_INDEXER_METRICS_PORT": str(self.ports["indexer"]),
                    "RELATA_RECOMMENDER_GROUP_ID": self.recommender_group,
                    "RELATA_RECOMMENDER_METRICS_PORT": str(self.ports["recommender"]),
                }
            )
        else:
            env.update(
                {
                    "RELATA_STREAMS_APP_ID": self.app_id,
                    "RELATA_STREAMS_ROLE": name,
                    "RELATA_STREAMS_WEB_PORT": str(self.ports[name]),
                    "RELATA_STREAMS_DATA_DIR": str(self.workdir / f"{name}-{self.starts[name]}"),
                    "RELATA_STREAMS_SESSION_TIMEOUT_S": "3",
                    "RELATA_STREAMS_HEARTBEAT_INTERVAL_S": "0.5",
                }
            )
        env.update(self.extra_env.get(name, {}))
        return env

    def start(self, name: str) -> None:
        self.starts[name] += 1
        args = ["workers", "--role", "all"] if name == "workers" else ["streams", "--no-similar"]
        self.processes[name] = start_relata(
            f"{name}-{self.starts[name]}", args, env=self.env(name), log_dir=self.workdir
        )

    def kill(self, name: str) -> None:
        """SIGKILL the process group (only the processes this test started)."""
        process = self.processes.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.popen.wait(10)
        process.stop()  # closes its log

    def check(self) -> None:
        for process in self.processes.values():
            process.check()

    def ready(self, name: str, lag: LagMonitor) -> bool:
        """A role answers /healthz; the workers have indexed the whole catalog."""
        if name != "workers":
            return healthy(self.ports[name])
        catalog = self.kafka.topic(ITEM_CATALOG.name)
        group = self.indexer_version_group
        with contextlib.suppress(Exception):  # coordinator not ready yet: ask again
            return bool(lag.committed(group, catalog) and lag.lag(group, catalog) == 0)
        return False

    def wait_ready(self, name: str, lag: LagMonitor) -> float:
        """Seconds until `name` is ready."""
        started = time.monotonic()
        while not self.ready(name, lag):
            self.check()
            if time.monotonic() - started > READY_S:
                pytest.fail(f"{name} not ready within {READY_S:.0f} s; logs in {self.workdir}")
            time.sleep(0.3)
        return time.monotonic() - started

    def assert_up(self, *names: str) -> None:
        self.check()
        assert set(self.processes) == set(names)
        assert all(process.alive() for process in self.processes.values())

    def stop(self) -> None:
        for process in self.processes.values():
            process.stop()
        self.processes.clear()


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def read_topic(kafka: KafkaSettings, topic: str) -> Records:
    """Every record of a one-partition topic, from its start to its current end."""
    consumer = make_consumer(kafka)
    try:
        _, end = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
        consumer.assign([TopicPartition(topic, 0, 0)])
        out: Records = []
        deadline = time.monotonic() + 60
        next_offset = 0
        while next_offset < end and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None or message.error() is not None:
                continue
            out.append((message.offset(), message.key(), message.value()))
            next_offset = message.offset() + 1
        assert next_offset >= end, f"{topic}: read up to {next_offset} of {end}"
        return out
    finally:
        consumer.close()


def latest(records: Records) -> dict[str, Any]:
    """A table changelog's latest value per key (JSON keys and values; tombstones remove)."""
    state: dict[str, Any] = {}
    for _, key, value in records:
        assert key is not None
        if value is None:
            state.pop(json.loads(key), None)
        else:
            state[json.loads(key)] = json.loads(value)
    return state


def wait_drained(roles: Roles, lag: LagMonitor, *, recommender: bool = False) -> None:
    """Until both roles (and, with `recommender`, the recommender) have committed everything
    there is, association inputs and profile updates included."""
    deadline = time.monotonic() + DRAIN_S
    events_topic = roles.kafka.topic(BEHAVIOR_EVENTS.name)
    updates_topic = roles.kafka.topic(PROFILE_UPDATES.name)
    while True:
        roles.check()
        with contextlib.suppress(Exception):  # coordinator not ready yet: ask again
            if (
                lag.committed(roles.events_group, events_topic)
                and lag.lag(roles.events_group, events_topic) == 0
                and lag.lag(roles.associations_group, roles.association_input) == 0
                and (
                    not recommender
                    or (
                        lag.committed(roles.recommender_group, updates_topic)
                        and lag.lag(roles.recommender_group, updates_topic) == 0
                    )
                )
            ):
                return
        if time.monotonic() > deadline:
            pytest.fail(f"not drained within {DRAIN_S:.0f} s; logs in {roles.workdir}")
        time.sleep(0.5)


@dataclass
class CleanRun:
    """The events folded one by one as a clean run folds them (the catalog as published)."""

    profiles: dict[str, UserProfile] = field(default_factory=dict)
    inputs: list[AssociationInput] = field(default_factory=list)
    # Offsets (0-based line index, one partition) of the lines a run must dead-letter.
    rejected: list[int] = field(default_factory=list)


def clean_run(kafka: KafkaSettings, lines: list[tuple[int, bytes]], config: FoldConfig) -> CleanRun:
    """The profile fold of `lines` one event at a time, as replayed to one partition (a line's
    offset is its index): profiles, association inputs and the offsets a clean run rejects."""
    catalog = CatalogView()
    for _, key, value in read_topic(kafka, kafka.topic(ITEM_CATALOG.name)):
        catalog.apply(key, value)
    run = CleanRun()
    for offset, (_, raw) in enumerate(lines):
        event = decode(raw, BehaviorEvent)
        if isinstance(event, Rejection) or event.item_id not in catalog:
            run.rejected.append(offset)
            continue
        result = fold_event(run.profiles.get(event.user_id), event, config)
        run.profiles[event.user_id] = result.profile
        inp = AssociationInput.from_fold(result, event, source=(0, offset))
        if inp is not None:
            run.inputs.append(inp)
    return run


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=1e-12)


def differences(live: dict[str, Any], clean: dict[str, Any]) -> Counter[str]:
    """What differs between the live item records and a clean fold's, by kind of difference."""
    found = Counter[str]()
    found["items only live"] = len(live.keys() - clean.keys())
    found["items only clean"] = len(clean.keys() - live.keys())
    for item_id in live.keys() & clean.keys():
        a, b = live[item_id], clean[item_id]
        if not close(a["landmark"], b["landmark"]):
            found["landmarks"] += 1
        for kind in a["counts"].keys() | b["counts"].keys():
            if not close(a["counts"].get(kind, 0.0), b["counts"].get(kind, 0.0)):
                found["item counts"] += 1
        for name in ("partners", "errors"):
            for kind in a[name].keys() | b[name].keys():
                mine, theirs = a[name].get(kind, {}), b[name].get(kind, {})
                found[f"{name} only live"] += len(mine.keys() - theirs.keys())
                found[f"{name} only clean"] += len(theirs.keys() - mine.keys())
                found[f"{name} values"] += sum(
                    not close(mine[p], theirs[p]) for p in mine.keys() & theirs.keys()
                )
        for kind in a["floors"].keys() | b["floors"].keys():
            if not close(a["floors"].get(kind, 0.0), b["floors"].get(kind, 0.0)):
                found["floors"] += 1
    return +found


def profile_differences(live: dict[str, Any], clean: dict[str, UserProfile]) -> Counter[str]:
    """What differs between the profiles table (latest changelog value per user) and a clean
    fold's profiles: users, history item ids (in order), weights (relative 1e-9), counts."""
    found = Counter[str]()
    found["users only live"] = len(live.keys() - clean.keys())
    found["users only clean"] = len(clean.keys() - live.keys())
    for user_id in live.keys() & clean.keys():
        mine = UserProfile.model_validate(live[user_id]).history
        theirs = clean[user_id].history
        if [h.item_id for h in mine] != [h.item_id for h in theirs]:
            found["history item ids"] += 1
            continue
        found["weights"] += sum(
            not close(a.weight, b.weight) for a, b in zip(mine, theirs, strict=True)
        )
        found["counts"] += sum(a.count != b.count for a, b in zip(mine, theirs, strict=True))
    return +found


class BackgroundReplay:
    """Replays event lines in a thread at `rate` events/s; `join` re-raises its failure."""

    def __init__(
        self, kafka: KafkaSettings, lines: list[tuple[int, bytes]], rate: float, producer: Any
    ) -> None:
        self.failure: list[BaseException] = []
        topic = kafka.topic(BEHAVIOR_EVENTS.name)

        def run() -> None:
            try:
                replay_events(lines, producer=producer, topic=topic, rate=rate)
            except BaseException as exc:  # reported by the test thread
                self.failure.append(exc)

        self.thread = threading.Thread(target=run, name="replay", daemon=True)
        self.thread.start()

    def join(self, timeout_s: float) -> None:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive() and not self.failure, self.failure


def replay_warm_up(
    kafka: KafkaSettings, lines: list[tuple[int, bytes]], rate: float, until: Callable[[], bool]
) -> Any:
    """Replay `lines` (the first events), then wait until `until()`; returns the producer."""
    producer = make_producer(kafka)
    replay_events(lines, producer=producer, topic=kafka.topic(BEHAVIOR_EVENTS.name), rate=rate)
    deadline = time.monotonic() + READY_S
    while not until():
        assert time.monotonic() < deadline, "nothing folded after the warm-up"
        time.sleep(0.5)
    return producer


# Each test's figures, printed at the end of the run by this folder's conftest.
FIGURES: list[str] = []


def report(name: str, **figures: Any) -> None:
    """Record a test's figures: printed now (seen with -s or when it fails) and in the
    run's terminal summary."""
    text = " ".join(
        f"{key}={value:.1f}" if isinstance(value, float) else f"{key}={value}"
        for key, value in figures.items()
    )
    FIGURES.append(f"{name}: {text}")
    print(f"\n{name}: {text}")


def sent_inputs(roles: Roles) -> list[dict[str, Any]]:
    """The association inputs on the association-input topic, in order, as dicts."""
    return [
        data
        for _, _, value in read_topic(roles.kafka, roles.association_input)
        for data in json.loads(value or b"[]")
    ]


def clean_associations(
    settings: StreamsSettings, inputs: list[AssociationInput]
) -> AssociationIndex:
    """The association fold of `inputs` in order, as a clean association role folds them."""
    index = AssociationIndex(AssociationConfig.from_settings(settings))
    index.observe_batch(inputs)
    assert index.items, "no association statistics: nothing was exercised"
    return index


def assert_associations_equal(roles: Roles, clean: AssociationIndex, note: str) -> None:
    """The association tables' changelogs (item records, totals, clock) equal `clean`'s."""
    live = latest(read_topic(roles.kafka, roles.associations_changelog))
    live_totals = latest(read_topic(roles.kafka, roles.totals_changelog))[TOTALS_KEY]
    differ = differences(live, clean.items)
    assert not differ, f"association records differ from a clean fold: {dict(differ)}; {note}"
    assert clean.totals is not None
    assert live_totals["totals"]["counts"].keys() == clean.totals["counts"].keys()
    for kind, count in clean.totals["counts"].items():
        assert close(live_totals["totals"]["counts"][kind], count), kind
    assert close(live_totals["totals"]["landmark"], clean.totals["landmark"])
    assert live_totals["clock"] == clean.last_ts


def folded_event_ids(kafka: KafkaSettings) -> Counter[str]:
    """How many times each event id triggered a profile update."""
    return Counter(
        event_id
        for _, _, value in read_topic(kafka, kafka.topic(PROFILE_UPDATES.name))
        for event_id in ProfileUpdate.model_validate_json(value or b"").trigger_event_ids
    )


def dead_letters(kafka: KafkaSettings) -> list[DeadLetter]:
    return [
        DeadLetter.model_validate_json(value or b"")
        for _, _, value in read_topic(kafka, kafka.topic(DEAD_LETTER.name))
    ]


def resent(sent: list[dict[str, Any]], expected: list[dict[str, Any]]) -> int:
    """How many association inputs of `sent` are re-sent copies (the profiles role re-folding
    events whose changelog records a kill lost). Fails unless every copy equals the input of
    its source event sent first, and `sent` without the copies is exactly `expected`."""
    first: dict[tuple[int, int], dict[str, Any]] = {}
    unique: list[dict[str, Any]] = []
    copies = 0
    for data in sent:
        source = tuple(data["source"])
        assert len(source) == 2
        if source in first:
            assert data == first[source], f"re-sent input of event {source} differs: {data}"
            copies += 1
            continue
        first[source] = data  # type: ignore[index]
        unique.append(data)
    at = next((i for i, (a, b) in enumerate(zip(unique, expected, strict=False)) if a != b), None)
    assert unique == expected, (
        f"association inputs differ from a clean run's: first difference at "
        f"{at if at is not None else min(len(unique), len(expected))} of {len(expected)} "
        f"({len(unique)} sent once, {copies} copies)"
    )
    return copies


def replay_and_kill(
    roles: Roles,
    lag: LagMonitor,
    lines: list[tuple[int, bytes]],
    *,
    role: str,
    folded_topic: str,
    rng: Any,
    warm_up: int,
    rate: float,
) -> tuple[BackgroundReplay, float]:
    """Start both stream roles; replay the first `warm_up` lines until `folded_topic` holds a
    record (the roles are then assigned and recovered), the rest in the background; kill -9
    `role` at a seeded moment of it. Returns the running replay and the kill's moment (s)."""
    kafka = roles.kafka
    roles.start("profiles")
    roles.start("associations")
    roles.wait_ready("profiles", lag)
    roles.wait_ready("associations", lag)

    def folded_some() -> bool:
        roles.check()
        return bool(read_topic(kafka, folded_topic))

    producer = replay_warm_up(kafka, lines[:warm_up], rate, folded_some)
    replay = BackgroundReplay(kafka, lines[warm_up:], rate, producer)
    kill_after = float(rng.uniform(0.2, 0.8)) * (len(lines) - warm_up) / rate
    time.sleep(kill_after)
    roles.kill(role)
    return replay, kill_after


def restart_and_drain(
    roles: Roles,
    lag: LagMonitor,
    replay: BackgroundReplay,
    *,
    role: str,
    rng: Any,
    join_timeout_s: float,
) -> float:
    """Start `role` again a seeded moment later, let the replay finish and the pipeline drain;
    returns the seconds from the restart until drained and ready."""
    time.sleep(float(rng.uniform(0.0, 2.0)))
    restarted = time.monotonic()
    roles.start(role)
    replay.join(join_timeout_s)
    wait_drained(roles, lag)
    roles.wait_ready(role, lag)
    return time.monotonic() - restarted
