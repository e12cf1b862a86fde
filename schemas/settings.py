"""Settings of every process, read from `RELATA_*` environment variables.

Each class is a pydantic-settings model that fails fast on a bad value. Nothing else in
relata reads `os.environ`; entry points build these and pass them down.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas import vocabulary

# librdkafka clients go back to the bootstrap servers after this long without a usable broker.
REBOOTSTRAP_AFTER_MS = 5000


class _Settings(BaseSettings):
    model_config = SettingsConfigDict(extra="forbid", frozen=True, validate_default=True)


class KafkaSettings(_Settings):
    model_config = SettingsConfigDict(env_prefix="RELATA_KAFKA_")

    bootstrap_servers: str = Field("127.0.0.1:9092", description="Comma-separated host:port list.")
    topic_prefix: str = Field("", description="Prefix added to every topic name.")
    partitions: int = Field(
        4,
        ge=1,
        le=1024,
        description=(
            "Partitions of topics relata creates: the most instances of one stage that share "
            "its input. `relata demo` and `relata bench` run one instance of each: 1 unless set."
        ),
    )
    replication_factor: int = Field(
        1, ge=1, le=16, description="Replication of topics relata creates."
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Kafka security.protocol."
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="SASL mechanism when security_protocol is SASL_*."
    )
    sasl_username: str | None = Field(None, description="SASL user name.")
    sasl_password: SecretStr | None = Field(None, description="SASL password.")
    ssl_cafile: Path | None = Field(
        None,
        description=(
            "CA bundle (PEM) that signs the brokers' certificates, with SSL or SASL_SSL; "
            "none: the system's."
        ),
    )
    ssl_certfile: Path | None = Field(
        None,
        description=(
            "This client's certificate (PEM, with its chain) for brokers that require client "
            "certificates (mTLS); needs RELATA_KAFKA_SSL_KEYFILE."
        ),
    )
    ssl_keyfile: Path | None = Field(
        None, description="The private key (PEM) of RELATA_KAFKA_SSL_CERTFILE."
    )
    ssl_key_password: SecretStr | None = Field(
        None, description="Password of RELATA_KAFKA_SSL_KEYFILE when the key is encrypted."
    )
    connect_timeout_s: float = Field(
        10.0,
        gt=0,
        le=300,
        description=(
            "How long each process's start-up check waits for the brokers to answer a metadata "
            "request before it exits with one line naming the cause."
        ),
    )
    client_debug: str | None = Field(
        None,
        pattern=r"^[a-z]+(,[a-z]+)*$",
        description=(
            "librdkafka debug contexts for every librdkafka client (e.g. `cgrp,consumer`), "
            "logged to stderr: for diagnosing group membership and connection problems."
        ),
    )

    @model_validator(mode="after")
    def _sasl_complete(self) -> KafkaSettings:
        if self.security_protocol.startswith("SASL") and not (
            self.sasl_mechanism and self.sasl_username and self.sasl_password
        ):
            msg = (
                f"security_protocol={self.security_protocol} needs RELATA_KAFKA_SASL_MECHANISM, "
                "RELATA_KAFKA_SASL_USERNAME and RELATA_KAFKA_SASL_PASSWORD"
            )
            raise ValueError(msg)
        return self

    @model_validator(mode="after")
    def _tls_complete(self) -> KafkaSettings:
        files = {
            "RELATA_KAFKA_SSL_CAFILE": self.ssl_cafile,
            "RELATA_KAFKA_SSL_CERTFILE": self.ssl_certfile,
            "RELATA_KAFKA_SSL_KEYFILE": self.ssl_keyfile,
        }
        given = [name for name, path in files.items() if path is not None]
        if self.ssl_key_password is not None:
            given.append("RELATA_KAFKA_SSL_KEY_PASSWORD")
        problems: list[str] = []
        if given and self.security_protocol not in ("SSL", "SASL_SSL"):
            problems.append(
                f"{', '.join(given)}: TLS settings, but RELATA_KAFKA_SECURITY_PROTOCOL is "
                f"{self.security_protocol} (use SSL or SASL_SSL)"
            )
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            problems.append(
                "a client certificate needs both RELATA_KAFKA_SSL_CERTFILE and "
                "RELATA_KAFKA_SSL_KEYFILE"
            )
        if self.ssl_key_password is not None and self.ssl_keyfile is None:
            problems.append("RELATA_KAFKA_SSL_KEY_PASSWORD is set without RELATA_KAFKA_SSL_KEYFILE")
        problems += [
            f"{name}={path} is not a readable file"
            for name, path in files.items()
            if path is not None and not path.is_file()
        ]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    def librdkafka_config(self, client_id: str | None = None) -> dict[str, str]:
        """librdkafka (confluent-kafka) client config: bootstrap servers, security (SASL
        credentials, the CA, a client certificate for mTLS), and
        `client.id` when given (which relata component a connection is, in the broker's logs,
        request metrics and quotas; librdkafka's default is "rdkafka" for every client)."""
        config = {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": self.security_protocol,
            # TCP_NODELAY: with Nagle, a small request behind an unacknowledged one waits for
            # the broker's delayed ACK (tens of ms on the latency path).
            "socket.nagle.disable": "true",
            # Topics are created by `relata.runtime.topics` from their specs, never by a client
            # that reads or writes a missing one (a broker with auto.create.topics.enable would
            # make it with the broker's defaults: wrong partitions, cleanup.policy=delete).
            # librdkafka's producers default to true, so it is set for every client.
            "allow.auto.create.topics": "false",
            # A broker that comes back fenced (its controller lease lapsed while it was away)
            # answers metadata without itself; librdkafka then drops every known broker and,
            # by default, goes back to the bootstrap servers only after 5 minutes. Within
            # seconds instead, so a process resumes as soon as the cluster does.
            "metadata.recovery.rebootstrap.trigger.ms": str(REBOOTSTRAP_AFTER_MS),
        }
        if self.security_protocol.startswith("SASL"):
            assert self.sasl_password is not None  # validated above
            config["sasl.mechanism"] = str(self.sasl_mechanism)
            config["sasl.username"] = str(self.sasl_username)
            config["sasl.password"] = self.sasl_password.get_secret_value()
        if self.ssl_cafile is not None:
            config["ssl.ca.location"] = str(self.ssl_cafile)
        if self.ssl_certfile is not None and self.ssl_keyfile is not None:
            config["ssl.certificate.location"] = str(self.ssl_certfile)
            config["ssl.key.location"] = str(self.ssl_keyfile)
        if self.ssl_key_password is not None:
            config["ssl.key.password"] = self.ssl_key_password.get_secret_value()
        if client_id is not None:
            config["client.id"] = client_id
        if self.client_debug:
            config["debug"] = self.client_debug
        return config

    def librdkafka_producer_config(self, client_id: str | None = None) -> dict[str, str]:
        """`librdkafka_config` for producers: keys partitioned like Java clients and Faust.

        librdkafka's default partitioner hashes with CRC32; Faust and the Java clients use
        murmur2. Mixing them would put one user's records on other partitions than Faust
        expects, which breaks the table routing of the HTTP API once several stream workers run.
        """
        return self.librdkafka_config(client_id) | {"partitioner": "murmur2_random"}


class StreamsSettings(_Settings):
    """The Faust stream processor: profiles, association statistics, HTTP serving."""

    model_config = SettingsConfigDict(env_prefix="RELATA_STREAMS_")

    app_id: str = Field("relata-streams", description="Faust app id (consumer group, table names).")
    role: Literal["all", "profiles", "associations"] = Field(
        "all",
        description=(
            "What this process runs: `profiles` (events to profiles and profile updates, "
            "GET /users/...), `associations` (association statistics and related-items, "
            "GET /items/...; Faust app id `<app_id>-associations`), or `all` of both in one "
            "process. Run `profiles` and `associations` as separate processes in production: "
            "then the association fold never holds up the profile agent's event loop."
        ),
    )
    store: Literal["memory://", "rocksdb://"] = Field(
        "memory://", description="Table store; both are changelog-backed."
    )
    data_dir: Path = Field(Path("/tmp/relata-streams"), description="Faust data directory.")
    web_host: str = Field("127.0.0.1", description="HTTP bind address (API and /metrics).")
    web_port: int = Field(6066, ge=0, le=65535, description="HTTP port; 0 disables the web server.")
    history_size: int = Field(50, ge=1, le=1000, description="Distinct items kept per user.")
    batch_max_events: int = Field(
        1000,
        ge=1,
        le=100_000,
        description=(
            "Events the profile agent folds per batch (one profile write and one profile update "
            "per user per batch)."
        ),
    )
    batch_wait_ms: float = Field(
        30.0,
        gt=0,
        le=10_000,
        description=(
            "Batch window of the profile agent: a batch closes this long after the previous one "
            "was handed out (adds at most this to latency, half on average). A longer window "
            "folds more of a user's events into one profile update, so under load the "
            "recommender and the broker do less work per event."
        ),
    )
    fetch_wait_ms: int = Field(
        10,
        ge=1,
        le=1_500,
        description=(
            "Longest wait of the profile agent's Kafka fetch for 64 KiB of events: under load one "
            "fetch round trip brings many events (not one per produce request), at light load it "
            "adds at most this to latency."
        ),
    )
    half_life_hours: float = Field(
        24.0 * 14, gt=0, description="Time decay half-life of history weights (event time)."
    )
    weight_view: float = Field(
        vocabulary.event_type("view").weight, description="Weight of a view."
    )
    weight_click: float = Field(
        vocabulary.event_type("click").weight, description="Weight of a click."
    )
    weight_add_to_cart: float = Field(
        vocabulary.event_type("add_to_cart").weight, description="Weight of an add-to-cart."
    )
    weight_purchase: float = Field(
        vocabulary.event_type("purchase").weight, description="Weight of a purchase."
    )
    weight_return: float = Field(
        vocabulary.event_type("return").weight,
        description="Weight of a return (negative: a rejection).",
    )

    def event_weights(self) -> dict[str, float]:
        """The profile weight of every declared event type: its `weight_<type>` setting where
        there is one, else the vocabulary's default."""
        return {
            spec.name: float(getattr(self, f"weight_{spec.name}", spec.weight))
            for spec in vocabulary.event_type_specs()
        }

    dedup_size: int = Field(
        200,
        ge=1,
        le=100_000,
        description="Recent event ids remembered per user for de-duplication.",
    )
    assoc_top_n: int = Field(50, ge=1, le=1000, description="Neighbours kept per item.")
    assoc_min_support: int = Field(
        1, ge=1, description="Co-occurrences (decayed) before a pair is published."
    )
    assoc_half_life_days: float = Field(
        90.0, gt=0, description="Time decay half-life of association counts (event time)."
    )
    assoc_session_window_s: float = Field(
        1800.0,
        gt=0,
        description="Events of one user this close form a basket when session_id is absent.",
    )
    assoc_history_window: int = Field(
        5,
        ge=0,
        le=100,
        description="Earlier history items paired with each new item (sequence co-occurrence).",
    )
    assoc_basket_pairs: int = Field(
        30,
        ge=1,
        le=1000,
        description=(
            "A new basket item pairs with at most this many most recent items of its basket "
            "(windowed co-occurrence: bounds the work per event of very large baskets)."
        ),
    )
    assoc_republish_change: float = Field(
        0.2,
        ge=0,
        le=1,
        description="Republish related-items when this share of the top list changed.",
    )
    assoc_batch_window_s: float = Field(
        5.0,
        gt=0,
        le=300,
        description=(
            "The association agent folds the inputs of this long at once and then republishes "
            "the related lists that changed: each touched item's record (and changelog record) "
            "is written once per window, so related-items lag the stream by up to this much."
        ),
    )
    trending_placement: str = Field(
        "home",
        min_length=1,
        description=(
            "Whose trending list (`trending-items`, key placement) answers "
            "GET /users/{id}/recommendations for a user with no list of their own: the "
            "recommender's RELATA_RECOMMENDER_PLACEMENT."
        ),
    )
    session_timeout_s: float = Field(10.0, gt=0, description="Kafka consumer session timeout.")
    heartbeat_interval_s: float = Field(1.0, gt=0, description="Kafka heartbeat interval.")
    commit_interval_s: float = Field(0.5, gt=0, description="Offset commit interval.")


class ReliabilitySettings(_Settings):
    """How every long-running process (`relata streams`, `relata workers`) rides out a broker
    outage, answers its probes and stops."""

    model_config = SettingsConfigDict(env_prefix="RELATA_")

    shutdown_grace_s: float = Field(
        20.0,
        gt=0,
        le=600,
        description=(
            "After SIGTERM/SIGINT a process stops within this long, even while the broker is "
            "away (what is unacknowledged then is not committed and is redone): keep it below "
            "the pod's terminationGracePeriodSeconds."
        ),
    )
    ack_timeout_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description=(
            "Outputs unacknowledged this long mean the broker is away: the process logs it "
            "once per this interval, reports not ready, and keeps waiting (nothing is dropped "
            "or committed past)."
        ),
    )
    stall_timeout_s: float = Field(
        180.0,
        gt=0,
        le=86_400,
        description=(
            "Liveness: a loop that has not come round, partitions lost, or outputs "
            "unacknowledged for this long while the broker answers mean the process is stuck "
            "(/livez fails, so Kubernetes restarts it)."
        ),
    )
    rejoin_timeout_s: float = Field(
        30.0,
        gt=0,
        le=3_600,
        description=(
            "A group consumer (the profile agent's, the workers') that has had no partitions "
            "for this long since losing them, while the brokers answer, is replaced by a new "
            "client that joins the group again."
        ),
    )
    broker_check_interval_s: float = Field(
        2.0,
        gt=0,
        le=300,
        description=(
            "How often readiness asks the brokers for metadata (each check waits as long)."
        ),
    )


