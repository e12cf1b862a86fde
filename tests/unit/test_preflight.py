"""The start-up check: librdkafka's errors mapped to one line naming the cause."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest

from relata.runtime.preflight import (
    ClientError,
    KafkaUnavailableError,
    check_kafka,
    classified,
    describe_failure,
)
from schemas.settings import KafkaSettings

REFUSED = ClientError(-195, "h:1/bootstrap: Connect to ipv4#127.0.0.1:1 failed: Connection refused")
ALL_DOWN = ClientError(-187, "1/1 brokers are down")
SASL = ClientError(
    -169,
    "SASL authentication error: Authentication failed during authentication due to invalid "
    "credentials with SASL mechanism SCRAM-SHA-512",
)
SSL = ClientError(-181, "h:1/bootstrap: SSL handshake failed: certificate verify failed")
RESOLVE = ClientError(-193, "Failed to resolve 'nowhere:9092': Name or service not known")
# What a broker that requires a client certificate answers to a client without one (TLS 1.3).
NO_CLIENT_CERT = ClientError(
    -195,
    "ssl://h:1/bootstrap: Receive failed: error:0A000412:SSL routines::ssl/tls alert bad "
    "certificate: SSL alert number 42 (after 5ms in state APIVERSION_QUERY)",
)


@pytest.mark.parametrize(
    ("errors", "cause", "hint"),
    [
        ([ALL_DOWN, REFUSED], "unreachable (h:1/bootstrap: Connect", "RELATA_KAFKA_BOOTSTRAP"),
        ([RESOLVE, ALL_DOWN], "host name not resolved", "RELATA_KAFKA_BOOTSTRAP_SERVERS"),
        ([REFUSED, SASL, ALL_DOWN], "authentication failed (SASL", "RELATA_KAFKA_SASL_*"),
        ([ALL_DOWN, SSL], "TLS handshake failed (h:1/bootstrap: SSL", "RELATA_KAFKA_SSL_*"),
        (
            [ALL_DOWN, classified(NO_CLIENT_CERT)],
            "TLS handshake failed (ssl://h:1/bootstrap: Receive failed",
            "client certificate",
        ),
        ([ClientError(58, "bad creds")], "authentication failed (bad creds)", "SASL"),
        ([ClientError(31, "cluster")], "not authorized (cluster)", "ACLs"),
        ([ClientError(-1, "odd\nthing")], "error (odd thing)", "BOOTSTRAP"),
        ([], "unreachable (no answer within 3 s)", "BOOTSTRAP"),
    ],
)
def test_the_most_specific_error_names_the_cause(
    errors: list[ClientError], cause: str, hint: str
) -> None:
    line = describe_failure("h:1,h:2", errors, waited_s=3.0)
    assert line.startswith(f"Kafka at h:1,h:2: {cause}")
    assert hint in line
    assert "\n" not in line


class _FakeAdmin:
    """An AdminClient whose metadata requests fail and whose error_cb reports `errors`."""

    def __init__(self, errors: list[ClientError], config: dict[str, Any]) -> None:
        self._errors, self._cb = errors, config["error_cb"]
        self.config = config
        self.requests = 0

    def list_topics(self, timeout: float) -> Any:
        from confluent_kafka import KafkaError, KafkaException

        self.requests += 1
        time.sleep(min(timeout, 0.05))
        raise KafkaException(KafkaError(-195, "Failed to get metadata"))

    def poll(self, timeout: float) -> int:
        for error in self._errors:
            self._cb(SimpleNamespace(code=lambda e=error: e.code, str=lambda e=error: e.text))
        return len(self._errors)


def test_authentication_failure_stops_at_once_with_logs_off() -> None:
    made: list[_FakeAdmin] = []

    def factory(config: dict[str, Any]) -> _FakeAdmin:
        made.append(_FakeAdmin([SASL], config))
        return made[-1]

    kafka = KafkaSettings(bootstrap_servers="h:1", connect_timeout_s=30)
    started = time.monotonic()
    with pytest.raises(KafkaUnavailableError, match=r"^Kafka at h:1: authentication failed"):
        check_kafka(kafka, client_factory=factory)
    assert time.monotonic() - started < 2
    assert made[0].requests == 1
    assert made[0].config["log_level"] == 0


def test_unreachable_waits_for_the_connect_timeout() -> None:
    kafka = KafkaSettings(bootstrap_servers="h:1", connect_timeout_s=0.3)
    started = time.monotonic()
    with pytest.raises(KafkaUnavailableError, match=r"unreachable .*Connection refused"):
        check_kafka(kafka, client_factory=lambda config: _FakeAdmin([REFUSED], config))
    assert 0.3 <= time.monotonic() - started < 2


def test_a_broker_that_answers_passes() -> None:
    class Answering:
        def __init__(self, config: dict[str, Any]) -> None: ...

        def list_topics(self, timeout: float) -> Any:
            return SimpleNamespace(brokers={1: object()})

    assert check_kafka(KafkaSettings(), client_factory=Answering) == 1
