"""Fault test: kill -9 of the association role mid-replay, then a restart.

The stream processor's two roles run as `relata streams` subprocesses on the embedded broker;
a slice of the online-retail events is replayed, the association role is killed (SIGKILL) at
a seeded random moment and started again. Once everything is drained, its statistics (item
records and totals read back from the tables' changelogs, related items over HTTP) must equal
a clean run of the same events through the pure cores (profile fold, then association fold),
every input counted once and none lost; every item with a related list must have one
published; the profiles role must have folded every event once and both roles be up. The
association role commits its input offsets rarely here, so the kill re-delivers inputs that
it had already folded: the test checks that it did.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import math
import os
import random
import signal
import threading
import time
import urllib.request
from collections import Counter
from itertools import islice
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import TopicPartition

from relata.runtime.kafka_broker import free_port
from relata.runtime.probes import LagMonitor
from relata.runtime.replay import make_producer, publish_catalog, replay_events
from relata.runtime.supervision import REPO_ROOT, ManagedProcess, start_relata
from relata.runtime.tail import make_consumer
from relata.runtime.topics import ensure_topics
from schemas.decoding import Rejection, decode
from schemas.messages import BehaviorEvent, DeadLetter, ProfileUpdate, RelatedItems, UserProfile
from schemas.settings import KafkaSettings, StreamsSettings
from schemas.topics import (
    ALL_TOPICS,
    BEHAVIOR_EVENTS,
    DEAD_LETTER,
    ITEM_CATALOG,
    PROFILE_UPDATES,
    RELATED_ITEMS,
)
from streams.association import AssociationConfig, AssociationInput
from streams.associations_agent import TOTALS_KEY
from streams.catalog import CatalogView
from streams.naming import association_input_topic, events_group, faust_app_id
from streams.neighbours import AssociationIndex
from streams.profile import FoldConfig, fold_event

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DATA = REPO_ROOT / "data" / "online-retail"
EVENTS = 3000
RATE = 250.0  # events/s: a 12 s replay
WARM_UP = 250  # events replayed before the kill clock starts
SEED = 20_101
# The association role folds in short windows and commits rarely, so that a kill lands
# between windows' changelog records and their offsets' commit: folded inputs come again.
ASSOC_WINDOW_S = 0.5
ASSOC_COMMIT_INTERVAL_S = 4.0
READY_S = 180.0
DRAIN_S = 180.0
REL_TOL = 1e-9


def event_lines() -> list[tuple[int, bytes]]:
    with gzip.open(DATA / "events.jsonl.gz", "rb") as f:
        return [(n, line.rstrip(b"\n")) for n, line in enumerate(islice(f, EVENTS), start=1)]


class Roles:
    """The stream processor's two roles as subprocesses, and what is needed to observe them."""

    def __init__(self, kafka: KafkaSettings, workdir: Path, app_id: str) -> None:
        self.kafka = kafka
        self.workdir = workdir
        self.app_id = app_id
        profiles = StreamsSettings(app_id=app_id, role="profiles")
        associations = profiles.model_copy(update={"role": "associations"})
        self.events_group = events_group(kafka, profiles)
        self.associations_group = faust_app_id(kafka, associations)
        self.association_input = association_input_topic(kafka, associations)
        base = kafka.topic(app_id)
        self.associations_changelog = f"{base}-associations-changelog"
        self.totals_changelog = f"{base}-association-totals-changelog"
        self.ports = {"profiles": free_port(), "associations": free_port()}
        self.processes: dict[str, ManagedProcess] = {}
        self.starts = Counter[str]()

    def env(self, role: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "RELATA_LOG_LEVEL": "INFO",
                "RELATA_KAFKA_BOOTSTRAP_SERVERS": self.kafka.bootstrap_servers,
                "RELATA_KAFKA_TOPIC_PREFIX": self.kafka.topic_prefix,
                "RELATA_KAFKA_PARTITIONS": str(self.kafka.partitions),
                "RELATA_KAFKA_REPLICATION_FACTOR": "1",
                "RELATA_KAFKA_SECURITY_PROTOCOL": "PLAINTEXT",
                "RELATA_STREAMS_APP_ID": self.app_id,
                "RELATA_STREAMS_ROLE": role,
                "RELATA_STREAMS_WEB_PORT": str(self.ports[role]),
                "RELATA_STREAMS_DATA_DIR": str(self.workdir / f"{role}-{self.starts[role]}"),
                "RELATA_STREAMS_SESSION_TIMEOUT_S": "3",
                "RELATA_STREAMS_HEARTBEAT_INTERVAL_S": "0.5",
            }
        )
        if role == "associations":
            env["RELATA_STREAMS_ASSOC_BATCH_WINDOW_S"] = str(ASSOC_WINDOW_S)
            env["RELATA_STREAMS_COMMIT_INTERVAL_S"] = str(ASSOC_COMMIT_INTERVAL_S)
        return env

    def start(self, role: str) -> None:
        self.starts[role] += 1
        name = f"{role}-{self.starts[role]}"
        args = ["streams", "--no-similar"]
        self.processes[role] = start_relata(name, args, env=self.env(role), log_dir=self.workdir)

    def kill(self, role: str) -> None:
        """SIGKILL the role's process group (only the processes this test started)."""
        process = self.processes.pop(role)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.popen.wait(10)
        process.stop()  # closes its log

    def check(self) -> None:
        for process in self.processes.values():
            process.check()

    def wait_healthy(self, role: str) -> None:
        deadline = time.monotonic() + READY_S
        while not healthy(self.ports[role]):
            self.check()
            if time.monotonic() > deadline:
                pytest.fail(f"{role} not healthy within {READY_S:.0f} s; logs in {self.workdir}")
            time.sleep(0.3)

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