class EncoderSettings(_Settings):
    """The transformer that encodes item text (and, for the `text` user vector, profiles)."""

    model_config = SettingsConfigDict(env_prefix="RELATA_ENCODER_")

    model_path: Path | None = Field(
        None,
        description="A Hugging Face model directory; default: the packaged all-MiniLM-L6-v2.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bf16 on CUDA, fp32 on CPU."
    )
    batch_size: int = Field(32, ge=1, le=4096, description="Texts per forward pass.")
    max_length: int = Field(128, ge=8, le=512, description="Token limit per text.")
    threads: int | None = Field(None, ge=1, description="torch CPU threads; default: all cores.")
    adapter_path: Path | None = Field(
        None, description="Trained adapter artifact (`relata train`); none: the frozen model."
    )
    cache_dir: Path = Field(
        Path(".cache/embeddings"), description="On-disk cache of item embeddings (evaluate)."
    )


class StoreSettings(_Settings):
    """The vector store: embedded qdrant-edge, or a Qdrant server."""

    model_config = SettingsConfigDict(env_prefix="RELATA_STORE_")

    kind: Literal["edge", "server", "local"] = Field(
        "edge",
        description="edge: in-process Qdrant engine; server: Qdrant by URL; local: qdrant-client local mode.",
    )
    path: Path = Field(Path("/tmp/relata-qdrant"), description="Directory of the edge/local store.")
    url: str | None = Field(None, description="Qdrant server URL (kind=server).")
    api_key: SecretStr | None = Field(None, description="Qdrant API key (kind=server).")
    collection: str = Field("relata-items", description="Collection of item vectors.")
    hnsw_ef: int = Field(128, ge=1, le=4096, description="HNSW search beam width.")
    search_threads: int = Field(
        1,
        ge=0,
        le=1024,
        description=(
            "Search threads of the embedded (edge) store; 0: the engine's default, one per core. "
            "One costs half the CPU per query at the recommender's 1-2 queries a batch on 2 "
            "cores; more can shorten one query over a large multi-segment store."
        ),
    )

    @model_validator(mode="after")
    def _server_needs_url(self) -> StoreSettings:
        if self.kind == "server" and not self.url:
            raise ValueError("RELATA_STORE_KIND=server needs RELATA_STORE_URL")
        return self


