"""A secured embedded broker: TLS made at start, SCRAM users created with the storage, ACLs per
component.

Listeners of a secured single-node KRaft broker (all on the loopback host):

- `SASL_SSL`: the clients' listener, SCRAM-SHA-512 over TLS; also the inter-broker listener
  (the broker authenticates as the admin, a super user).
- `CONTROLLER`: TLS with client certificates required; the broker talks to its own controller
  with its certificate (`CN=relata-broker`, a super user). SCRAM cannot serve the controller
  listener in KRaft: its credentials live in the metadata the controller serves.
- `MTLS`: TLS with client certificates required (`ssl.client.auth=required`), for clients that
  authenticate by certificate; a certificate's CN is its principal (`CN=relata-indexer` is
  `User:relata-indexer`), so the same ACLs apply on both listeners.

The CA, the broker's key and certificate and the users' passwords are made when the storage is
formatted and kept with it (`security/` of the work or data directory); ACLs are granted from
`schemas.access` by the admin once the broker answers.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from schemas.access import Access

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey
    from cryptography.x509 import Certificate

MECHANISM = "SCRAM-SHA-512"
ADMIN = "relata-admin"
BROKER_CN = "relata-broker"
_DIR = "security"
_CREDENTIALS = "credentials.json"
# Test and local brokers: long enough for any run, short enough to be obviously not production.
_VALIDITY = timedelta(days=30)


class KafkaSecurityError(RuntimeError):
    """The secured broker's material could not be made, or its ACLs could not be granted."""


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret (key, passwords) readable by the owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


@dataclass(frozen=True)
class CertificateAuthority:
    """A CA that signs the broker's certificate and clients' certificates (EC P-256)."""

    cert: Certificate
    key: EllipticCurvePrivateKey
    cert_path: Path

    @classmethod
    def create(cls, directory: Path, *, name: str = "relata test CA") -> CertificateAuthority:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        directory.mkdir(parents=True, exist_ok=True)
        cert_path = directory / "ca.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_private(directory / "ca-key.pem", _key_pem(key, None))
        return cls(cert, key, cert_path)

    @classmethod
    def load(cls, directory: Path) -> CertificateAuthority:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        cert_path = directory / "ca.pem"
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key((directory / "ca-key.pem").read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cls(cert, key, cert_path)

    def issue(
        self,
        common_name: str,
        directory: Path,
        *,
        hosts: tuple[str, ...] = (),
        key_password: str | None = None,
    ) -> tuple[Path, Path]:
        """A key and a certificate for `common_name` (server and client use; `hosts` as
        subject alternative names), written as `<cn>.pem` and `<cn>-key.pem` (PKCS#8,
        encrypted with `key_password` when given). Returns (certificate, key) paths."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
        )
        if hosts:
            names: list[x509.GeneralName] = []
            for host in hosts:
                try:
                    names.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    names.append(x509.DNSName(host))
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        directory.mkdir(parents=True, exist_ok=True)
        cert_path, key_path = directory / f"{common_name}.pem", directory / f"{common_name}-key.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_private(key_path, _key_pem(key, key_password))
        return cert_path, key_path


def _key_pem(key: EllipticCurvePrivateKey, password: str | None) -> bytes:
    """PKCS#8 PEM: the one private-key format Kafka's PEM key store reads."""
    from cryptography.hazmat.primitives import serialization

    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password.encode())
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


@dataclass(frozen=True)
class KafkaSecurity:
    """What a secured embedded broker serves: one SCRAM user and its ACLs per component (see
    `schemas.access.component_access`), the admin as super user, and an mTLS listener."""

    accesses: tuple[Access, ...]
    mtls: bool = True


@dataclass(frozen=True)
class SecurityMaterial:
    """The CA, the broker's key store and every user's password, in `directory`."""

    directory: Path
    ca: CertificateAuthority
    broker_keystore: Path
    passwords: Mapping[str, str] = field(repr=False)

    @property
    def ca_file(self) -> Path:
        return self.ca.cert_path

    @classmethod
    def create_or_load(
        cls, workdir: Path, *, users: tuple[str, ...], hosts: tuple[str, ...]
    ) -> SecurityMaterial:
        """Load the material kept in `workdir/security`, or make it (new CA, broker key and
        certificate, a random password and a client certificate per user). Users added since
        are given theirs."""
        directory = workdir / _DIR
        credentials = directory / _CREDENTIALS
        if credentials.is_file():
            ca = CertificateAuthority.load(directory)
            passwords: dict[str, str] = json.loads(credentials.read_text())
        else:
            ca = CertificateAuthority.create(directory)
            passwords = {}
            cert, key = ca.issue(BROKER_CN, directory, hosts=hosts)
            # The PEM key store: the private key, then the certificate chain.
            _write_private(directory / "broker-keystore.pem", key.read_bytes() + cert.read_bytes())
        for user in (ADMIN, *users):
            if user not in passwords:
                passwords[user] = secrets.token_urlsafe(24)
                ca.issue(user, directory)  # for the mTLS listener: CN=user is User:user
        _write_private(credentials, json.dumps(passwords, indent=2).encode())
        return cls(directory, ca, directory / "broker-keystore.pem", passwords)

    def scram_arguments(self) -> list[str]:
        """`StorageTool format` arguments that create every user's SCRAM credential."""
        args: list[str] = []
        for user, password in self.passwords.items():
            args += ["--add-scram", f"{MECHANISM}=[name={user},password={password}]"]
        return args


