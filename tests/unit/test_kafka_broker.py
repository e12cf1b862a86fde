"""Jar resolution of the embedded broker: atomic, once, with a fake `mvn` (no network)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from relata.runtime.kafka_broker import _server_properties
from relata.runtime.kafka_jars import EmbeddedKafkaError, resolve_jars
from schemas.settings import EmbeddedKafkaSettings

FAKE_MVN = """#!/bin/sh
# Fake Maven: records each call, writes jars into -DoutputDirectory, then behaves per $MODE.
echo call >> "{calls}"
for arg in "$@"; do
  case "$arg" in -DoutputDirectory=*) out="${{arg#-DoutputDirectory=}}" ;; esac
done
mkdir -p "$out"
touch "$out/kafka-clients-9.9.9.jar"
case "{mode}" in
  fail) echo "Could not resolve dependencies" >&2; exit 1 ;;
  hang) touch "{calls}.started"; sleep 60 ;;
  slow) sleep 0.5 ;;
esac
touch "$out/kafka_2.13-9.9.9.jar"
"""


def _fake_mvn(tmp_path: Path, mode: str) -> tuple[str, Path]:
    calls = tmp_path / "calls"
    script = tmp_path / f"mvn-{mode}"
    script.write_text(FAKE_MVN.format(calls=calls, mode=mode))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script), calls


def _settings(tmp_path: Path) -> EmbeddedKafkaSettings:
    return EmbeddedKafkaSettings(cache_dir=tmp_path / "cache" / "kafka-9.9.9", version="9.9.9")


def _leftovers(settings: EmbeddedKafkaSettings) -> list[str]:
    parent = settings.jars_dir().parent
    return sorted(p.name for p in parent.iterdir() if not p.name.endswith(".lock"))


def test_resolves_once_and_reuses_cache(tmp_path: Path) -> None:
    mvn, calls = _fake_mvn(tmp_path, "ok")
    settings = _settings(tmp_path)
    jars = resolve_jars(settings, mvn=mvn)
    assert jars == settings.jars_dir()
    assert (jars / "kafka_2.13-9.9.9.jar").is_file()
    assert resolve_jars(settings, mvn=mvn) == jars
    assert calls.read_text().count("call") == 1
    assert _leftovers(settings) == ["kafka-9.9.9"]


def test_concurrent_resolvers_run_maven_once(tmp_path: Path) -> None:
    mvn, calls = _fake_mvn(tmp_path, "slow")
    settings = _settings(tmp_path)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(resolve_jars(settings, mvn=mvn)))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [settings.jars_dir()] * 3
    assert calls.read_text().count("call") == 1


def test_failed_resolution_leaves_no_cache(tmp_path: Path) -> None:
    mvn, _ = _fake_mvn(tmp_path, "fail")
    settings = _settings(tmp_path)
    with pytest.raises(EmbeddedKafkaError, match="Could not resolve dependencies"):
        resolve_jars(settings, mvn=mvn)
    assert not settings.jars_dir().exists()
    assert _leftovers(settings) == []


def test_interrupted_resolution_leaves_no_cache_and_next_run_completes(tmp_path: Path) -> None:
    hang, calls = _fake_mvn(tmp_path, "hang")
    settings = _settings(tmp_path)
    code = (
        "import sys; from pathlib import Path; from relata.runtime.kafka_jars import resolve_jars;"
        "from schemas.settings import EmbeddedKafkaSettings;"
        f"resolve_jars(EmbeddedKafkaSettings(cache_dir=Path({str(settings.jars_dir())!r}),"
        f" version='9.9.9'), mvn={hang!r})"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    started = Path(f"{calls}.started")
    for _ in range(300):
        if started.exists():
            break
        time.sleep(0.1)
    assert started.exists(), "fake mvn never started"
    os.killpg(proc.pid, signal.SIGKILL)  # the resolver and its mvn die mid-download
    proc.wait()
    assert not settings.jars_dir().exists()

    mvn, _ = _fake_mvn(tmp_path, "ok")
    jars = resolve_jars(settings, mvn=mvn)
    assert (jars / "kafka_2.13-9.9.9.jar").is_file()
    assert _leftovers(settings) == ["kafka-9.9.9"]


def test_missing_maven_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EmbeddedKafkaError, match="not on PATH"):
        resolve_jars(_settings(tmp_path), mvn=str(tmp_path / "no-such-mvn"))


def test_server_properties_single_node_for_fast_tests(tmp_path: Path) -> None:
    text = _server_properties(host="127.0.0.1", port=1234, controller_port=5678, log_dir=tmp_path)
    props = dict(line.split("=", 1) for line in text.splitlines())
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:1234,CONTROLLER://127.0.0.1:5678"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:1234"
    assert props["process.roles"] == "broker,controller"
    assert props["group.initial.rebalance.delay.ms"] == "0"
    assert props["offsets.topic.replication.factor"] == "1"
    assert props["transaction.state.log.replication.factor"] == "1"
    assert props["log.dirs"] == str(tmp_path)
    # Topics exist only as declared: a client naming a missing one gets no broker default.
    assert props["auto.create.topics.enable"] == "false"


def test_server_properties_overrides_win(tmp_path: Path) -> None:
    text = _server_properties(
        host="127.0.0.1",
        port=1,
        controller_port=2,
        log_dir=tmp_path,
        overrides={"auto.create.topics.enable": "true"},
    )
    assert "auto.create.topics.enable=true" in text.splitlines()
    assert "auto.create.topics.enable=false" not in text.splitlines()


def test_default_cache_dir_is_outside_the_repo() -> None:
    jars = EmbeddedKafkaSettings().jars_dir()
    assert jars == Path.home() / ".cache" / "relata" / "kafka-4.1.1"


def test_cluster_ids_never_read_as_options() -> None:
    from relata.runtime.kafka_broker import _cluster_id

    ids = {_cluster_id() for _ in range(2000)}
    assert len(ids) == 2000
    assert all(len(i) == 22 and i[0] not in "-_" for i in ids)


def test_listener_ports_are_distinct_when_the_kernel_repeats_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A closed probe socket's port may come back from the next probe; Kafka refuses two
    # listeners on one port, so the chosen ports must differ however often the kernel repeats.
    import relata.runtime.kafka_broker as kb

    handed_out = iter([41000, 41000, 41000, 41001, 41001, 41002])
    monkeypatch.setattr(kb, "free_port", lambda host="127.0.0.1": next(handed_out))
    kafka = kb.EmbeddedKafka()
    kafka.workdir = tmp_path
    port, controller_port, mtls_port = kafka._ports()
    assert (port, controller_port, mtls_port) == (41000, 41001, None)
    assert kb.free_port_besides({41000, 41001}) == 41002
