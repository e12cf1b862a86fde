"""A broker that cannot be reached is one clear line and a quick non-zero exit."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from relata.runtime.kafka_broker import free_port

pytestmark = pytest.mark.integration

RELATA = str(Path(sys.executable).with_name("relata"))


@pytest.mark.parametrize("command", [["workers"], ["tail", "behavior-events"]])
def test_a_closed_port_is_one_line_and_a_quick_exit(command: list[str]) -> None:
    bootstrap = f"127.0.0.1:{free_port()}"  # nothing listens there
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELATA_")}
    env |= {"RELATA_KAFKA_BOOTSTRAP_SERVERS": bootstrap, "RELATA_KAFKA_CONNECT_TIMEOUT_S": "3"}
    started = time.monotonic()
    proc = subprocess.run(
        [RELATA, *command], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    elapsed = time.monotonic() - started
    assert proc.returncode != 0
    assert elapsed < 15, f"took {elapsed:.1f} s"
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, "\n".join(lines[:20])
    assert lines[0].startswith(f"Error: Kafka at {bootstrap}: unreachable (")
    assert "Connection refused" in lines[0]