def read_topic(kafka: KafkaSettings, topic: str) -> list[tuple[int, bytes | None, bytes | None]]:
    """Every record of a one-partition topic, from its start to its current end."""
    consumer = make_consumer(kafka)
    try:
        _, end = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
        consumer.assign([TopicPartition(topic, 0, 0)])
        out: list[tuple[int, bytes | None, bytes | None]] = []
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


def latest(records: list[tuple[int, bytes | None, bytes | None]]) -> dict[str, Any]:
    """A table changelog's latest value per key (JSON keys and values; tombstones remove)."""
    state: dict[str, Any] = {}
    for _, key, value in records:
        assert key is not None
        if value is None:
            state.pop(json.loads(key), None)
        else:
            state[json.loads(key)] = json.loads(value)
    return state


def wait_drained(roles: Roles, lag: LagMonitor) -> None:
    """Until both roles have committed everything there is (association inputs included)."""
    deadline = time.monotonic() + DRAIN_S
    events_topic = roles.kafka.topic(BEHAVIOR_EVENTS.name)
    while True:
        roles.check()
        with contextlib.suppress(Exception):  # coordinator not ready yet: ask again
            if (
                lag.committed(roles.events_group, events_topic)
                and lag.lag(roles.events_group, events_topic) == 0
                and lag.lag(roles.associations_group, roles.association_input) == 0
            ):
                return
        if time.monotonic() > deadline:
            pytest.fail(f"not drained within {DRAIN_S:.0f} s; logs in {roles.workdir}")
        time.sleep(0.5)


