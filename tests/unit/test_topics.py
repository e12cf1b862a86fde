"""confluent-kafka client config from KafkaSettings, and prefixed topic names."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from relata.runtime.topics import topic_name
from schemas.settings import KafkaSettings
from schemas.topics import ITEM_CATALOG


def test_plaintext_config_has_bootstrap_protocol_and_no_nagle() -> None:
    settings = KafkaSettings(bootstrap_servers="a:1,b:2", security_protocol="PLAINTEXT")
    assert settings.librdkafka_config() == {
        "bootstrap.servers": "a:1,b:2",
        "security.protocol": "PLAINTEXT",
        "socket.nagle.disable": "true",
        "allow.auto.create.topics": "false",
        "metadata.recovery.rebootstrap.trigger.ms": "5000",
    }


def test_sasl_ssl_config_maps_credentials_and_ca(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    settings = KafkaSettings(
        bootstrap_servers="kafka:9093",
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="relata",
        sasl_password=SecretStr("s3cret"),
        ssl_cafile=ca,
    )
    assert settings.librdkafka_config() == {
        "bootstrap.servers": "kafka:9093",
        "security.protocol": "SASL_SSL",
        "socket.nagle.disable": "true",
        "allow.auto.create.topics": "false",
        "metadata.recovery.rebootstrap.trigger.ms": "5000",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "relata",
        "sasl.password": "s3cret",
        "ssl.ca.location": str(ca),
    }


def test_sasl_without_credentials_fails_fast() -> None:
    with pytest.raises(ValidationError, match="RELATA_KAFKA_SASL_PASSWORD"):
        KafkaSettings(security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN")


def test_topic_name_uses_prefix() -> None:
    assert topic_name(KafkaSettings(topic_prefix="prod."), ITEM_CATALOG) == "prod.item-catalog"


def test_producers_partition_like_faust_and_java_clients() -> None:

    config = KafkaSettings(bootstrap_servers="h:1").librdkafka_producer_config()
    assert config["partitioner"] == "murmur2_random"
    assert config["bootstrap.servers"] == "h:1"


def test_each_client_says_which_component_it_is() -> None:
    from schemas.settings import StreamsSettings
    from streams.faust_config import aiokafka_config, faust_settings

    kafka = KafkaSettings(bootstrap_servers="h:1")
    assert "client.id" not in kafka.librdkafka_config()  # librdkafka's "rdkafka" unless named
    assert kafka.librdkafka_config("relata-tail")["client.id"] == "relata-tail"
    assert kafka.librdkafka_producer_config("relata-replay")["client.id"] == "relata-replay"
    assert aiokafka_config(kafka, "relata-streams-all-catalog")["client_id"] == (
        "relata-streams-all-catalog"
    )
    for role in ("profiles", "associations"):
        settings = StreamsSettings(role=role)
        assert faust_settings(kafka, settings)["broker_client_id"] == f"relata-streams-{role}"