def server_properties(
    material: SecurityMaterial,
    *,
    host: str,
    port: int,
    controller_port: int,
    mtls_port: int | None,
) -> dict[str, str]:
    """Broker properties of the secured listeners, authentication and the authorizer."""
    listeners = [f"SASL_SSL://{host}:{port}", f"CONTROLLER://{host}:{controller_port}"]
    advertised = [f"SASL_SSL://{host}:{port}"]
    protocols = ["SASL_SSL:SASL_SSL", "CONTROLLER:SSL"]
    props = {
        "inter.broker.listener.name": "SASL_SSL",
        "sasl.enabled.mechanisms": MECHANISM,
        "sasl.mechanism.inter.broker.protocol": MECHANISM,
        f"listener.name.sasl_ssl.{MECHANISM.lower()}.sasl.jaas.config": (
            "org.apache.kafka.common.security.scram.ScramLoginModule required "
            f'username="{ADMIN}" password="{material.passwords[ADMIN]}";'
        ),
        "ssl.keystore.type": "PEM",
        "ssl.keystore.location": str(material.broker_keystore),
        "ssl.truststore.type": "PEM",
        "ssl.truststore.location": str(material.ca_file),
        "listener.name.controller.ssl.client.auth": "required",
        # A certificate's CN is its principal: CN=relata-indexer is User:relata-indexer.
        "ssl.principal.mapping.rules": "RULE:^CN=([^,]+)$/$1/,DEFAULT",
        "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "super.users": f"User:{ADMIN};User:{BROKER_CN}",
        "allow.everyone.if.no.acl.found": "false",
    }
    if mtls_port is not None:
        listeners.append(f"MTLS://{host}:{mtls_port}")
        advertised.append(f"MTLS://{host}:{mtls_port}")
        protocols.append("MTLS:SSL")
        props["listener.name.mtls.ssl.client.auth"] = "required"
    return {
        "listeners": ",".join(listeners),
        "advertised.listeners": ",".join(advertised),
        "listener.security.protocol.map": ",".join(protocols),
        **props,
    }


def client_env(
    material: SecurityMaterial, *, bootstrap_servers: str, user: str, mtls: bool = False
) -> dict[str, str]:
    """The `RELATA_KAFKA_*` settings of a client that authenticates as `user`: SASL_SSL with
    its password, or (`mtls`, for the mTLS listener) SSL with its client certificate."""
    if mtls:
        return {
            "RELATA_KAFKA_BOOTSTRAP_SERVERS": bootstrap_servers,
            "RELATA_KAFKA_SECURITY_PROTOCOL": "SSL",
            "RELATA_KAFKA_SSL_CAFILE": str(material.ca_file),
            "RELATA_KAFKA_SSL_CERTFILE": str(material.directory / f"{user}.pem"),
            "RELATA_KAFKA_SSL_KEYFILE": str(material.directory / f"{user}-key.pem"),
        }
    return {
        "RELATA_KAFKA_BOOTSTRAP_SERVERS": bootstrap_servers,
        "RELATA_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "RELATA_KAFKA_SASL_MECHANISM": MECHANISM,
        "RELATA_KAFKA_SASL_USERNAME": user,
        "RELATA_KAFKA_SASL_PASSWORD": material.passwords[user],
        "RELATA_KAFKA_SSL_CAFILE": str(material.ca_file),
    }


def acl_bindings(access: Access) -> list[Any]:
    """The ALLOW ACL bindings (confluent-kafka `AclBinding`) of one component's grants."""
    from confluent_kafka.admin import (  # type: ignore[attr-defined]  # re-exported at runtime
        AclBinding,
        AclOperation,
        AclPermissionType,
        ResourcePatternType,
        ResourceType,
    )

    bindings = []
    for grant in access.grants:
        resource = ResourceType.TOPIC if grant.resource == "topic" else ResourceType.GROUP
        pattern = ResourcePatternType.PREFIXED if grant.prefixed else ResourcePatternType.LITERAL
        for operation in sorted(grant.operations):
            bindings.append(
                AclBinding(
                    resource,
                    grant.name,
                    pattern,
                    f"User:{access.principal}",
                    "*",
                    AclOperation[operation],
                    AclPermissionType.ALLOW,
                )
            )
    return bindings


def grant_acls(admin_config: Mapping[str, Any], accesses: tuple[Access, ...]) -> int:
    """Create the ACLs of `accesses` as the admin; returns how many bindings were created."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    bindings = [binding for access in accesses for binding in acl_bindings(access)]
    if not bindings:
        return 0
    admin = AdminClient(dict(admin_config))
    for binding, future in admin.create_acls(bindings, request_timeout=30).items():
        try:
            future.result()
        except KafkaException as exc:
            msg = f"cannot create ACL {binding}: {exc}"
            raise KafkaSecurityError(msg) from exc
    return len(bindings)


def create_user(admin_config: Mapping[str, Any], user: str, password: str) -> None:
    """Create (or reset) a SCRAM user on a running broker, as the admin."""
    from confluent_kafka.admin import (  # type: ignore[attr-defined]  # re-exported at runtime
        AdminClient,
        ScramCredentialInfo,
        ScramMechanism,
        UserScramCredentialUpsertion,
    )

    admin = AdminClient(dict(admin_config))
    info = ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 8192)
    upsert = UserScramCredentialUpsertion(user, info, password.encode())
    for future in admin.alter_user_scram_credentials([upsert]).values():
        future.result()
