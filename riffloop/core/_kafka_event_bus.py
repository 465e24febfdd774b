"""EventBus on Apache Kafka via kafka-python 3.x (imported lazily: ``riffloop.core`` stays light).

- Producer: idempotent, ``acks=all``; ``publish`` waits for the broker's acknowledgement, so a
  record is durable before the caller moves on (and before the consumer commits its input). Its
  timeouts are derived from one bound, the publish timeout (:func:`producer_timeouts`): the
  producer gives a record up before ``publish`` stops waiting, and a producer whose record
  failed is stopped (its pending records fail too) and replaced, so a failed publish is never
  delivered later by the producer's own retries.
- Consumers: ``enable_auto_commit=False``; offsets are committed only by ``commit(message)``, which
  the Consumer loop calls after the handler succeeded; ``close`` never auto-commits.
- Admin: ``ensure_topics`` creates topics (auto-create is off on our brokers) with the configured
  partitions and replication factor, their record configs (``topic_config``) and
  :func:`durability_config` (``min.insync.replicas``; a ``.dlq``'s retention);
  ``ensure_catalogue`` creates every topic plus its ``.dlq``. An existing topic keeps its configs.
- Security: :class:`KafkaSecurity` (TLS with a CA file, SASL/SCRAM user and password) goes to
  every client; a broker that refuses the credentials is a ConfigurationError naming the user, not
  an outage to retry.
- Errors: a Kafka failure is a TransientError with a retry hint (``RETRY_AFTER_S``), which the
  gRPC interceptor sends to the client as the ``retry-after-ms`` trailer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from riffloop.core._envelopes import DLQ_SUFFIX, all_topics, topic_config
from riffloop.core._errors import (
    ConfigurationError,
    NotFoundError,
    TransientError,
    ValidationError,
)
from riffloop.core._event_bus import (
    EventBus,
    Message,
    Published,
    Subscription,
    validate_group,
    validate_headers,
    validate_topic,
)
from riffloop.core._kafka_credentials import sasl_refusal

if TYPE_CHECKING:
    from kafka import KafkaConsumer, KafkaProducer

    from riffloop.core._settings import Settings

log = logging.getLogger("riffloop.kafka")
T = TypeVar("T")

# A client's retry hint after a Kafka failure: kafka-python reconnects to a lost broker with
# back-off up to reconnect_backoff_max_ms (1 s, its default), so a retry sooner than that would
# meet the same closed connection.
RETRY_AFTER_S = 1.0


@dataclasses.dataclass(frozen=True, repr=False)
class KafkaSecurity:
    """How every client of a bus meets the brokers (settings ``kafka_security_protocol``,
    ``kafka_sasl_*``, ``kafka_ssl_cafile``): PLAINTEXT, TLS (``SSL``), SASL/SCRAM
    (``SASL_PLAINTEXT``) or both (``SASL_SSL``). TLS verifies the brokers' certificates and host
    names against ``cafile``; the password never appears in ``repr``."""

    protocol: str = "PLAINTEXT"
    sasl_mechanism: str = "SCRAM-SHA-512"
    username: str = ""
    password: str = ""
    cafile: str = ""

    def __post_init__(self) -> None:
        if self.protocol not in ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"):
            raise ValidationError(f"unknown Kafka security protocol {self.protocol!r}")
        if self.sasl and self.sasl_mechanism not in ("SCRAM-SHA-256", "SCRAM-SHA-512"):
            raise ValidationError(f"unsupported SASL mechanism {self.sasl_mechanism!r}")
        if self.sasl and not (self.username and self.password):
            raise ValidationError(f"{self.protocol} needs a SASL user name and password")
        if self.tls and not self.cafile:
            raise ValidationError(f"{self.protocol} needs the CA file of the brokers")

    @property
    def sasl(self) -> bool:
        return self.protocol.startswith("SASL_")

    @property
    def tls(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    @classmethod
    def from_settings(cls, settings: Settings) -> KafkaSecurity:
        sasl = settings.kafka_security_protocol.startswith("SASL_")
        return cls(
            settings.kafka_security_protocol,
            settings.kafka_sasl_mechanism,
            settings.kafka_sasl_username if sasl else "",
            settings.kafka_sasl_password if sasl else "",
            settings.kafka_ssl_cafile,
        )

    def client_config(self) -> dict[str, Any]:
        """kafka-python options for every client (admin, producer, consumers)."""
        config: dict[str, Any] = {"security_protocol": self.protocol}
        if self.sasl:
            config.update(
                sasl_mechanism=self.sasl_mechanism,
                sasl_plain_username=self.username,
                sasl_plain_password=self.password,
            )
        if self.tls:
            config.update(ssl_cafile=self.cafile, ssl_check_hostname=True)
        return config

    def __repr__(self) -> str:
        return f"KafkaSecurity({self.protocol}, {self.sasl_mechanism}, user={self.username!r})"


def _kafka_call(what: str, action: Callable[[], T]) -> T:
    from kafka.errors import KafkaError

    try:
        return action()
    except KafkaError as exc:
        raise TransientError(f"{what}: Kafka error {exc}", retry_after_s=RETRY_AFTER_S) from None
    except OSError as exc:
        raise TransientError(
            f"{what}: Kafka unreachable ({type(exc).__name__})", retry_after_s=RETRY_AFTER_S
        ) from None


def producer_timeouts(publish_timeout_s: float, linger_ms: int = 0) -> dict[str, int]:
    """kafka-python producer options that settle a record's fate within ``publish_timeout_s`` (P).

    A record's life in the producer, from ``send()``:
      1. up to ``max_block_ms`` waiting for the topic's metadata (or the first connection);
      2. then up to ``delivery_timeout_ms`` for linger, sends, retries and the ack, after which
         the producer fails the record, in flight or not, and never sends it again;
      3. then the producer's IO thread reports the outcome to the waiting future.
    With max_block = P/5 and delivery = 7P/10, P/10 is left for step 3, so ``publish`` (which
    waits P) always learns the outcome. kafka-python requires delivery ≥ linger + request
    timeout, so one produce request may take what the linger leaves of the delivery time
    (P = 5 s, linger 0: 1 s, 3.5 s, 3.5 s).
    """
    total_ms = int(publish_timeout_s * 1000)
    max_block_ms = total_ms // 5
    delivery_ms = total_ms * 7 // 10
    request_ms = delivery_ms - linger_ms
    if request_ms < 500:
        raise ValidationError(
            f"a publish timeout of {publish_timeout_s:g} s with a linger of {linger_ms} ms leaves "
            f"{request_ms} ms per produce request; it needs at least 500 ms"
        )
    return {
        "max_block_ms": max_block_ms,
        "delivery_timeout_ms": delivery_ms,
        "request_timeout_ms": request_ms,
    }


def durability_config(
    topic: str, *, min_insync_replicas: int, dlq_retention_s: int
) -> dict[str, str]:
    """The broker configs a created topic gets from the deployment's settings:
    ``min.insync.replicas`` on every topic (with ``acks=all``, the copies a write reaches before
    it is acknowledged), and on a dead-letter topic an explicit retention (the time an operator
    has to fix the cause and replay it)."""
    configs = {"min.insync.replicas": str(min_insync_replicas)}
    if topic.endswith(DLQ_SUFFIX):
        configs["retention.ms"] = str(dlq_retention_s * 1000)
    return configs


def construct_kafka_client(client_class: Any, **config: Any) -> Any:
    """Build a kafka-python client; if it fails (broker down), stop what it already started.

    kafka-python 3.0.12 starts a network IO thread before bootstrapping and, when bootstrap times
    out, raises from the constructor without stopping it: every failed attempt (a readiness ping
    every few seconds during an outage) would leak a thread and its sockets. Tracking the inner
    client through the documented ``kafka_client`` factory option lets us close it.
    """
    created: list[Any] = []
    default_factory = client_class.DEFAULT_CONFIG["kafka_client"]

    def tracking_factory(**kwargs: Any) -> Any:
        client = default_factory(**kwargs)
        created.append(client)
        return client

    try:
        return client_class(kafka_client=tracking_factory, **config)
    except BaseException as exc:
        for client in created:
            with contextlib.suppress(Exception):
                client.close()
            with contextlib.suppress(Exception):
                client._manager._net.stop()
        # kafka-python reports refused SASL credentials as a bootstrap timeout: ask once more,
        # ourselves, so a wrong password is a configuration error, not an outage to retry.
        refusal = sasl_refusal(config) if isinstance(exc, Exception) else None
        if refusal:
            raise ConfigurationError(refusal) from None
        raise


class KafkaEventBus(EventBus):
    """Kafka adapter. One producer per bus (thread-safe); one KafkaConsumer per subscription."""

    def __init__(
        self,
        bootstrap: str,
        *,
        client_id: str = "riffloop",
        partitions: int = 3,
        replication_factor: int = 1,
        request_timeout_s: float = 15.0,
        session_timeout_ms: int = 10_000,
        topic_prefix: str = "",
        linger_ms: int = 0,
        max_poll_interval_s: float = 300.0,
        publish_timeout_s: float = 5.0,
        min_insync_replicas: int = 1,
        dlq_retention_s: int = 14 * 24 * 3600,
        security: KafkaSecurity | None = None,
    ) -> None:
        if not bootstrap:
            raise ValidationError("Kafka bootstrap servers must be given (host:port)")
        if not 1 <= min_insync_replicas <= replication_factor:
            raise ValidationError(
                f"min_insync_replicas must lie in 1–{replication_factor} (the replication factor)"
            )
        self._bootstrap = [s.strip() for s in bootstrap.split(",") if s.strip()]
        self.security = security or KafkaSecurity()
        self._security = self.security.client_config()  # passed to every client
        self._client_id = client_id
        self._partitions = partitions
        self._replication_factor = replication_factor
        self._min_insync_replicas = min_insync_replicas
        self._dlq_retention_s = dlq_retention_s
        # admin calls and consumers; a publish is bounded by publish_timeout_s instead
        self._request_timeout_s = request_timeout_s
        self._publish_timeout_s = publish_timeout_s
        self._producer_timeouts = producer_timeouts(publish_timeout_s, linger_ms)
        self._session_timeout_ms = session_timeout_ms
        # Callers always see logical names ("feedback.received.v1"); only the broker sees the
        # prefixed ones. validate_topic checks the combined name fits Kafka's rules.
        self._prefix = topic_prefix
        self._linger_ms = linger_ms
        self._max_poll_interval_ms = int(max_poll_interval_s * 1000)
        self._producer: KafkaProducer | None = None
        self._reconnect_at = 0.0  # (monotonic) no new producer before: its broker was away
        self._admin: Any = None  # KafkaAdminClient, guarded by _admin_lock
        self._admin_lock = threading.Lock()
        self._known_topics: set[str] = set()
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> KafkaEventBus:
        return cls(
            settings.kafka_bootstrap,
            client_id=settings.service_name,
            partitions=settings.kafka_partitions,
            replication_factor=settings.kafka_replication_factor,
            topic_prefix=settings.kafka_topic_prefix,
            linger_ms=settings.kafka_linger_ms,
            max_poll_interval_s=settings.kafka_max_poll_interval_s,
            publish_timeout_s=settings.kafka_publish_timeout_s,
            min_insync_replicas=settings.kafka_min_insync_replicas,
            dlq_retention_s=settings.kafka_dlq_retention_s,
            security=KafkaSecurity.from_settings(settings),
        )

    def _physical(self, topic: str) -> str:
        return validate_topic(self._prefix + validate_topic(topic))

    # -- admin --------------------------------------------------------------------------------

    def _admin_call(self, what: str, action: Callable[[Any], T]) -> T:
        """Run ``action`` on this bus's admin client, made on first use and kept: building one
        costs 35–65 ms of CPU under the GIL, which a readiness ping every second turned into a
        stall of every request in the process (bench/README.md). A failed call drops the
        client, so the next one reconnects."""

        def run() -> T:
            from kafka import KafkaAdminClient

            with self._admin_lock:
                if self._admin is None:
                    self._admin = construct_kafka_client(
                        KafkaAdminClient,
                        bootstrap_servers=self._bootstrap,
                        **self._security,
                        client_id=f"{self._client_id}-admin",
                        request_timeout_ms=int(self._request_timeout_s * 1000),
                        bootstrap_timeout_ms=int(self._request_timeout_s * 1000),
                    )
                try:
                    return action(self._admin)
                except BaseException:
                    self._drop_admin()
                    raise

        return _kafka_call(what, run)

    def _drop_admin(self) -> None:
        admin, self._admin = self._admin, None
        if admin is not None:
            with contextlib.suppress(Exception):
                admin.close()

    def ensure_topics(self, topics: Iterable[str], *, partitions: int | None = None) -> None:
        from kafka.errors import TopicAlreadyExistsError

        logical = {self._physical(t): t for t in topics}
        wanted = list(logical)
        count = self._partitions if partitions is None else partitions
        if count < 1:
            raise ValidationError("a topic needs at least one partition")

        def create(admin: Any) -> None:
            existing = set(admin.list_topics())
            missing = [t for t in wanted if t not in existing]
            if missing:
                spec = {
                    t: {
                        "num_partitions": count,
                        "replication_factor": self._replication_factor,
                        "configs": {
                            **topic_config(logical[t]),  # retention: riffloop.core._envelopes
                            **durability_config(
                                logical[t],
                                min_insync_replicas=self._min_insync_replicas,
                                dlq_retention_s=self._dlq_retention_s,
                            ),
                        },
                    }
                    for t in missing
                }
                # Another process may create one between list and create: that is fine.
                with contextlib.suppress(TopicAlreadyExistsError):
                    admin.create_topics(
                        spec,
                        timeout_ms=int(self._request_timeout_s * 1000),
                        wait_for_metadata=True,
                    )
                log.info("created topics %s with %d partitions", ", ".join(missing), count)

        self._admin_call("create topics", create)
        with self._lock:
            self._known_topics.update(wanted)

    def ensure_catalogue(self) -> None:
        """Every topic of docs/ARCHITECTURE.md and its ``.dlq``."""
        self.ensure_topics(all_topics(with_dlq=True))

    def topic_exists(self, topic: str) -> bool:
        topic = self._physical(topic)
        with self._lock:
            if topic in self._known_topics:
                return True
        names = self._admin_call("list topics", lambda admin: set(admin.list_topics()))
        with self._lock:
            self._known_topics.update(names)
        return topic in names

    def _require_topics(self, topics: Iterable[str]) -> None:
        for topic in topics:
            if not self.topic_exists(topic):
                raise NotFoundError(f"topic {topic!r} does not exist; create it first")

    # -- producing ----------------------------------------------------------------------------

    def _get_producer(self) -> KafkaProducer:
        with self._lock:
            if self._producer is None:

                def make() -> KafkaProducer:
                    from kafka import KafkaProducer

                    producer: KafkaProducer = construct_kafka_client(
                        KafkaProducer,
                        bootstrap_servers=self._bootstrap,
                        **self._security,
                        client_id=self._client_id,
                        acks="all",
                        enable_idempotence=True,
                        # publish() waits for its ack either way; a short linger lets the
                        # records of concurrent publishers share one produce request.
                        linger_ms=self._linger_ms,
                        # connecting first counts as step 1's wait (producer_timeouts)
                        bootstrap_timeout_ms=self._producer_timeouts["max_block_ms"],
                        **self._producer_timeouts,
                    )
                    return producer

                # Publishers queue on this lock: while the brokers are away, each would wait
                # its own bootstrap timeout after the others'. One failed try answers them
                # all until the retry hint has passed.
                wait_s = self._reconnect_at - time.monotonic()
                if wait_s > 0:
                    raise TransientError(
                        "connect producer: Kafka was unreachable a moment ago",
                        retry_after_s=wait_s,
                    )
                try:
                    self._producer = _kafka_call("connect producer", make)
                except TransientError:
                    self._reconnect_at = time.monotonic() + RETRY_AFTER_S
                    raise
            return self._producer

    def publish_raw(
        self, topic: str, key: str, value: bytes, headers: Mapping[str, str] | None = None
    ) -> Published:
        if not isinstance(key, str) or not key:
            raise ValidationError("a record needs a non-empty key (the entity id)")
        clean = validate_headers(headers)
        self._require_topics([topic])
        deadline = time.monotonic() + self._publish_timeout_s
        producer = self._get_producer()

        def send() -> Published:
            future = producer.send(
                self._physical(topic),
                value=bytes(value),
                key=key.encode(),
                headers=[(k, v.encode()) for k, v in clean.items()],
            )
            try:
                # the producer itself gives the record up before this (producer_timeouts)
                metadata = future.get(timeout=max(0.0, deadline - time.monotonic()))
            except BaseException:
                # Never sent again after this: the caller's retry cannot race a late copy.
                # (A request that timed out in flight may have been written all the same, so
                # a caller's retry must be idempotent: a rating's key is its track and
                # listener, which the feedback ledger counts once.)
                self._abandon_producer(producer)
                raise
            return Published(topic, int(metadata.partition), int(metadata.offset))

        return _kafka_call(f"publish to {topic}", send)

    def _abandon_producer(self, producer: KafkaProducer) -> None:
        """Stop a producer whose record failed, so that none of its pending records is ever
        sent; the next publish makes a new one (a new producer id). Besides the guarantee,
        kafka-python 3.0.12's idempotent sender stalls after a record expires: it waits for a
        new producer id and expires nothing meanwhile (after a broker kill -9, no publish
        succeeded for 13 minutes once the broker was back). Other publishes still waiting on
        this producer fail with it, and their callers retry."""
        with self._lock:
            if self._producer is not producer:
                return  # another failed publish is stopping it already
            self._producer = None
        log.warning("Kafka producer %s abandoned after a failed publish", self._client_id)
        _force_close(producer, 1.0)  # bounded: the caller is a request's thread

    # -- consuming ----------------------------------------------------------------------------

    def subscribe(self, group: str, topics: Sequence[str]) -> Subscription:
        validate_group(group)
        if not topics:
            raise ValidationError("subscribe needs at least one topic")
        self._require_topics(topics)

        def make() -> KafkaConsumer:
            from kafka import KafkaConsumer

            consumer: KafkaConsumer = construct_kafka_client(
                KafkaConsumer,
                bootstrap_servers=self._bootstrap,
                **self._security,
                client_id=f"{self._client_id}-{group}",
                # the topic prefix names the deployment: its consumer groups are its own too
                # (two deployments' encoders in one group would split each other's partitions)
                group_id=self._prefix + group,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                bootstrap_timeout_ms=int(self._request_timeout_s * 1000),
                session_timeout_ms=self._session_timeout_ms,
                heartbeat_interval_ms=max(500, self._session_timeout_ms // 5),
                max_poll_interval_ms=self._max_poll_interval_ms,
                request_timeout_ms=max(
                    int(self._request_timeout_s * 1000), self._session_timeout_ms + 5000
                ),
            )
            consumer.subscribe([self._physical(t) for t in topics])
            return consumer

        return _KafkaSubscription(
            _kafka_call(f"subscribe {group}", make), tuple(topics), self._prefix
        )

    def replay(self, topic: str) -> Iterator[Message]:
        """A consumer without a group (nothing committed, no rebalance), assigned one partition
        after another from its beginning offset to the end offset read at the call."""
        self._require_topics([topic])
        physical = self._physical(topic)

        def make() -> tuple[Any, dict[Any, int]]:
            from kafka import KafkaConsumer, TopicPartition

            consumer = construct_kafka_client(
                KafkaConsumer,
                bootstrap_servers=self._bootstrap,
                **self._security,
                client_id=f"{self._client_id}-replay",
                group_id=None,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                bootstrap_timeout_ms=int(self._request_timeout_s * 1000),
                request_timeout_ms=max(
                    int(self._request_timeout_s * 1000), self._session_timeout_ms + 5000
                ),
            )
            try:
                numbers = sorted(consumer.partitions_for_topic(physical))
                if not numbers:
                    raise TransientError(f"replay {topic}: no partition metadata yet")
                partitions = [TopicPartition(physical, n) for n in numbers]
                ends = {tp: int(end) for tp, end in consumer.end_offsets(partitions).items()}
            except BaseException:
                consumer.close(autocommit=False)
                raise
            return consumer, {tp: ends[tp] for tp in partitions}

        consumer, ends = _kafka_call(f"replay {topic}", make)
        return self._replayed(topic, consumer, ends)

    def _replayed(self, topic: str, consumer: Any, ends: dict[Any, int]) -> Iterator[Message]:
        try:
            for tp, end in ends.items():
                consumer.assign([tp])
                consumer.seek_to_beginning(tp)
                # a poll that brings nothing for this long means the broker is gone
                stalled_at = time.monotonic() + self._request_timeout_s

                def position(tp: Any = tp) -> int:
                    return int(consumer.position(tp))

                def fetch() -> Any:
                    return consumer.poll(timeout_ms=500, max_records=500)

                while _kafka_call(f"replay {topic}", position) < end:
                    batches = _kafka_call(f"replay {topic}", fetch)
                    records = [r for r in batches.get(tp, ()) if r.offset < end]
                    if records:
                        stalled_at = time.monotonic() + self._request_timeout_s
                    elif time.monotonic() > stalled_at:
                        raise TransientError(f"replay {topic}: no records within the timeout")
                    for record in records:
                        yield _message(record, self._prefix)
        finally:
            with contextlib.suppress(Exception):
                consumer.close(autocommit=False)

    def ping(self) -> None:
        # DescribeCluster, not list_topics: the same proof that a broker answers for ≈ 1.5 ms
        # of CPU instead of ≈ 20 ms spent parsing every topic's metadata.
        self._admin_call("describe cluster", lambda admin: admin.describe_cluster())

    def close(self) -> None:
        with self._admin_lock:
            self._drop_admin()
        with self._lock:
            producer, self._producer = self._producer, None
        if producer is not None:
            try:
                _kafka_call(
                    "close producer", lambda: producer.close(timeout=self._request_timeout_s)
                )
            except TransientError as exc:  # records still pending: they fail, none is sent
                log.warning("Kafka producer %s closed by force: %s", self._client_id, exc)
                _force_close(producer, self._request_timeout_s)


def _force_close(producer: Any, timeout_s: float) -> None:
    """Stop a kafka-python producer without sending what it still holds: every pending
    record's future fails. (kafka-python 3.0.12's ``close`` flushes first and raises when
    records are pending, leaving its IO thread running, so the sender is stopped first.)"""
    sender = getattr(producer, "_sender", None)
    if sender is not None:
        sender.force_close()
        sender.join(timeout_s)
    with contextlib.suppress(Exception):
        producer.close(timeout=0)  # nothing pending now: frees its metrics and sockets


def _message(record: Any, prefix: str) -> Message:
    """A kafka-python ConsumerRecord as the port's Message (logical topic name)."""
    return Message(
        topic=record.topic[len(prefix) :],
        partition=int(record.partition),
        offset=int(record.offset),
        key=(record.key or b"").decode("utf-8", "replace"),
        value=bytes(record.value or b""),
        headers={
            name: (raw or b"").decode("utf-8", "replace") for name, raw in (record.headers or [])
        },
        timestamp_ms=int(record.timestamp),
    )


