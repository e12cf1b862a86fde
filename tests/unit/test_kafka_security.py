"""Secured Kafka without a broker: client certificates in the settings and their mapping to
librdkafka and aiokafka, the access each component is declared, the start-up check's
comparison of granted operations, and the secured broker's properties and material."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from relata.runtime.kafka_security import (
    ADMIN,
    BROKER_CN,
    CertificateAuthority,
    KafkaSecurity,
    SecurityMaterial,
    acl_bindings,
    server_properties,
)
from relata.runtime.preflight import missing_operations
from schemas.access import COMPONENTS, component_access, topics_of
from schemas.settings import IndexerSettings, KafkaSettings, StreamsSettings
from schemas.topics import ALL_TOPICS
from streams.faust_config import aiokafka_config, ssl_context
from streams.naming import (
    association_input_topic,
    events_group,
    faust_app_id,
    profiles_changelog_topic,
)

KEY_PASSWORD = "k3y-pass"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A CA and a client certificate whose key is encrypted with KEY_PASSWORD."""
    directory = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority.create(directory)
    cert, key = ca.issue("relata-indexer", directory, key_password=KEY_PASSWORD)
    return ca.cert_path, cert, key


def _mtls(pki: tuple[Path, Path, Path], **extra: object) -> KafkaSettings:
    ca, cert, key = pki
    values: dict[str, object] = {
        "bootstrap_servers": "kafka:9094",
        "security_protocol": "SSL",
        "ssl_cafile": ca,
        "ssl_certfile": cert,
        "ssl_keyfile": key,
        "ssl_key_password": SecretStr(KEY_PASSWORD),
    }
    return KafkaSettings(**(values | extra))  # type: ignore[arg-type]  # keyword values


def test_client_certificate_maps_to_librdkafka(pki: tuple[Path, Path, Path]) -> None:
    ca, cert, key = pki
    config = _mtls(pki).librdkafka_config("relata-indexer")
    assert config["security.protocol"] == "SSL"
    assert config["ssl.ca.location"] == str(ca)
    assert config["ssl.certificate.location"] == str(cert)
    assert config["ssl.key.location"] == str(key)
    assert config["ssl.key.password"] == KEY_PASSWORD
    assert "sasl.mechanism" not in config


def test_client_certificate_loads_into_the_aiokafka_context(
    pki: tuple[Path, Path, Path],
) -> None:
    settings = _mtls(pki)
    context = ssl_context(settings)
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    config = aiokafka_config(settings, "relata-test")
    assert config["security_protocol"] == "SSL"
    assert config["ssl_context"] is not None


def test_a_wrong_key_password_fails_when_the_context_is_built(
    pki: tuple[Path, Path, Path],
) -> None:
    with pytest.raises(ssl.SSLError):
        ssl_context(_mtls(pki, ssl_key_password=SecretStr("wrong")))


