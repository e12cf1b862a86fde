"""The start-up check of every process that talks to Kafka: can the brokers be reached, and
do they accept the credentials?

One metadata request with a short deadline (`RELATA_KAFKA_CONNECT_TIMEOUT_S`), librdkafka's
logs off, its errors collected through `error_cb` and mapped to one cause. Then, on a broker
with an authorizer, the operations the client is granted on each of its topics are compared
with those it needs (`schemas.access`). A process whose brokers cannot be used then stops with
one line naming the bootstrap servers and the cause, instead of a traceback after many lines
of client retries (or a consumer that silently reads nothing).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from schemas.access import Operation
from schemas.settings import KafkaSettings

# librdkafka error codes (confluent_kafka.KafkaError) and what an operator has to fix, the
# most specific first: when several errors were seen, the first of them here names the cause.
CAUSES: dict[int, str] = {
    -169: "authentication failed",  # _AUTHENTICATION
    58: "authentication failed",  # SASL_AUTHENTICATION_FAILED
    -181: "TLS handshake failed",  # _SSL
    31: "not authorized",  # CLUSTER_AUTHORIZATION_FAILED
    29: "not authorized",  # TOPIC_AUTHORIZATION_FAILED
    -193: "host name not resolved",  # _RESOLVE
    -195: "unreachable",  # _TRANSPORT (refused, reset, timed out connecting)
    -185: "unreachable",  # _TIMED_OUT
    -187: "unreachable",  # _ALL_BROKERS_DOWN
}
_PREFERENCE = list(CAUSES)
# Causes that waiting will not fix: the check stops at the first one.
_DEFINITE = frozenset(
    code
    for code, cause in CAUSES.items()
    if cause in ("authentication failed", "TLS handshake failed", "not authorized")
)
_HINTS = {
    "authentication failed": "check RELATA_KAFKA_SASL_* (and the client certificate)",
    "TLS handshake failed": (
        "check RELATA_KAFKA_SECURITY_PROTOCOL and RELATA_KAFKA_SSL_* (the CA, and the client "
        "certificate where the brokers require one)"
    ),
    "not authorized": (
        "check the ACLs of this client's principal (docs/operations.md lists each component's)"
    ),
}


class KafkaUnavailableError(RuntimeError):
    """The brokers could not be reached or refused this client; the message is one line."""


@dataclass(frozen=True, slots=True)
class ClientError:
    """One error librdkafka reported: its code and text."""

    code: int
    text: str


_SSL_CODE = -181
_TRANSPORT_CODE = -195
# A broker that refuses the client's certificate (or its lack of one) does so after the TLS 1.3
# handshake has completed on the client's side: librdkafka reports the broker's alert as a
# transport error ("Receive failed: ...: ssl/tls alert certificate required"), not as _SSL.
_TLS_ALERT = "ssl/tls alert"


def classified(error: ClientError) -> ClientError:
    """`error`, with a transport error that carries a TLS alert taken for the TLS failure it
    is (retrying will not fix it)."""
    if error.code == _TRANSPORT_CODE and _TLS_ALERT in error.text.lower():
        return ClientError(_SSL_CODE, error.text)
    return error


def describe_failure(
    bootstrap_servers: str, errors: Sequence[ClientError], *, waited_s: float
) -> str:
    """One line: the bootstrap servers, the cause (from the most specific error seen), the
    client's own words for it, and what to check."""
    known = [error for error in errors if error.code in CAUSES]
    if known:
        error = min(known, key=lambda e: _PREFERENCE.index(e.code))
        cause, detail = CAUSES[error.code], " ".join(error.text.split())
    elif errors:
        cause, detail = "error", " ".join(errors[0].text.split())
    else:
        cause, detail = "unreachable", f"no answer within {waited_s:.0f} s"
    hint = _HINTS.get(cause, "check RELATA_KAFKA_BOOTSTRAP_SERVERS and that the brokers run")
    return f"Kafka at {bootstrap_servers}: {cause} ({detail}); {hint}"