class RecommenderSettings(_Settings):
    """The recommender worker: micro-batching, user vectors, ranking."""

    model_config = SettingsConfigDict(env_prefix="RELATA_RECOMMENDER_")

    group_id: str = Field("relata-recommender", description="Consumer group of profile updates.")
    max_batch: int = Field(256, ge=1, le=100_000, description="Profile updates per micro-batch.")
    max_wait_ms: float = Field(
        5.0, ge=0, le=10_000, description="Longest wait to fill a micro-batch."
    )
    commit_interval_ms: float = Field(
        500.0,
        ge=0,
        le=60_000,
        description=(
            "Offsets of answered updates are committed at most this often, and when stopping "
            "(each commit is a broker write; a rebalance or crash redoes at most this much)."
        ),
    )
    k: int = Field(10, ge=1, le=200, description="Items per recommendation.")
    candidates: int = Field(100, ge=1, le=5000, description="Vector-search candidates per user.")
    user_vector: Literal["pooled", "text", "sequence"] = Field(
        "pooled",
        description=(
            "pooled: weighted mean of history item vectors; text: encode the profile text; "
            "sequence: the learned sequence user encoder (`user_encoder_path`), pooling for "
            "histories it cannot read and until an encoder is loaded."
        ),
    )
    user_encoder_path: Path | None = Field(
        None,
        description=(
            "Sequence user encoder artifact directory (`relata train` keeps one as `blend.json.user-encoder`); "
            "needs user_vector=sequence."
        ),
    )
    strategy: Literal["hybrid", "vector"] = Field(
        "hybrid", description="hybrid: behaviour + language-model blend; vector: similarity only."
    )
    blend_path: Path | None = Field(
        None, description="Blend weights artifact (`relata train`); none: built-in defaults."
    )
    mmr_lambda: float = Field(
        0.9,
        ge=0.0,
        le=1.0,
        description=(
            "Diversity: maximal marginal relevance over the item vectors after scoring; 1 keeps "
            "the score order, lower trades relevance for variety (docs/benchmarks.md)."
        ),
    )
    # 10: at 20 the pool's wording and similarities cost a fifth of the sustainable rate
    # (docs/benchmarks.md); 20 candidates still leave filters room before they fall back.
    pool_size: int = Field(
        10,
        ge=0,
        le=200,
        description=(
            "Candidates published after the k items of each list, with the catalog attributes "
            "and pairwise similarities of all, so the HTTP API and subscribers can filter and "
            "re-rank per request; at most those the ranking considered (2k, 3k with "
            "diversity). 0: none."
        ),
    )
    rules_path: Path | None = Field(
        None,
        description=(
            "Business rules file (JSON, `schemas.rules.BusinessRules`), reloaded when it "
            "changes; an invalid edit is logged and the last valid rules stay. None: no rules."
        ),
    )
    placement: str = Field(
        "home", min_length=1, description="Placement whose pinned items this recommender places."
    )
    trending_interval_s: float = Field(
        30.0,
        ge=0,
        le=3600,
        description=(
            "The trending list (the answer to a user with no usable history) is ranked this "
            "often and published to `trending-items` when its items changed, by the instance "
            "that holds partition 0 of profile-updates; 0: never."
        ),
    )
    metrics_port: int = Field(9108, ge=0, le=65535, description="Prometheus port; 0 disables.")

    @model_validator(mode="after")
    def _encoder_needs_sequence(self) -> RecommenderSettings:
        if self.user_encoder_path is not None and self.user_vector != "sequence":
            msg = (
                "RELATA_RECOMMENDER_USER_ENCODER_PATH is read only with "
                f"RELATA_RECOMMENDER_USER_VECTOR=sequence (it is {self.user_vector!r})"
            )
            raise ValueError(msg)
        return self


