"""Embedded single-node Apache Kafka (KRaft broker+controller) for the demo, tests and local runs.

The broker's jars come from `relata.runtime.kafka_jars` (Maven, cached outside git).
Each `EmbeddedKafka` formats a fresh log directory in a temp dir, runs `kafka.Kafka` on a free
loopback port and removes everything on stop; the java process never outlives its parent. With
a data directory (`--data-dir`, `RELATA_EMBEDDED_KAFKA_DATA_DIR`) the storage is formatted only
when the directory is new and kept on stop: a restart has the same cluster id, ports, topics and
records. The broker never creates a topic a client names (`auto.create.topics.enable=false`):
topics are created from their declarations (`relata.runtime.topics`).
"""

from __future__ import annotations

import atexit
import base64
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO

from relata.runtime.kafka_jars import EmbeddedKafkaError, resolve_jars, resource_text
from relata.runtime.kafka_security import (
    ADMIN,
    KafkaSecurity,
    SecurityMaterial,
    client_env,
    grant_acls,
    server_properties,
)
from schemas.settings import EmbeddedKafkaSettings

logger = logging.getLogger(__name__)

_STOP_TIMEOUT_S = 20.0
_PR_SET_PDEATHSIG = 1


class _PortTaken(EmbeddedKafkaError):
    """Another process bound the chosen port between choosing and binding it."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def free_port_besides(taken: set[int], host: str = "127.0.0.1") -> int:
    """A free port not in `taken`: the kernel may hand the same ephemeral port out again once
    its probe socket is closed, and Kafka refuses two listeners on one port."""
    while True:
        port = free_port(host)
        if port not in taken:
            taken.add(port)
            return port


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct free ports on `host`."""
    taken: set[int] = set()
    return [free_port_besides(taken, host) for _ in range(count)]


def _cluster_id() -> str:
    """A random KRaft cluster id (22 url-safe base64 chars, like `kafka-storage random-uuid`).

    Kafka's argument parser reads an id that starts with `-` as an option, so the id is passed
    as `--cluster-id=ID`; its first character is also drawn from letters to be doubly safe.
    """
    raw = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    return "k" + raw[1:] if raw[0] in "-_" else raw


def _server_properties(
    *,
    host: str,
    port: int,
    controller_port: int,
    log_dir: Path,
    overrides: Mapping[str, str] | None = None,
) -> str:
    props = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.bootstrap.servers": f"{host}:{controller_port}",
        "listeners": f"PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://{host}:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(log_dir),
        "num.partitions": "1",
        # Topics are declared (partitions, cleanup policy) and created by relata; a client that
        # names a missing topic must not get one with the broker's defaults.
        "auto.create.topics.enable": "false",
        # Single node: every internal topic with replication 1.
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "8",  # 50 by default; fewer make the first join faster
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "4",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        # Fast tests: no initial rebalance delay, short client session timeouts allowed.
        "group.initial.rebalance.delay.ms": "0",
        "group.min.session.timeout.ms": "500",
        "group.consumer.min.session.timeout.ms": "500",
        "group.consumer.min.heartbeat.interval.ms": "100",
        "num.network.threads": "2",
        "num.io.threads": "4",
        "background.threads": "4",
        "log.cleaner.threads": "1",
        # The cleaner looks for compactable logs every second (15 s by default), so a topic
        # configured to compact at once (the erasure test) does within seconds.
        "log.cleaner.backoff.ms": "1000",
        **(overrides or {}),
    }
    return "".join(f"{key}={value}\n" for key, value in props.items())


def _pdeathsig_hook() -> Callable[[], None]:
    """A pre-exec hook: the child gets SIGKILL when its parent dies (even by SIGKILL)."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here, not in the forked child

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    return hook


_WORKDIR_PREFIX = "relata-kafka-"
_OWNER_FILE = "owner.pid"
_PORTS_FILE = "ports"  # in a data dir: "PORT CONTROLLER_PORT [MTLS_PORT]", reused on restart
_META = Path("data") / "meta.properties"  # written by StorageTool format


def pid_alive(pid: int) -> bool:
    """Whether `pid` runs; a zombie (exited, not yet reaped) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def remove_stale_workdirs() -> None:
    """Remove temp dirs of brokers whose parent and java process are both gone (SIGKILLed)."""
    for path in Path(tempfile.gettempdir()).glob(f"{_WORKDIR_PREFIX}*"):
        try:
            pids = [int(x) for x in (path / _OWNER_FILE).read_text().split()]
        except (OSError, ValueError):
            continue  # starting right now, or not ours: leave it
        if pids and not any(pid_alive(pid) for pid in pids):
            logger.info("removing stale embedded kafka dir=%s", path)
            shutil.rmtree(path, ignore_errors=True)