def test_sasl_ssl_with_client_certificate_has_both(pki: tuple[Path, Path, Path]) -> None:
    settings = _mtls(
        pki,
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="relata-indexer",
        sasl_password=SecretStr("pw"),
    )
    config = settings.librdkafka_config()
    assert config["sasl.username"] == "relata-indexer"
    assert config["ssl.certificate.location"].endswith("relata-indexer.pem")
    assert "pw" not in repr(settings) and KEY_PASSWORD not in repr(settings)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ssl_certfile": None}, "needs both RELATA_KAFKA_SSL_CERTFILE and"),
        ({"ssl_keyfile": None}, "needs both RELATA_KAFKA_SSL_CERTFILE and"),
        ({"ssl_keyfile": None, "ssl_certfile": None}, "PASSWORD is set without"),
        ({"security_protocol": "PLAINTEXT"}, "RELATA_KAFKA_SECURITY_PROTOCOL is PLAINTEXT"),
        ({"ssl_certfile": Path("/nonexistent/c.pem")}, "c.pem is not a readable file"),
        ({"ssl_cafile": Path("/nonexistent/ca.pem")}, "ca.pem is not a readable file"),
    ],
)
def test_incomplete_tls_settings_fail_fast(
    pki: tuple[Path, Path, Path], change: dict[str, object], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        _mtls(pki, **change)


def test_client_certificate_settings_read_from_the_environment(
    pki: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    ca, cert, key = pki
    for name, value in {
        "SECURITY_PROTOCOL": "SSL",
        "SSL_CAFILE": str(ca),
        "SSL_CERTFILE": str(cert),
        "SSL_KEYFILE": str(key),
        "SSL_KEY_PASSWORD": KEY_PASSWORD,
    }.items():
        monkeypatch.setenv(f"RELATA_KAFKA_{name}", value)
    settings = KafkaSettings()
    assert settings.ssl_key_password is not None
    assert settings.ssl_key_password.get_secret_value() == KEY_PASSWORD
    assert settings.librdkafka_config()["ssl.key.location"] == str(key)


# -- the access of each component


def test_each_component_reads_and_writes_exactly_its_topics() -> None:
    kafka = KafkaSettings(topic_prefix="p.")
    access = component_access(kafka, indexer=IndexerSettings(group_id="ix"))
    assert access["indexer"].topics() == {
        "p.item-catalog": {"READ", "DESCRIBE", "DESCRIBE_CONFIGS"},
        "p.similar-items": {"WRITE", "DESCRIBE", "DESCRIBE_CONFIGS"},
        "p.dead-letter": {"WRITE", "DESCRIBE", "DESCRIBE_CONFIGS"},
    }
    # One indexer group per model version: `ix-<version>`.
    assert access["indexer"].operations("group", "ix-0a1b2c3d4e5f") == {"READ", "DESCRIBE"}
    assert not access["indexer"].operations("group", "other-ix")
    recommender = access["recommender"]
    assert recommender.operations("topic", "p.profile-updates") >= {"READ"}
    assert "WRITE" in recommender.operations("topic", "p.recommendations")
    assert "WRITE" in recommender.operations("topic", "p.trending-items")
    assert not recommender.operations("topic", "p.behavior-events")
    # One producer per compacted topic: the indexer writes similar lists, the recommender the
    # trending list, and the stream processor only reads both.
    assert not recommender.operations("topic", "p.similar-items")
    assert not access["indexer"].operations("topic", "p.trending-items")
    for name in ("p.similar-items", "p.trending-items"):
        assert access["streams"].operations("topic", name) == {
            "READ",
            "DESCRIBE",
            "DESCRIBE_CONFIGS",
        }
    # The union of both loops for `relata workers --role all`.
    workers = access["workers"]
    assert workers.topics()["p.dead-letter"] == {"WRITE", "DESCRIBE", "DESCRIBE_CONFIGS"}
    assert set(workers.topics()) == set(access["indexer"].topics()) | set(recommender.topics())
    assert {spec.name for spec in topics_of(workers, kafka)} == {
        "item-catalog",
        "dead-letter",
        "profile-updates",
        "related-items",
        "recommendations",
        "similar-items",
        "trending-items",
        "recommendations-shadow",
    }
    # Everything but the shadow's lists, which only the recommender and live quality use.
    assert len(topics_of(access["streams"], kafka)) == len(ALL_TOPICS) - 1
    assert [a.principal for a in access.values()] == [f"relata-{c}" for c in COMPONENTS]
    # Nobody but the tools creates a declared topic.
    for component in ("streams", "indexer", "recommender", "workers", "quality"):
        assert all("CREATE" not in ops for ops in access[component].topics().values())
    assert all("CREATE" in ops for ops in access["tools"].topics().values())


def test_the_stream_processor_owns_every_name_it_derives() -> None:
    kafka, streams = KafkaSettings(topic_prefix="p."), StreamsSettings(app_id="rs")
    access = component_access(kafka, streams=streams)["streams"]
    for role in ("all", "profiles", "associations"):
        settings = streams.model_copy(update={"role": role})
        for topic in (
            association_input_topic(kafka, settings),
            profiles_changelog_topic(kafka, settings),
            f"{faust_app_id(kafka, settings)}-recommendations-changelog",
            f"{faust_app_id(kafka, settings)}-__assignor-__leader",
        ):
            assert {"READ", "WRITE", "CREATE"} <= access.operations("topic", topic), topic
        for group in (faust_app_id(kafka, settings), events_group(kafka, settings)):
            assert "READ" in access.operations("group", group), group


def test_acl_bindings_name_the_principal_and_pattern() -> None:
    from confluent_kafka.admin import (  # type: ignore[attr-defined]  # re-exported at runtime
        AclOperation,
        ResourcePatternType,
        ResourceType,
    )

    access = component_access(KafkaSettings(topic_prefix="p."), streams=StreamsSettings())
    bindings = acl_bindings(access["streams"])
    assert {b.principal for b in bindings} == {"User:relata-streams"}
    prefixed = [b for b in bindings if b.resource_pattern_type == ResourcePatternType.PREFIXED]
    assert {(b.restype, b.name) for b in prefixed} == {
        (ResourceType.TOPIC, "p.relata-streams"),
        (ResourceType.GROUP, "p.relata-streams"),
    }
    ops = {b.operation for b in bindings if b.name == "p.erasure-requests"}
    assert ops == {AclOperation.READ, AclOperation.DESCRIBE, AclOperation.DESCRIBE_CONFIGS}
    # It forwards erasure requests into the user's event stream.
    ops = {b.operation for b in bindings if b.name == "p.behavior-events"}
    assert AclOperation.WRITE in ops and AclOperation.READ in ops


def test_missing_operations_name_each_topic_and_skip_the_unknown() -> None:
    needs = {
        "t.a": frozenset({"READ", "DESCRIBE"}),
        "t.b": frozenset({"WRITE", "DESCRIBE", "CREATE"}),
        "t.c": frozenset({"READ"}),
    }
    granted: dict[str, frozenset[str] | None] = {
        "t.a": frozenset({"DESCRIBE"}),
        "t.b": frozenset({"WRITE", "DESCRIBE"}),  # CREATE only matters for a missing topic
        "t.c": None,  # no authorizer, or not there yet
    }
    assert missing_operations(needs, granted) == ["READ on topic t.a"]  # type: ignore[arg-type]
    assert missing_operations(needs, {"t.a": frozenset()}) == [  # type: ignore[arg-type]
        "DESCRIBE on topic t.a",
        "READ on topic t.a",
    ]


# -- the secured broker


def test_secured_broker_properties_and_material(tmp_path: Path) -> None:
    users = ("relata-streams", "relata-indexer")
    material = SecurityMaterial.create_or_load(tmp_path, users=users, hosts=("127.0.0.1",))
    props = server_properties(material, host="127.0.0.1", port=1, controller_port=2, mtls_port=3)
    assert props["listeners"] == (
        "SASL_SSL://127.0.0.1:1,CONTROLLER://127.0.0.1:2,MTLS://127.0.0.1:3"
    )
    assert "CONTROLLER" not in props["advertised.listeners"]
    assert props["listener.security.protocol.map"] == "SASL_SSL:SASL_SSL,CONTROLLER:SSL,MTLS:SSL"
    assert props["listener.name.mtls.ssl.client.auth"] == "required"
    assert props["ssl.keystore.type"] == props["ssl.truststore.type"] == "PEM"
    assert props["super.users"] == f"User:{ADMIN};User:{BROKER_CN}"
    assert (
        material.passwords[ADMIN] in props["listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config"]
    )
    keystore = material.broker_keystore.read_text()
    assert keystore.startswith("-----BEGIN PRIVATE KEY-----")  # PKCS#8, as Kafka reads it
    assert "BEGIN CERTIFICATE" in keystore
    assert material.broker_keystore.stat().st_mode & 0o077 == 0
    args = material.scram_arguments()
    assert args.count("--add-scram") == 3
    assert (
        f"SCRAM-SHA-512=[name=relata-indexer,password={material.passwords['relata-indexer']}]"
        in args
    )
    # Kept with the storage: a restart reuses the CA and the passwords.
    again = SecurityMaterial.create_or_load(tmp_path, users=users, hosts=("127.0.0.1",))
    assert again.passwords == material.passwords
    assert again.ca_file.read_bytes() == material.ca_file.read_bytes()
    assert KafkaSecurity(()).mtls


def test_settings_acls_names_the_environments_prefix_and_groups(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from click.testing import CliRunner

    from relata.cli.settings_doc import command

    monkeypatch.setenv("RELATA_KAFKA_TOPIC_PREFIX", "shop.")
    monkeypatch.setenv("RELATA_INDEXER_GROUP_ID", "shop-indexer")
    result = CliRunner().invoke(command, ["--acls"])
    assert result.exit_code == 0, result.output
    assert (
        "| `User:relata-indexer` | relata workers --role indexer | topic `shop.item-catalog` |"
        in (result.output)
    )
    assert "group `shop-indexer` | PREFIXED | DESCRIBE, READ |" in result.output
    assert "topic `shop.relata-streams` | PREFIXED |" in result.output