class _KafkaSubscription(Subscription):
    def __init__(self, consumer: KafkaConsumer, topics: tuple[str, ...], prefix: str = "") -> None:
        self._consumer = consumer
        self._topics = topics
        self._prefix = prefix
        self._closed = False

    def poll(self, timeout_s: float, max_records: int = 100) -> list[Message]:
        if self._closed:
            raise ValidationError("poll on a closed subscription")
        if max_records < 1:
            raise ValidationError("max_records must be at least 1")
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            # The first polls after joining only run the group protocol; keep polling until
            # records arrive or the caller's timeout is spent.
            left_ms = max(0, int((deadline - time.monotonic()) * 1000))

            def fetch(ms: int = left_ms) -> Any:
                return self._consumer.poll(timeout_ms=ms, max_records=max_records)

            batches = _kafka_call("poll", fetch)
            out = [_message(r, self._prefix) for records in batches.values() for r in records]
            if out or time.monotonic() >= deadline:
                out.sort(key=lambda m: (m.timestamp_ms, m.topic, m.partition, m.offset))
                return out

    def commit(self, message: Message) -> None:
        from kafka import TopicPartition
        from kafka.structs import OffsetAndMetadata

        tp = TopicPartition(self._prefix + message.topic, message.partition)
        if tp not in self._consumer.assignment():
            raise TransientError(
                f"cannot commit {message.topic}[{message.partition}]: partition was reassigned"
            )
        # Commit the NEXT offset to read (Kafka's convention); CommitFailedError (the group
        # rebalanced under us) is a KafkaError and so surfaces as TransientError.
        offsets = {tp: OffsetAndMetadata(message.offset + 1, "", -1)}
        _kafka_call("commit", lambda: self._consumer.commit(offsets))

    def assignment(self) -> set[tuple[str, int]]:
        return {
            (tp.topic[len(self._prefix) :], int(tp.partition)) for tp in self._consumer.assignment()
        }

    def lag(self) -> dict[str, int]:
        def compute() -> dict[str, int]:
            assigned = list(self._consumer.assignment())
            out = {topic: 0 for topic in self._topics}
            if not assigned:
                return out
            ends = self._consumer.end_offsets(assigned)
            for tp in assigned:
                committed = self._consumer.committed(tp) or 0
                topic = tp.topic[len(self._prefix) :]
                out[topic] = out.get(topic, 0) + max(0, int(ends[tp]) - int(committed))
            return out

        return _kafka_call("lag", compute)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            _kafka_call("close consumer", lambda: self._consumer.close(autocommit=False))