def clean_inputs(
    kafka: KafkaSettings, lines: list[tuple[int, bytes]], config: FoldConfig
) -> list[AssociationInput]:
    """The association inputs of the events folded one by one, as a clean run folds them:
    undecodable events and unknown items (the catalog as published) left out."""
    catalog = CatalogView()
    for _, key, value in read_topic(kafka, kafka.topic(ITEM_CATALOG.name)):
        catalog.apply(key, value)
    profiles: dict[str, UserProfile] = {}
    inputs: list[AssociationInput] = []
    for _, raw in lines:
        event = decode(raw, BehaviorEvent)
        if isinstance(event, Rejection) or event.item_id not in catalog:
            continue
        result = fold_event(profiles.get(event.user_id), event, config)
        profiles[event.user_id] = result.profile
        inp = AssociationInput.from_fold(result, event)
        if inp is not None:
            inputs.append(inp)
    return inputs


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
        for field in ("partners", "errors"):
            for kind in a[field].keys() | b[field].keys():
                mine, theirs = a[field].get(kind, {}), b[field].get(kind, {})
                found[f"{field} only live"] += len(mine.keys() - theirs.keys())
                found[f"{field} only clean"] += len(theirs.keys() - mine.keys())
                found[f"{field} values"] += sum(
                    not close(mine[p], theirs[p]) for p in mine.keys() & theirs.keys()
                )
        for kind in a["floors"].keys() | b["floors"].keys():
            if not close(a["floors"].get(kind, 0.0), b["floors"].get(kind, 0.0)):
                found["floors"] += 1
    return +found


@pytest.fixture
def kafka(kafka_bootstrap: str, unique_id: str) -> KafkaSettings:
    # One partition per topic, as the pipeline runs one instance of each stage.
    return KafkaSettings(
        bootstrap_servers=kafka_bootstrap,
        topic_prefix=f"{unique_id}.",
        security_protocol="PLAINTEXT",
        partitions=1,
        replication_factor=1,
    )