class IndexerSettings(_Settings):
    """The item indexer worker."""

    model_config = SettingsConfigDict(env_prefix="RELATA_INDEXER_")

    group_id: str = Field(
        "relata-indexer",
        description="Consumer group of the item catalog, suffixed `-<model version>` (one per version).",
    )
    max_batch: int = Field(512, ge=1, le=100_000, description="Catalog records per encode batch.")
    max_wait_ms: float = Field(50.0, ge=0, le=60_000, description="Longest wait to fill a batch.")
    similar_k: int = Field(
        20,
        ge=0,
        le=100,
        description=(
            "Nearest neighbours published to `similar-items` for each item indexed (what "
            "GET /items/{id}/related?kind=similar serves without a Qdrant server); 0: none."
        ),
    )
    metrics_port: int = Field(9109, ge=0, le=65535, description="Prometheus port; 0 disables.")


class EmbeddedKafkaSettings(_Settings):
    """The embedded single-node Apache Kafka (KRaft) for the demo, tests and local runs."""

    model_config = SettingsConfigDict(env_prefix="RELATA_EMBEDDED_KAFKA_")

    version: str = Field(
        "4.1.1",
        pattern=r"^\d+\.\d+\.\d+$",
        description="Apache Kafka version (org.apache.kafka:kafka_2.13) resolved from Maven.",
    )
    cache_dir: Path | None = Field(
        None, description="Directory of the resolved jars; default: ~/.cache/relata/kafka-VERSION."
    )
    port: int = Field(
        0, ge=0, le=65535, description="Broker port on 127.0.0.1; 0 picks a free one."
    )
    heap: str = Field("512m", pattern=r"^\d+[kmg]$", description="JVM heap (-Xmx) of the broker.")
    startup_timeout_s: float = Field(
        90.0, gt=0, description="Longest wait for the broker to answer after start."
    )
    data_dir: Path | None = Field(
        None,
        description=(
            "Directory that keeps the broker's data (and its ports) across restarts, formatted "
            "on first use; none: a temp dir removed on stop."
        ),
    )

    def jars_dir(self) -> Path:
        """The jar cache directory, with the default resolved against the home directory."""
        if self.cache_dir is not None:
            return self.cache_dir.expanduser()
        return Path.home() / ".cache" / "relata" / f"kafka-{self.version}"