_LIVE: weakref.WeakSet[EmbeddedKafka] = weakref.WeakSet()
_HOOKS_LOCK = threading.Lock()
_HOOKS: set[str] = set()


def _stop_all() -> None:
    for kafka in list(_LIVE):
        kafka.stop()


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Turn SIGTERM into SystemExit so context managers and atexit stop the broker.
    raise SystemExit(128 + signum)


def _install_exit_hooks() -> None:
    """atexit stops every broker; a default SIGTERM becomes SystemExit (main thread only)."""
    with _HOOKS_LOCK:
        if "atexit" not in _HOOKS:
            atexit.register(_stop_all)
            _HOOKS.add("atexit")
        is_main = threading.current_thread() is threading.main_thread()
        if "sigterm" not in _HOOKS and is_main:
            if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
                signal.signal(signal.SIGTERM, _on_sigterm)
            _HOOKS.add("sigterm")


class EmbeddedKafka:
    """A single-node KRaft Kafka on a free loopback port, in a temp dir; a context manager.

    `bootstrap_servers` is valid after `start()` (or entering the `with` block). `data_dir`
    (default: the settings') keeps the broker's data across restarts: formatted when new,
    reused with its cluster id and ports otherwise, never removed. `server_properties`
    overrides broker properties (tests). `security` makes it a secured broker
    (`relata.runtime.kafka_security`): SASL_SSL with a SCRAM user and ACLs per component,
    and an mTLS listener; `client_env` gives each component's settings.
    """

    def __init__(
        self,
        settings: EmbeddedKafkaSettings | None = None,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        java: str = "java",
        data_dir: Path | None = None,
        server_properties: Mapping[str, str] | None = None,
        security: KafkaSecurity | None = None,
    ) -> None:
        self.settings = settings if settings is not None else EmbeddedKafkaSettings()
        self.host = host
        self._requested_port = self.settings.port if port is None else port
        self._java = java
        chosen = data_dir if data_dir is not None else self.settings.data_dir
        self.data_dir = None if chosen is None else chosen.expanduser().absolute()
        self._overrides = dict(server_properties or {})
        self.security = security
        self.material: SecurityMaterial | None = None
        self.port = 0
        self.mtls_port: int | None = None
        self.workdir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_handle: IO[bytes] | None = None
        self._lock = threading.Lock()

    @property
    def bootstrap_servers(self) -> str:
        if self._proc is None:
            raise EmbeddedKafkaError("EmbeddedKafka is not running; call start() first")
        return f"{self.host}:{self.port}"

    @property
    def mtls_bootstrap_servers(self) -> str:
        """The secured broker's listener that requires client certificates."""
        if self._proc is None or self.mtls_port is None:
            raise EmbeddedKafkaError("no mTLS listener: start a secured EmbeddedKafka first")
        return f"{self.host}:{self.mtls_port}"

    def admin_config(self) -> dict[str, str]:
        """librdkafka config of the admin (a super user on a secured broker)."""
        config = {"bootstrap.servers": f"{self.host}:{self.port}"}
        if self.material is None:
            return config
        env = client_env(self.material, bootstrap_servers=config["bootstrap.servers"], user=ADMIN)
        return config | {
            "security.protocol": env["RELATA_KAFKA_SECURITY_PROTOCOL"],
            "sasl.mechanism": env["RELATA_KAFKA_SASL_MECHANISM"],
            "sasl.username": ADMIN,
            "sasl.password": env["RELATA_KAFKA_SASL_PASSWORD"],
            "ssl.ca.location": env["RELATA_KAFKA_SSL_CAFILE"],
        }

    def client_env(self, user: str, *, mtls: bool = False) -> dict[str, str]:
        """The `RELATA_KAFKA_*` settings of a secured broker's user (a component's principal,
        or the admin): SASL_SSL with its SCRAM credentials and the CA file, or (`mtls`) SSL
        with its client certificate on the mTLS listener."""
        if self.material is None:
            raise EmbeddedKafkaError("client_env needs a running EmbeddedKafka(security=...)")
        bootstrap = self.mtls_bootstrap_servers if mtls else self.bootstrap_servers
        return client_env(self.material, bootstrap_servers=bootstrap, user=user, mtls=mtls)

    @property
    def log_path(self) -> Path | None:
        """The broker's log file while it runs (removed with a temp dir on stop)."""
        return None if self.workdir is None else self.workdir / "broker.log"

    def __enter__(self) -> EmbeddedKafka:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _java_cmd(self, jars: Path, *args: str) -> list[str]:
        if shutil.which(self._java) is None:
            raise EmbeddedKafkaError(f"java ({self._java!r}) is not on PATH; Kafka needs Java 17+")
        assert self.workdir is not None
        return [
            self._java,
            f"-Xmx{self.settings.heap}",
            "-Xms128m",
            "-XX:+UseSerialGC",  # few GC threads: the test machines are small and shared
            "-XX:TieredStopAtLevel=1",  # C1 only: faster start, less JIT CPU
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.workdir / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self.workdir / 'logs'}",
            "-cp",
            f"{jars}/*",
            *args,
        ]

    def start(self) -> None:
        """Resolve the jars (once), format the log dir (a temp dir, or a new data dir) and start
        the broker; wait until ready."""
        # A data dir keeps its ports: a port taken meanwhile is an error, not a new port.
        attempts = 1 if self._requested_port or self.data_dir is not None else 3
        for attempt in range(1, attempts + 1):
            with self._lock:
                if self._proc is not None:
                    return
                jars = resolve_jars(self.settings)
                remove_stale_workdirs()
                if self.data_dir is not None:
                    self.data_dir.mkdir(parents=True, exist_ok=True)
                    self.workdir = self.data_dir
                else:
                    self.workdir = Path(tempfile.mkdtemp(prefix=_WORKDIR_PREFIX))
                try:
                    self._launch(jars)
                except BaseException:
                    self._shutdown()
                    raise
            try:
                self._wait_ready()
                return
            except _PortTaken:
                if attempt == attempts:
                    raise
                logger.warning("embedded kafka port taken; retrying attempt=%d", attempt + 1)

    def _ports(self) -> tuple[int, int, int | None]:
        """The broker, controller and mTLS ports (None: no mTLS listener): a data dir's
        recorded ones, else free ones."""
        assert self.workdir is not None
        mtls = self.security is not None and self.security.mtls
        recorded = self.workdir / _PORTS_FILE
        if self.data_dir is not None and recorded.is_file():
            port, controller_port, *rest = (int(x) for x in recorded.read_text().split())
            port = self._requested_port or port
            mtls_port = None
            if mtls:
                mtls_port = (
                    rest[0] if rest else free_port_besides({port, controller_port}, self.host)
                )
            return port, controller_port, mtls_port
        taken: set[int] = set()
        if self._requested_port:
            taken.add(self._requested_port)
        port = self._requested_port or free_port_besides(taken, self.host)
        controller_port = free_port_besides(taken, self.host)
        mtls_port = free_port_besides(taken, self.host) if mtls else None
        if self.data_dir is not None:
            extra = "" if mtls_port is None else f" {mtls_port}"
            recorded.write_text(f"{port} {controller_port}{extra}\n")
        return port, controller_port, mtls_port

    def _launch(self, jars: Path) -> None:
        assert self.workdir is not None
        self.port, controller_port, self.mtls_port = self._ports()
        overrides = self._overrides
        if self.security is not None:
            users = tuple(access.principal for access in self.security.accesses)
            self.material = SecurityMaterial.create_or_load(
                self.workdir, users=users, hosts=(self.host, "localhost")
            )
            secured = server_properties(
                self.material,
                host=self.host,
                port=self.port,
                controller_port=controller_port,
                mtls_port=self.mtls_port,
            )
            overrides = secured | overrides
        props = self.workdir / "server.properties"
        props.write_text(
            _server_properties(
                host=self.host,
                port=self.port,
                controller_port=controller_port,
                log_dir=self.workdir / "data",
                overrides=overrides,
            )
        )
        (self.workdir / "log4j2.properties").write_text(resource_text("log4j2.properties"))
        if (self.workdir / _META).is_file():
            logger.info("embedded kafka reusing storage dir=%s", self.workdir)
        else:
            self._format(jars, props)
        assert self.log_path is not None
        self._log_handle = self.log_path.open("ab")
        in_main = threading.current_thread() is threading.main_thread()
        _install_exit_hooks()
        self._proc = subprocess.Popen(
            self._java_cmd(jars, "kafka.Kafka", str(props)),
            stdin=subprocess.DEVNULL,
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            # Own session: a terminal's Ctrl-C reaches us, and we stop the broker in order.
            start_new_session=True,
            # PDEATHSIG fires when the forking *thread* exits, so only from the main thread.
            preexec_fn=_pdeathsig_hook() if in_main else None,
        )
        _LIVE.add(self)
        if self.data_dir is None:
            (self.workdir / _OWNER_FILE).write_text(f"{os.getpid()} {self._proc.pid}\n")
        logger.info(
            "embedded kafka starting pid=%d bootstrap=%s:%d log=%s",
            self._proc.pid,
            self.host,
            self.port,
            self.log_path,
        )

    def _format(self, jars: Path, props: Path) -> None:
        """Format the storage with a new cluster id (its meta.properties keeps it)."""
        fmt = subprocess.run(
            self._java_cmd(
                jars,
                "kafka.tools.StorageTool",
                "format",
                "--standalone",
                f"--cluster-id={_cluster_id()}",
                "-c",
                str(props),
                *([] if self.material is None else self.material.scram_arguments()),
            ),
            capture_output=True,
            text=True,
            check=False,
        )
        if fmt.returncode != 0:
            msg = f"kafka StorageTool format failed (exit {fmt.returncode}):\n{(fmt.stdout + fmt.stderr)[-4000:]}"
            raise EmbeddedKafkaError(msg)

    def _log_tail(self, limit: int = 4000) -> str:
        path = self.log_path
        if path is None or not path.exists():
            return ""
        return path.read_bytes()[-limit:].decode("utf-8", errors="replace")

    def _wait_ready(self) -> None:
        from confluent_kafka.admin import AdminClient

        deadline = time.monotonic() + self.settings.startup_timeout_s
        admin = AdminClient({**self.admin_config(), "log_level": 0})
        started = time.monotonic()
        while True:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                tail = self._log_tail()
                code = None if proc is None else proc.returncode
                self.stop()
                if "Address already in use" in tail:
                    raise _PortTaken(f"embedded kafka could not bind its port:\n{tail}")
                raise EmbeddedKafkaError(
                    f"embedded kafka exited during start (exit {code}):\n{tail}"
                )
            try:
                metadata = admin.list_topics(timeout=1.0)
                if metadata.brokers:
                    break
            except Exception:
                pass
            if time.monotonic() > deadline:
                tail = self._log_tail()
                self.stop()
                msg = (
                    f"embedded kafka did not answer within {self.settings.startup_timeout_s:.0f} s "
                    f"(RELATA_EMBEDDED_KAFKA_STARTUP_TIMEOUT_S):\n{tail}"
                )
                raise EmbeddedKafkaError(msg)
            time.sleep(0.2)
        if self.security is not None:
            granted = grant_acls(self.admin_config(), self.security.accesses)
            logger.info("embedded kafka ACLs granted bindings=%d", granted)
        logger.info(
            "embedded kafka ready bootstrap=%s seconds=%.1f",
            self.bootstrap_servers,
            time.monotonic() - started,
        )

    def stop(self) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after a grace period) and remove its temp dir."""
        with self._lock:
            self._shutdown()

    def _shutdown(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=_STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    logger.warning(
                        "embedded kafka did not stop in %.0f s; killing pid=%d",
                        _STOP_TIMEOUT_S,
                        proc.pid,
                    )
                    proc.kill()
                    proc.wait()
            logger.info("embedded kafka stopped pid=%d exit=%s", proc.pid, proc.returncode)
        _LIVE.discard(self)
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        if self.workdir is not None:
            if self.data_dir is None:
                shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The java process id while the broker runs."""
        return None if self._proc is None else self._proc.pid
