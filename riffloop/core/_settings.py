"""One typed, frozen settings object per process, read once from ``RIFFLOOP_*`` variables.

Every dataclass field ``name`` is read from ``RIFFLOOP_<NAME>``; an unknown ``RIFFLOOP_*`` variable
or a value that does not parse or is out of range raises :class:`ConfigurationError` with one
sentence naming the variable (nanoGPT's configurator rejects unknown keys the same way). Services
that need more settings subclass :class:`Settings` with extra fields; ``from_env`` picks them up.

``run_main(main)`` turns a ``ConfigurationError`` at start-up into one line on stderr and exit 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import sys
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, Self, get_args, get_origin
from urllib.parse import SplitResult, urlsplit

from riffloop.core._errors import ConfigurationError, TransientError, ValidationError

PREFIX = "RIFFLOOP_"
_TOPIC_PREFIX = re.compile(r"[A-Za-z0-9._-]{1,100}")
_BUCKET_PREFIX = re.compile(r"[a-z][a-z0-9-]{0,23}")
_MASK = "****"

Backend = Literal["embedded", "real"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
KafkaSecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
KafkaSaslMechanism = Literal["SCRAM-SHA-256", "SCRAM-SHA-512"]


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "riffloop"


def secret(default: str = "") -> Any:
    """A field whose value never appears in ``repr`` or ``describe()``."""
    return dataclasses.field(default=default, metadata={"secret": True})


@dataclasses.dataclass(frozen=True, repr=False)
class Settings:
    """Process settings. Construct with :meth:`from_env`; direct construction validates too."""

    # Wiring: "embedded" = in-process bus, local-dir object store, in-memory KV; "real" = Kafka,
    # S3 (MinIO or any S3), Redis.
    backend: Backend = "embedded"
    service_name: str = "riffloop"
    kafka_bootstrap: str = ""
    # Topics are created with this many partitions (plus a "<topic>.dlq" twin).
    kafka_partitions: int = 3
    kafka_replication_factor: int = 1
    # Copies a write must reach before the broker acknowledges it (topic config
    # min.insync.replicas of the topics created here; producers use acks=all). 1 on a one-broker
    # stack; with 3 copies, 2 keeps a topic writable through one broker's loss and never
    # acknowledges a write only one broker holds.
    kafka_min_insync_replicas: int = 1
    # How long a dead-letter topic keeps its records (retention.ms of every "<topic>.dlq"): the
    # time an operator has to fix a bug and replay them (python -m riffloop.core replay-dlq).
    kafka_dlq_retention_s: int = 14 * 24 * 3600
    # The longest one publish waits for the broker's verdict. The producer's delivery timeout
    # (its retries included) is derived to end inside it (KafkaEventBus), so when publish
    # returns, the record is either acknowledged or will never be sent again: a client that
    # saw UNAVAILABLE and retries cannot race a late first copy. Clients' deadlines must be
    # longer (riffloop.client's default is 10 s).
    kafka_publish_timeout_s: float = 5.0
    # Prepended to every topic name on the broker ("" = none): several Riffloop deployments (or
    # test stacks) share one Kafka cluster without reading each other's events.
    kafka_topic_prefix: str = ""
    # Producer linger (ms): concurrent publishes (the gateway's RPC threads) share a request.
    kafka_linger_ms: int = 0
    # Longest a consumer may spend on one batch of records before the group drops it and hands
    # its partitions to another member (Kafka's max.poll.interval.ms). The trainer handles a
    # training set in its consumer thread, so its default is longer (TrainerSettings).
    kafka_max_poll_interval_s: float = 300.0
    # How clients reach the brokers: PLAINTEXT (the local stack), SSL (TLS), SASL_PLAINTEXT or
    # SASL_SSL (SCRAM user and password; SASL_SSL also TLS). TLS verifies the brokers'
    # certificates and host names against kafka_ssl_cafile (required with TLS: a PEM bundle).
    kafka_security_protocol: KafkaSecurityProtocol = "PLAINTEXT"
    kafka_sasl_mechanism: KafkaSaslMechanism = "SCRAM-SHA-512"
    kafka_sasl_username: str = ""
    kafka_sasl_password: str = secret()
    kafka_ssl_cafile: str = ""
    s3_endpoint: str = ""
    s3_access_key: str = ""
    s3_secret_key: str = secret()
    s3_region: str = "us-east-1"
    s3_secure: bool = False
    # Prepended to every bucket name on the server ("" = none), as kafka_topic_prefix is to
    # topics: several deployments share one S3 without reading each other's objects.
    s3_bucket_prefix: str = ""
    redis_url: str = ""
    grpc_port: int = 50051
    metrics_port: int = 9100
    # Object store directory of the embedded backend.
    data_dir: Path = Path(".riffloop/data")
    # Downloads and builds (venv, Kafka jars, MinIO binary, corpus, base checkpoint).
    cache: Path = dataclasses.field(default_factory=_default_cache_dir)
    # Consumer loop: tries per message before "<topic>.dlq"; first retry back-off (then doubles).
    consumer_max_attempts: int = 3
    consumer_retry_backoff_s: float = 0.2
    consumer_poll_timeout_s: float = 0.5
    # How long a handled event_id is remembered for deduplication (default 7 days).
    dedupe_ttl_s: int = 7 * 24 * 3600
    log_level: LogLevel = "INFO"

    _REQUIRED_FOR_REAL: ClassVar[tuple[str, ...]] = ("kafka_bootstrap", "s3_endpoint", "redis_url")
    # RIFFLOOP_* variables of the tooling, not of a process: bin/riffloop's interpreter choice and
    # the test suite's shared-servers file. Exported in a developer's shell, they reach every
    # process started from it, so they are tolerated rather than rejected.
    TOOLING_VARIABLES: ClassVar[frozenset[str]] = frozenset(
        {"RIFFLOOP_PYTHON", "RIFFLOOP_TEST_INFRA_ENV"}
    )

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Self:
        """Read every field from ``RIFFLOOP_<FIELD>``; reject unknown ``RIFFLOOP_*`` names."""
        env = os.environ if environ is None else environ
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        known = {env_name(name) for name in fields}
        unknown = sorted(
            k
            for k in env
            if k.startswith(PREFIX) and k not in known and k not in cls.TOOLING_VARIABLES
        )
        if unknown:
            close = difflib.get_close_matches(unknown[0], sorted(known), n=1, cutoff=0.8)
            hint = (
                f"did you mean {close[0]}?"
                if close
                else f"known settings are {', '.join(sorted(known))}"
            )
            raise ConfigurationError(f"unknown setting {unknown[0]}; {hint}")
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for name in fields:
            variable = env_name(name)
            if variable in env:
                values[name] = _parse(variable, env[variable], hints[name])
        return cls(**values)

    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:
        for port_field in ("grpc_port", "metrics_port"):
            port = getattr(self, port_field)
            if not 0 <= port <= 65535:
                _fail(port_field, f"must be a port number 0–65535, got {port}")
        if self.kafka_partitions < 1:
            _fail("kafka_partitions", f"must be at least 1, got {self.kafka_partitions}")
        if self.kafka_replication_factor < 1:
            _fail(
                "kafka_replication_factor",
                f"must be at least 1, got {self.kafka_replication_factor}",
            )
        if not 1 <= self.kafka_min_insync_replicas <= self.kafka_replication_factor:
            _fail(
                "kafka_min_insync_replicas",
                f"must lie in 1–RIFFLOOP_KAFKA_REPLICATION_FACTOR ({self.kafka_replication_factor}"
                f"), got {self.kafka_min_insync_replicas}: more than the copies a topic has "
                "refuses every write",
            )
        if not 3600 <= self.kafka_dlq_retention_s <= 365 * 24 * 3600:
            _fail(
                "kafka_dlq_retention_s",
                f"must lie in 1 hour – 365 days (in seconds), got {self.kafka_dlq_retention_s}",
            )
        if not 1.0 <= self.kafka_publish_timeout_s <= 60.0:
            _fail(
                "kafka_publish_timeout_s",
                f"must lie in 1–60 s, got {self.kafka_publish_timeout_s}",
            )
        from riffloop.core._kafka_event_bus import producer_timeouts  # (kafka loads lazily)

        try:
            producer_timeouts(self.kafka_publish_timeout_s, self.kafka_linger_ms)
        except ValidationError as exc:
            _fail("kafka_publish_timeout_s", f"is too short for RIFFLOOP_KAFKA_LINGER_MS: {exc}")
        if self.consumer_max_attempts < 1:
            _fail("consumer_max_attempts", f"must be at least 1, got {self.consumer_max_attempts}")
        if self.consumer_retry_backoff_s < 0:
            _fail("consumer_retry_backoff_s", "must not be negative")
        if self.consumer_poll_timeout_s <= 0:
            _fail("consumer_poll_timeout_s", "must be positive")
        if self.dedupe_ttl_s < 1:
            _fail("dedupe_ttl_s", f"must be at least 1 second, got {self.dedupe_ttl_s}")
        if not self.service_name or not all(c.isalnum() or c in "-_" for c in self.service_name):
            _fail("service_name", "must be non-empty letters, digits, '-' or '_'")
        if not 10 <= self.kafka_max_poll_interval_s <= 86_400:
            _fail(
                "kafka_max_poll_interval_s",
                f"must lie in 10–86,400 s, got {self.kafka_max_poll_interval_s}",
            )
        if not 0 <= self.kafka_linger_ms <= 1000:
            _fail("kafka_linger_ms", f"must lie in 0–1000, got {self.kafka_linger_ms}")
        if self.kafka_topic_prefix and not _TOPIC_PREFIX.fullmatch(self.kafka_topic_prefix):
            _fail(
                "kafka_topic_prefix",
                f"must be ≤ 100 letters, digits, '.', '_' or '-', got {self.kafka_topic_prefix!r}",
            )
        if self.s3_bucket_prefix and not _BUCKET_PREFIX.fullmatch(self.s3_bucket_prefix):
            _fail(
                "s3_bucket_prefix",
                "must be ≤ 24 lower-case letters, digits or '-', starting with a letter, got "
                f"{self.s3_bucket_prefix!r}",
            )
        self._validate_kafka_security()
        if self.kafka_bootstrap:
            for server in self.kafka_bootstrap.split(","):
                host, _, port = server.strip().rpartition(":")
                if not host or not port.isdigit():
                    _fail("kafka_bootstrap", f"must be host:port[,host:port...], got {server!r}")
        if self.s3_endpoint:
            split = urlsplit(
                self.s3_endpoint if "://" in self.s3_endpoint else f"//{self.s3_endpoint}"
            )
            if (
                split.scheme not in ("", "http", "https")
                or not split.hostname
                or split.path.strip("/")
                or split.query
                or _bad_port(split)
            ):
                _fail(
                    "s3_endpoint",
                    f"must be host:port or http(s)://host:port, got {self.s3_endpoint!r}",
                )
        if self.redis_url:
            split = urlsplit(self.redis_url)
            if split.scheme not in ("redis", "rediss", "unix"):
                _fail("redis_url", "must start with redis://, rediss:// or unix://")
            if _bad_port(split):
                _fail("redis_url", f"has a port that is not a number 1–65535: {self.redis_url!r}")
        if self.backend == "real":
            for name in self._REQUIRED_FOR_REAL:
                if not getattr(self, name):
                    _fail(name, "is required when RIFFLOOP_BACKEND=real")

    def _validate_kafka_security(self) -> None:
        """SASL needs a user and a password, and only SASL takes them; TLS needs a CA file."""
        sasl = self.kafka_security_protocol.startswith("SASL_")
        tls = self.kafka_security_protocol in ("SSL", "SASL_SSL")
        protocol = f"RIFFLOOP_KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol}"
        if sasl:
            for name in ("kafka_sasl_username", "kafka_sasl_password"):
                if not getattr(self, name):
                    _fail(name, f"is required with {protocol} (a SCRAM user of the brokers)")
        else:
            for name in ("kafka_sasl_username", "kafka_sasl_password"):
                if getattr(self, name):
                    _fail(name, f"is set but {protocol} does not authenticate with SASL")
        if tls and not self.kafka_ssl_cafile:
            _fail(
                "kafka_ssl_cafile",
                f"is required with {protocol}: the PEM file of the CA that signed the brokers' "
                "certificates (clients verify them and their host names)",
            )
        if not tls and self.kafka_ssl_cafile:
            _fail("kafka_ssl_cafile", f"is set but {protocol} does not use TLS")
        cafile = Path(self.kafka_ssl_cafile)
        if self.kafka_ssl_cafile and not (cafile.is_file() and os.access(cafile, os.R_OK)):
            _fail("kafka_ssl_cafile", f"is not a readable file: {self.kafka_ssl_cafile!r}")

    # -- derived values -----------------------------------------------------------------------

    @property
    def s3_host(self) -> str:
        """``host:port`` of the S3 endpoint, whether it was given as a URL or not."""
        if "://" in self.s3_endpoint:
            return urlsplit(self.s3_endpoint).netloc
        return self.s3_endpoint

    @property
    def s3_uses_tls(self) -> bool:
        return self.s3_secure or self.s3_endpoint.startswith("https://")

    def describe(self) -> dict[str, str]:
        """The effective settings as text, secrets masked: what a process logs at start-up."""
        out: dict[str, str] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("secret") and value:
                out[f.name] = _MASK
            elif f.name == "redis_url" and value:
                out[f.name] = _mask_url_password(value)
            else:
                out[f.name] = str(value)
        return out

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # A subclass decorated with plain @dataclass would get a generated __repr__ that prints
        # secrets; dataclasses never replace a __repr__ the class defines itself, so define ours.
        super().__init_subclass__(**kwargs)
        cls.__repr__ = Settings.__repr__  # type: ignore[method-assign]

    def __repr__(self) -> str:
        shown = self.describe()
        inner = ", ".join(
            f"{f.name}={shown[f.name]!r}"
            if shown[f.name] != str(getattr(self, f.name))
            else f"{f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
        )
        return f"{type(self).__name__}({inner})"


def env_name(field_name: str) -> str:
    return PREFIX + field_name.upper()


def _bad_port(split: SplitResult) -> bool:
    """True when a URL names a port that is not a number in 1–65535 (urlsplit raises then)."""
    try:
        port = split.port
    except ValueError:
        return True
    return port == 0


def _fail(field_name: str, problem: str) -> typing.NoReturn:
    raise ConfigurationError(f"{env_name(field_name)} {problem}")


def _mask_url_password(url: str) -> str:
    split = urlsplit(url)
    if split.password is None:
        return url
    netloc = split.netloc.replace(f":{split.password}@", f":{_MASK}@", 1)
    return split._replace(netloc=netloc).geturl()


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse(variable: str, raw: str, annotation: Any) -> Any:
    """Parse one variable's text into the field's type, or raise a one-sentence error."""
    text = raw.strip()
    origin = get_origin(annotation)
    if origin is Literal:
        choices = [str(c) for c in get_args(annotation)]
        # Log levels are conventionally upper case, backends lower case: accept either spelling.
        for choice in choices:
            if text.lower() == choice.lower():
                return choice
        raise ConfigurationError(f"{variable} must be one of {', '.join(choices)}, got {raw!r}")
    if annotation is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ConfigurationError(f"{variable} must be true or false, got {raw!r}")
    if annotation is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigurationError(f"{variable} must be an integer, got {raw!r}") from None
    if annotation is float:
        try:
            value = float(text)
        except ValueError:
            raise ConfigurationError(f"{variable} must be a number, got {raw!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigurationError(f"{variable} must be a finite number, got {raw!r}")
        return value
    if annotation is Path:
        if not text:
            raise ConfigurationError(f"{variable} must be a non-empty path")
        return Path(text).expanduser()
    if annotation is str:
        return text
    raise ConfigurationError(f"{variable} has an unsupported type {annotation!r}")


def run_main(main: Callable[[], int | None], *, program: str | None = None) -> typing.NoReturn:
    """Run a process entry point; a ConfigurationError becomes one stderr line and exit code 2.

    A TransientError that reaches here (a dependency down at start-up, e.g. Kafka unreachable
    while topics are created) is an outage, not a bug: one stderr line and exit code 1, so the
    orchestrator restarts the process with back-off. Any other exception propagates (a
    traceback is the right output for a bug); Ctrl-C exits 130.
    """
    name = program or Path(sys.argv[0]).name or "riffloop"
    try:
        code = main()
    except ConfigurationError as exc:
        print(f"{name}: configuration error: {exc.reason}", file=sys.stderr)
        sys.exit(2)
    except TransientError as exc:
        print(f"{name}: cannot start, a dependency is unavailable: {exc.reason}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(0 if code is None else code)
