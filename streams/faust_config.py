"""Faust and aiokafka client configuration from the settings: brokers, credentials, TLS,
timeouts; and aiokafka's metadata requests without topic auto-creation."""

from __future__ import annotations

from typing import Any

import aiokafka.client as aiokafka_client
import faust
from aiokafka.protocol.metadata import MetadataRequest
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

from schemas.settings import KafkaSettings, StreamsSettings

from .naming import client_id


class _MetadataRequestNoAutoCreate(MetadataRequest):  # type: ignore[misc]  # aiokafka is untyped here
    """A metadata request that never asks the broker to create the topics it names."""

    def __init__(
        self, topics: list[str] | None = None, allow_auto_topic_creation: bool | None = None
    ) -> None:
        super().__init__(topics, bool(allow_auto_topic_creation))


def forbid_topic_auto_creation() -> None:
    """Make aiokafka's clients (Faust's consumer and producer, the catalog view's consumer)
    send metadata requests with `allow_auto_topic_creation=false`. Process-wide, idempotent.

    aiokafka 0.14 has no option for it and asks for auto-creation in every metadata request,
    so a broker with `auto.create.topics.enable=true` would create a missing input or output
    topic (one partition, cleanup.policy=delete) as soon as a Faust agent or the catalog view
    reads it. Faust's own internal topics (table changelogs, `association-input`) are created
    explicitly with CreateTopics (`topic_allow_declare`), which this does not touch.
    """
    aiokafka_client.MetadataRequest = _MetadataRequestNoAutoCreate


def _broker_urls(kafka: KafkaSettings) -> list[str]:
    return [f"kafka://{hp.strip()}" for hp in kafka.bootstrap_servers.split(",") if hp.strip()]


def _credentials(kafka: KafkaSettings) -> Any:
    if kafka.security_protocol.startswith("SASL"):
        assert kafka.sasl_password is not None  # KafkaSettings validates SASL completeness
        return faust.SASLCredentials(
            username=kafka.sasl_username,
            password=kafka.sasl_password.get_secret_value(),
            mechanism=kafka.sasl_mechanism,
            ssl_context=ssl_context(kafka),
        )
    if kafka.security_protocol == "SSL":
        return faust.SSLCredentials(ssl_context(kafka))
    return None


def ssl_context(kafka: KafkaSettings) -> Any:
    """The TLS context of aiokafka's clients: the brokers' CA (or the system's), host names
    verified, and this client's certificate and key when set (mTLS); None without TLS."""
    if kafka.security_protocol not in ("SSL", "SASL_SSL"):
        return None
    import ssl

    context = ssl.create_default_context(cafile=str(kafka.ssl_cafile) if kafka.ssl_cafile else None)
    if kafka.ssl_certfile is not None and kafka.ssl_keyfile is not None:
        password = kafka.ssl_key_password
        context.load_cert_chain(
            str(kafka.ssl_certfile),
            str(kafka.ssl_keyfile),
            password=None if password is None else password.get_secret_value(),
        )
    return context


def aiokafka_config(kafka: KafkaSettings, client_id: str) -> dict[str, Any]:
    """aiokafka client config (bootstrap servers, security, client id) from KafkaSettings."""
    config: dict[str, Any] = {"bootstrap_servers": kafka.bootstrap_servers, "client_id": client_id}
    credentials = _credentials(kafka)
    if credentials is not None:
        config.update(credentials_to_aiokafka_auth(credentials, None))
    return config


def faust_settings(kafka: KafkaSettings, settings: StreamsSettings) -> dict[str, Any]:
    """Faust configuration from the settings (short timeouts: a lost member is noticed in
    seconds, and a rebalance does not wait for one)."""
    session = settings.session_timeout_s
    return {
        "broker": _broker_urls(kafka),
        "broker_client_id": client_id(settings),
        "broker_credentials": _credentials(kafka),
        "store": settings.store,
        "datadir": str(settings.data_dir),
        "autodiscover": False,
        "topic_partitions": kafka.partitions,
        "topic_replication_factor": kafka.replication_factor,
        "table_standby_replicas": 1,
        "broker_session_timeout": session,
        "broker_heartbeat_interval": min(settings.heartbeat_interval_s, session / 3),
        # A member that does not rejoin within this is dropped; Faust's default (60 s) makes
        # a restart after a crash wait a minute.
        "broker_rebalance_timeout": max(2.0, session),
        "broker_request_timeout": max(90.0, session * 2),
        "broker_commit_interval": settings.commit_interval_s,
        "consumer_auto_offset_reset": "earliest",
        "producer_linger": 0.0,
        "web_enabled": settings.web_port != 0,
        "web_host": settings.web_host,
        "web_bind": settings.web_host,
        "web_port": settings.web_port or 6066,
        "worker_redirect_stdouts": False,
        "logging_config": None,
    }
