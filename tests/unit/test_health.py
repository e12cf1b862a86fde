"""Readiness and liveness (kafkaio/health.py) on a manual clock, the workers' probe server,
and the shutdown grace period's watchdog."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter

from kafkaio.health import BrokerWatch, Health
from relata.runtime.health_server import serve_probes
from relata.runtime.kafka_broker import free_port
from relata.runtime.process import EXIT_GRACE_EXPIRED


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Broker:
    def __init__(self) -> None:
        self.up = True

    def check(self, timeout: float) -> None:
        if not self.up:
            raise RuntimeError("KafkaError{code=_TIMED_OUT}")


def rig() -> tuple[Health, Clock, Broker]:
    clock, broker = Clock(), Broker()
    health = Health(ack_timeout_s=30, stall_timeout_s=120, clock=clock)
    health.broker = BrokerWatch(broker.check, interval_s=2, clock=clock)
    return health, clock, broker


def test_a_healthy_process_is_ready_and_live() -> None:
    health, clock, _ = rig()
    loop = health.loop("events")
    clock.now += 10
    loop.beat()
    assert health.broker is not None and health.broker.check_once()
    report = health.report()
    assert report.ready and report.live and report.broker_reachable and not report.problems


def test_a_broker_away_makes_it_not_ready_but_never_not_live() -> None:
    health, clock, broker = rig()
    loop = health.loop("events")
    waiting = [clock.now]  # a flush waits for acknowledgements from now on
    health.wait("outputs", lambda: waiting[0])
    broker.up = False
    assert health.broker is not None and not health.broker.check_once()
    clock.now += 1_000  # a long outage: the loop is stuck in its flush, partitions lost
    loop.lost()
    report = health.report()
    assert not report.ready and report.live and not report.broker_reachable
    assert any("brokers not answering" in p for p in report.problems)
    # The broker is back but the flush still waits and the partitions stay lost: stuck.
    broker.up = True
    health.broker.check_once()
    report = health.report()
    assert not report.ready and not report.live
    # It resumes: acknowledged, regained, beating.
    waiting[0] = None  # type: ignore[call-overload]
    loop.assigned()
    loop.beat()
    report = health.report()
    assert report.ready and report.live


def test_outputs_unacknowledged_past_the_ack_timeout_are_not_ready() -> None:
    health, clock, _ = rig()
    health.wait("outputs", lambda: 100.0)
    assert health.broker is not None
    clock.now = 100.0 + 29
    health.broker.check_once()
    assert health.report().ready
    clock.now = 100.0 + 31
    health.broker.check_once()
    report = health.report()
    assert not report.ready and report.live
    assert "outputs: unacknowledged for 31 s" in report.problems


def test_lost_partitions_are_not_ready_until_regained() -> None:
    health, clock, _ = rig()
    loop = health.loop("events")
    loop.lost()
    clock.now += 5
    loop.beat()
    assert not health.report().ready and health.report().live
    clock.now += 200  # lost for longer than the stall timeout with the broker answering
    loop.beat()
    assert health.broker is not None and health.broker.check_once()
    assert not health.report().live
    loop.assigned()
    assert health.report().ready and health.report().live


def test_a_loop_that_stops_coming_round_is_not_live_and_a_dead_one_never_is() -> None:
    health, clock, _ = rig()
    loop = health.loop("recommender")
    clock.now += 121
    assert health.broker is not None and health.broker.check_once()
    report = health.report()
    assert not report.live and "recommender: no progress for 121 s" in report.problems
    loop.beat()
    assert health.report().live
    loop.failed(RuntimeError("refused"))
    report = health.report()
    assert not report.live and not report.ready


def test_a_broker_check_that_never_finishes_counts_as_away() -> None:
    health, clock, _ = rig()
    clock.now += 10  # no check finished for 3 intervals (2 s each) + 1 s
    assert not health.report().broker_reachable


def test_readiness_conditions_are_part_of_readiness_only() -> None:
    health, _, _ = rig()
    loaded = threading.Event()
    health.condition("catalog", loaded.is_set)
    report = health.report()
    assert not report.ready and report.live and "catalog: not yet" in report.problems
    loaded.set()
    assert health.report().ready


def test_the_probe_server_answers_metrics_readiness_and_liveness() -> None:
    registry = CollectorRegistry()
    Counter("relata_probe_test_total", "a counter", registry=registry).inc()
    health, _, broker = rig()
    port = free_port()
    server = serve_probes(port, registry=registry, health=health, host="127.0.0.1")
    try:

        def get(path: str) -> tuple[int, bytes]:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                    return r.status, r.read()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read()

        status, body = get("/metrics")
        assert status == 200 and b"relata_probe_test_total 1.0" in body
        assert get("/readyz")[0] == 200 and get("/healthz")[0] == 200 and get("/livez")[0] == 200
        broker.up = False
        assert health.broker is not None
        health.broker.check_once()
        status, body = get("/readyz")
        assert status == 503 and json.loads(body)["broker_reachable"] is False
        assert get("/livez")[0] == 200
        assert get("/nope")[0] == 404
    finally:
        server.shutdown()


@pytest.mark.slow
def test_a_stop_that_outlasts_the_grace_period_ends_the_process() -> None:
    script = textwrap.dedent(
        """
        import os, signal, threading, time
        from relata.runtime.process import stop_on_signals
        stop = threading.Event()
        stop_on_signals(stop, grace_s=0.5)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.is_set()
        time.sleep(30)  # a graceful stop stuck on a broker that does not answer
        """
    )
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=20)
    took = time.monotonic() - started
    assert result.returncode == EXIT_GRACE_EXPIRED, result.stderr.decode()
    assert took < 10
    assert b"shutdown grace of 0 s expired" in result.stderr or b"expired" in result.stderr