def test_kill_association_role_mid_replay_restart_equals_clean_fold(
    kafka: KafkaSettings, unique_id: str, tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    ensure_topics(kafka, ALL_TOPICS)
    with gzip.open(DATA / "items.jsonl.gz", "rb") as f:
        catalog = [(n, line.rstrip(b"\n")) for n, line in enumerate(f, start=1)]
    publish_catalog(catalog, producer=make_producer(kafka), topic=kafka.topic(ITEM_CATALOG.name))
    lines = event_lines()

    roles = Roles(kafka, tmp_path, f"faults-{unique_id}")
    lag = LagMonitor(kafka)
    replay: threading.Thread | None = None
    try:
        roles.start("profiles")
        roles.start("associations")
        roles.wait_healthy("profiles")
        roles.wait_healthy("associations")

        # The first events until the association role has folded some (it is then assigned and
        # recovered), the rest in the background; kill -9 the role at a seeded moment of it.
        producer = make_producer(kafka)
        events_topic = kafka.topic(BEHAVIOR_EVENTS.name)
        replay_events(lines[:WARM_UP], producer=producer, topic=events_topic, rate=RATE)
        deadline = time.monotonic() + READY_S
        while not read_topic(kafka, roles.totals_changelog):
            roles.check()
            assert time.monotonic() < deadline, f"nothing folded; logs in {tmp_path}"
            time.sleep(0.5)
        failure: list[BaseException] = []

        def run_replay() -> None:
            try:
                replay_events(lines[WARM_UP:], producer=producer, topic=events_topic, rate=RATE)
            except BaseException as exc:  # reported by the test thread
                failure.append(exc)

        replay = threading.Thread(target=run_replay, name="replay", daemon=True)
        replay.start()
        time.sleep(rng.uniform(0.2, 0.8) * (EVENTS - WARM_UP) / RATE)
        roles.kill("associations")
        # Folded before the kill (the totals record holds the last message folded into it)
        # against committed: the inputs in between come again after the restart.
        totals = latest(read_topic(kafka, roles.totals_changelog)).get(TOTALS_KEY)
        folded_to = -1 if totals is None else totals["totals"]["applied"]["0"]
        committed = lag.committed(roles.associations_group, roles.association_input).get(0, 0)
        time.sleep(rng.uniform(0.0, 2.0))
        roles.start("associations")
        replay.join(EVENTS / RATE + 120)
        assert not replay.is_alive() and not failure, failure
        wait_drained(roles, lag)
        roles.wait_healthy("associations")
        assert folded_to >= committed, (
            f"the kill came before any association input was folded past the committed offset "
            f"(folded to {folded_to}, committed {committed}): no re-delivery was exercised"
        )

        # A clean run of the same events in the pure cores: the profile fold, one event at a
        # time, then the association fold; the profiles role sent exactly those inputs.
        settings = StreamsSettings(app_id=roles.app_id)
        expected_inputs = clean_inputs(kafka, lines, FoldConfig.from_settings(settings))
        sent = [
            data
            for _, _, value in read_topic(kafka, roles.association_input)
            for data in json.loads(value or b"[]")
        ]
        assert sent == [inp.to_dict() for inp in expected_inputs]
        clean = AssociationIndex(AssociationConfig.from_settings(settings))
        clean.observe_batch(expected_inputs)
        assert clean.items, "no association statistics: nothing was exercised"

        live = latest(read_topic(kafka, roles.associations_changelog))
        live_totals = latest(read_topic(kafka, roles.totals_changelog))[TOTALS_KEY]
        differ = differences(live, clean.items)
        assert not differ, (
            f"association records differ from a clean fold: {dict(differ)}; "
            f"messages re-delivered after the kill: {folded_to + 1 - committed}"
        )
        assert clean.totals is not None
        assert live_totals["totals"]["counts"].keys() == clean.totals["counts"].keys()
        for kind, count in clean.totals["counts"].items():
            assert close(live_totals["totals"]["counts"][kind], count), kind
        assert close(live_totals["totals"]["landmark"], clean.totals["landmark"])
        assert live_totals["clock"] == clean.last_ts

        # Served: the related items of the busiest items over HTTP equal the clean fold's.
        port = roles.ports["associations"]
        busiest = sorted(
            clean.items,
            key=lambda i: -len(clean.items[i]["partners"].get("bought_together", {})),
        )[:5]
        for item_id in busiest:
            body = get_json(
                f"http://127.0.0.1:{port}/items/{item_id}/related?kind=bought_together&k=50"
            )
            expected = clean.related(item_id, now=clean.last_ts, kinds=["bought_together"])
            assert expected is not None
            assert close(body["item_count"], expected.item_count)
            assert [(r["item_id"], r["evidence"]["support"]) for r in body["related"]] == [
                (r.item_id, r.evidence.support) for r in expected.related[:50]
            ]

        # Republished: every item with a related list in the clean fold has one on the topic.
        published = {
            RelatedItems.model_validate_json(value).item_id
            for _, _, value in read_topic(kafka, kafka.topic(RELATED_ITEMS.name))
            if value is not None
        }
        listed = {
            item_id
            for item_id in clean.items
            if (related := clean.related(item_id, now=clean.last_ts)) is not None
            and related.related
        }
        assert listed <= published, f"{len(listed - published)} lists never republished"

        # The profiles role: up, and every event folded exactly once or dead-lettered.
        folded = Counter(
            event_id
            for _, _, value in read_topic(kafka, kafka.topic(PROFILE_UPDATES.name))
            for event_id in ProfileUpdate.model_validate_json(value or b"").trigger_event_ids
        )
        assert not [e for e, n in folded.items() if n > 1], "events folded twice"
        dead = [
            DeadLetter.model_validate_json(value or b"")
            for _, _, value in read_topic(kafka, kafka.topic(DEAD_LETTER.name))
        ]
        assert len(folded) + len(dead) == EVENTS, (len(folded), Counter(d.error_type for d in dead))
        roles.check()
        assert set(roles.processes) == {"profiles", "associations"}
        assert all(process.alive() for process in roles.processes.values())
    finally:
        if replay is not None:
            replay.join(5)
        roles.stop()
        lag.close()