def check_kafka(
    settings: KafkaSettings,
    *,
    needs: Mapping[str, frozenset[Operation]] | None = None,
    client_factory: Any = None,
) -> int:
    """Ask the brokers for metadata within `settings.connect_timeout_s`; return how many
    brokers answered, or raise `KafkaUnavailableError` with one line naming the cause.

    `needs` (full topic name -> operations): the client must be granted them; a missing one
    is a `not authorized` line naming each topic and operation."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    errors: list[ClientError] = []  # from error_cb: the client's specific reasons
    failures: list[ClientError] = []  # from the metadata request: generic ("transport failure")
    config: dict[str, Any] = {
        **settings.librdkafka_config("relata-preflight"),
        # The errors come through error_cb; librdkafka's own log would repeat every
        # reconnect attempt on stderr.
        "log_level": 0,
        "error_cb": lambda error: errors.append(classified(ClientError(error.code(), error.str()))),
    }
    admin = (client_factory or AdminClient)(config)
    started = time.monotonic()
    deadline = started + settings.connect_timeout_s
    while True:
        remaining = deadline - time.monotonic()
        try:
            metadata = admin.list_topics(timeout=max(0.1, min(1.0, remaining)))
        except KafkaException as exc:
            failure = exc.args[0] if exc.args else None
            if failure is not None and hasattr(failure, "code"):
                failures.append(classified(ClientError(failure.code(), failure.str())))
        else:
            if metadata.brokers:
                if needs:
                    _check_authorized(admin, settings, needs)
                return len(metadata.brokers)
        admin.poll(0)  # serve error_cb
        if any(error.code in _DEFINITE for error in errors) or time.monotonic() >= deadline:
            break
    message = describe_failure(
        settings.bootstrap_servers, errors or failures, waited_s=time.monotonic() - started
    )
    raise KafkaUnavailableError(message)


def missing_operations(
    needs: Mapping[str, frozenset[Operation]], granted: Mapping[str, frozenset[str] | None]
) -> list[str]:
    """`OPERATION on topic NAME` for each operation of `needs` not in `granted` (topic ->
    granted operations; None: unknown, e.g. a broker without an authorizer, or a topic that
    does not exist yet). CREATE is left out: it matters only for a missing topic, which the
    contract check creates or reports."""
    missing = []
    for topic, operations in needs.items():
        have = granted.get(topic)
        if have is None:
            continue
        missing += [f"{op} on topic {topic}" for op in sorted(operations - {"CREATE"} - have)]
    return missing


def _check_authorized(
    admin: Any, settings: KafkaSettings, needs: Mapping[str, frozenset[Operation]]
) -> None:
    from confluent_kafka import KafkaError, KafkaException, TopicCollection

    granted: dict[str, frozenset[str] | None] = {}
    futures = admin.describe_topics(
        TopicCollection(sorted(needs)),
        request_timeout=settings.connect_timeout_s,
        include_authorized_operations=True,
    )
    for topic, future in futures.items():
        try:
            description = future.result()
        except KafkaException as exc:
            code = exc.args[0].code() if exc.args and hasattr(exc.args[0], "code") else None
            # Without DESCRIBE the broker answers "not authorized" for a topic, existing or not.
            granted[topic] = frozenset() if code == KafkaError.TOPIC_AUTHORIZATION_FAILED else None
            continue
        # A broker without an authorizer reports no operations: nothing to compare.
        operations = description.authorized_operations
        granted[topic] = frozenset(op.name for op in operations) if operations else None
    missing = missing_operations(needs, granted)
    if missing:
        who = f"user {settings.sasl_username}" if settings.sasl_username else "this client"
        detail = f"{who} is not granted {', '.join(missing)}"
        message = (
            f"Kafka at {settings.bootstrap_servers}: not authorized ({detail}); "
            + _HINTS["not authorized"]
        )
        raise KafkaUnavailableError(message)


def require_kafka(
    settings: KafkaSettings, *, needs: Mapping[str, frozenset[Operation]] | None = None
) -> None:
    """`check_kafka` for an entry point: on failure, exit non-zero with the one line."""
    import click

    try:
        check_kafka(settings, needs=needs)
    except KafkaUnavailableError as exc:
        raise click.ClickException(str(exc)) from exc
