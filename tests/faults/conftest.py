"""Fixtures of the fault tests."""

from __future__ import annotations

import pytest

from schemas.settings import KafkaSettings


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


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The kill tests' figures (events, kill moment, re-delivered, recovery), when any ran."""
    from tests.faults.helpers import FIGURES

    if FIGURES:
        terminalreporter.section("fault figures")
        for line in FIGURES:
            terminalreporter.write_line(line)
