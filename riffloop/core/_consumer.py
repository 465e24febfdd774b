"""The consumer loop every service shares: at-least-once delivery made effectively-once.

For each record (one thread, in order per partition):

1. Decode the Envelope and check its payload matches the topic; a record that does not parse is
   poison: it goes to ``<topic>.dlq`` at once.
2. Dedupe: if ``riffloop:dedupe:<group>:<event_id>`` exists, the event was already handled (a
   redelivery after a rebalance or a lost commit): commit and count it ``duplicate``.
3. Count the attempt in ``riffloop:attempts:<group>:<event_id>`` BEFORE calling the handler, so an
   event that kills the process every time (OOM, segfault) is dead-lettered after max_attempts
   restarts instead of crash-looping the service.
4. Call the handler. Retryable failures (TransientError and unexpected exceptions) are retried
   with exponential back-off up to ``max_attempts`` tries; ValidationError / PermanentError are not
   retried. After the last try the record goes to ``<topic>.dlq`` as a ``DeadLetter`` envelope
   (error text, attempts, original topic/partition/offset, original bytes; also as headers).
   A handler of a *batch* event (several items in one record) raises :class:`ItemsRefused` after
   applying the good items: only the refused items go to the DLQ, as an envelope of their own
   (event id ``<original>.refused``), and the original counts as handled — one bad item no longer
   sends a whole chunk of accepted ones to the DLQ. A handler stopped by a drain raises
   :class:`Interrupted`: the record stays uncommitted and the try is not counted.
Batch handlers: a topic may have a handler of its deliveries *together* (the generator runs one
UNet batch for many requests). The records of that topic in one poll (up to ``max_batch``, in
order) go through steps 1–3 one by one, then ONE call of the batch handler with every record
still to handle; it returns a :class:`BatchResult` naming the records that failed, each with
its own error, and step 4 applies to each of those alone (a retry calls the handler again with
the failed records only; a non-retryable one is dead-lettered alone, its batch-mates count as
handled). An exception out of the batch handler is every record's failure.

5. Only after success mark the dedupe key (a dead letter stays unmarked so that a replay from
   the DLQ, after the cause is fixed, is handled). Offsets are committed once per
   polled batch, past the last finished record of each partition (committing every record held
   the loop at ≈ 80 records/s against local Kafka + Redis, per batch ≈ 280/s); a crash mid-batch
   redelivers finished records, which step 2 skips.

Why the dedupe key is marked AFTER success: marking before would lose the event if the process
died inside the handler (at-most-once). Marking after leaves a window — the handler's effect is
done, the mark is not — in which a crash makes the event run again. So handlers must make their
effects idempotent (content-addressed object keys, upserts keyed by the event's entity, or
``KeyValueStore.apply_once(event_id…)`` for counters); the dedupe key then only saves work in the
common case. tests/integration/test_consumer_crash.py kills a real consumer inside that window.

``stop()`` (any thread, e.g. SIGTERM) lets the in-flight record (or batch) finish, commits what
finished, then leaves the group; records polled but not started are left uncommitted for the next
owner.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from riffloop.core._context import handling
from riffloop.core._envelopes import (
    DLQ_SUFFIX,
    decode_envelope,
    dlq_topic,
    load_generated,
    new_envelope,
)
from riffloop.core._errors import (
    PermanentError,
    RiffloopError,
    TransientError,
    ValidationError,
)
from riffloop.core._event_bus import EventBus, Message, Subscription, validate_group
from riffloop.core._tracing import (
    as_current,
    batch_span,
    note_outcome,
    record_span,
    start_record_span,
)

if TYPE_CHECKING:
    from google.protobuf.message import Message as ProtoMessage
    from opentelemetry.trace import Span

    from riffloop.core._kv_store import KeyValueStore
    from riffloop.core._settings import Settings
    from riffloop.v1 import events_pb2

log = logging.getLogger("riffloop.consumer")

#: Errors a retry cannot fix: dead-letter on the first failure.
NON_RETRYABLE: tuple[type[BaseException], ...] = (ValidationError, PermanentError)
_MAX_ERROR_CHARS = 2000


class Interrupted(TransientError):
    """A handler gave up because the service is draining (e.g. SIGTERM mid-training): the record
    is left uncommitted for the next owner, and this try does not count toward max_attempts."""


class ItemsRefused(ValidationError):
    """A batch handler applied the good items of a record and refuses the rest.

    ``rest`` is an envelope like the original holding only the refused items (build it with
    :func:`refused_items_envelope`). The consumer dead-letters ``rest`` — replaying it after a fix
    re-runs only those items — and marks the original handled.
    """

    def __init__(self, reason: str, rest: events_pb2.Envelope) -> None:
        super().__init__(reason)
        self.rest = rest


def refused_items_envelope(
    envelope: events_pb2.Envelope,
    field: str,
    refused: Sequence[ProtoMessage],
    *,
    suffix: str = "refused",
) -> events_pb2.Envelope:
    """A copy of ``envelope`` whose batch payload ``field`` (a message with repeated ``items``)
    holds only ``refused``, under the deterministic event id ``<original>.<suffix>`` (so a
    redelivery that refuses them again dead-letters the same event, and a replay runs once)."""
    rest = type(envelope)()
    rest.CopyFrom(envelope)
    rest.event_id = f"{envelope.event_id}.{suffix}"
    items = getattr(rest, field).items
    del items[:]
    for item in refused:
        items.add().CopyFrom(item)
    return rest


def refuse_items(
    envelope: events_pb2.Envelope,
    field: str,
    refused: Sequence[tuple[ProtoMessage, str]],
    total: int,
) -> None:
    """End a batch handler that refused some of its ``total`` items — (item, reason) pairs:
    raise :class:`ItemsRefused` with their envelope, or ValidationError when none was kept (the
    whole record is then the dead letter, under its own id). Returns when nothing was refused."""
    if not refused:
        return
    reason = f"{len(refused)} of {total} items refused: " + "; ".join(why for _, why in refused[:5])
    if len(refused) >= total:
        raise ValidationError(reason)
    raise ItemsRefused(reason, refused_items_envelope(envelope, field, [i for i, _ in refused]))


class Outcome(enum.StrEnum):
    """Values of the ``outcome`` label of ``riffloop_kafka_messages_total``."""

    HANDLED = "handled"
    DUPLICATE = "duplicate"
    FAILED = "failed"  # one failed attempt (the record may still succeed on a retry)
    DEAD_LETTERED = "dead_lettered"
    # A batch record applied except for some items, which went to the DLQ on their own
    # (``ItemsRefused``): counted once, as neither fully handled nor fully dead-lettered.
    PARTLY_DEAD_LETTERED = "partly_dead_lettered"


@dataclasses.dataclass(frozen=True)
class Delivery:
    """What a handler gets: the record, its decoded envelope and the attempt number (1-based)."""

    message: Message
    envelope: events_pb2.Envelope
    attempt: int

    @property
    def event_id(self) -> str:
        return str(self.envelope.event_id)

    @property
    def payload(self) -> ProtoMessage:
        field = self.envelope.WhichOneof("payload")
        assert field is not None  # decode_envelope guarantees a payload
        message: ProtoMessage = getattr(self.envelope, field)
        return message


Handler = Callable[[Delivery], None]


@dataclasses.dataclass(frozen=True)
class BatchResult:
    """What a batch handler reports: the deliveries it could not handle, by event id, each with
    its own error (the same errors a per-record handler raises: TransientError or any other
    exception is retried, ValidationError / PermanentError dead-letter at once, ItemsRefused and
    Interrupted as in the module docstring). Every other delivery of the call counts as handled.
    """

    failed: Mapping[str, BaseException] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for event_id, error in self.failed.items():
            if not isinstance(event_id, str) or not isinstance(error, BaseException):
                raise ValidationError("BatchResult.failed maps event ids to exceptions")


#: A handler of several deliveries of one topic at once (None: all handled).
BatchHandler = Callable[[Sequence[Delivery]], BatchResult | None]


@dataclasses.dataclass(frozen=True)
class ConsumerHooks:
    """Metric callbacks (the runtime wires them to Prometheus); each gets the topic first."""

    on_outcome: Callable[[str, Outcome], None] | None = None
    on_lag: Callable[[str, int], None] | None = None

    def outcome(self, topic: str, outcome: Outcome) -> None:
        if self.on_outcome is not None:
            self.on_outcome(topic, outcome)

    def lag(self, topic: str, lag: int) -> None:
        if self.on_lag is not None:
            self.on_lag(topic, lag)


class _Rewind(Exception):
    """Bookkeeping failed: leave the group and rejoin so uncommitted records come back."""


@dataclasses.dataclass
class _Marks:
    """One polled batch's decoded envelopes and prefetched dedupe/attempts values."""

    envelopes: dict[tuple[str, int, int], events_pb2.Envelope] = dataclasses.field(
        default_factory=dict
    )
    values: dict[str, str | None] = dataclasses.field(default_factory=dict)
    handled_here: set[str] = dataclasses.field(default_factory=set)

    def read(self, kv: KeyValueStore, key: str) -> str | None:
        return self.values[key] if key in self.values else kv.get(key)


@dataclasses.dataclass
class _BatchItem:
    """A record of a batch still to handle: its position in the batch and its tries so far."""

    index: int
    message: Message
    envelope: events_pb2.Envelope
    attempts_key: str
    attempt: int


class Consumer:
    """Idempotent consumer loop over an EventBus subscription; see the module docstring."""

    def __init__(
        self,
        bus: EventBus,
        kv: KeyValueStore,
        *,
        group: str,
        topics: Sequence[str],
        handler: Handler,
        max_attempts: int = 3,
        dedupe_ttl_s: float = 7 * 24 * 3600,
        retry_backoff_s: float = 0.2,
        max_backoff_s: float = 10.0,
        poll_timeout_s: float = 0.5,
        max_records: int = 50,
        lag_interval_s: float = 5.0,
        hooks: ConsumerHooks | None = None,
        batch_handlers: Mapping[str, BatchHandler] | None = None,
        max_batch: int = 16,
    ) -> None:
        if max_attempts < 1:
            raise ValidationError("max_attempts must be at least 1")
        if not topics:
            raise ValidationError("a consumer needs at least one topic")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValidationError(f"max_batch must be an integer ≥ 1, got {max_batch!r}")
        if isinstance(max_records, bool) or not isinstance(max_records, int) or max_records < 1:
            raise ValidationError(f"max_records must be an integer ≥ 1, got {max_records!r}")
        batch_handlers = dict(batch_handlers or {})
        if unknown := sorted(set(batch_handlers) - set(topics)):
            raise ValidationError(f"batch handlers for topics not consumed: {unknown}")
        self._bus = bus
        self._kv = kv
        self._group = validate_group(group)
        self._topics = tuple(topics)
        self._handler = handler
        self._max_attempts = max_attempts
        self._dedupe_ttl_s = dedupe_ttl_s
        self._retry_backoff_s = retry_backoff_s
        self._max_backoff_s = max_backoff_s
        self._poll_timeout_s = poll_timeout_s
        self._max_records = max_records
        self._lag_interval_s = lag_interval_s
        self._hooks = hooks or ConsumerHooks()
        self._batch_handlers = batch_handlers
        self._max_batch = max_batch
        self._stopping = threading.Event()
        self._subscription: Subscription | None = None
        self._last_lag = 0.0

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        bus: EventBus,
        kv: KeyValueStore,
        *,
        topics: Sequence[str],
        handler: Handler,
        hooks: ConsumerHooks | None = None,
        batch_handlers: Mapping[str, BatchHandler] | None = None,
        max_batch: int = 16,
    ) -> Consumer:
        """The usual wiring: the consumer group is the service name. With batch handlers a poll
        takes whole batches (``max_records`` rounded up to a multiple of ``max_batch``), so a
        backed-up topic is not cut into a small remainder batch each poll."""
        max_records = 50
        if batch_handlers:
            max_records = -(-max_records // max_batch) * max_batch
        return cls(
            bus,
            kv,
            group=settings.service_name,
            topics=topics,
            handler=handler,
            max_attempts=settings.consumer_max_attempts,
            dedupe_ttl_s=settings.dedupe_ttl_s,
            retry_backoff_s=settings.consumer_retry_backoff_s,
            poll_timeout_s=settings.consumer_poll_timeout_s,
            max_records=max_records,
            hooks=hooks,
            batch_handlers=batch_handlers,
            max_batch=max_batch,
        )

    @property
    def group(self) -> str:
        return self._group

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> None:
        """Consume until :meth:`stop`; then commit the in-flight record and leave the group."""
        try:
            while not self._stopping.is_set():
                self.run_once()
        finally:
            self.close()

    def run_once(self, timeout_s: float | None = None) -> int:
        """Poll once and process what came; returns how many records were finished."""
        timeout = self._poll_timeout_s if timeout_s is None else timeout_s
        try:
            subscription = self._subscribe()
            batch = subscription.poll(timeout, self._max_records)
            self._report_lag(subscription)
            done = 0
            # per partition: the last record of its finished prefix (the commit point); a
            # partition with an unfinished record (a stop mid-batch) advances no further
            finished: dict[tuple[str, int], Message] = {}
            blocked: set[tuple[str, int]] = set()
            marks = self._prefetch_marks(batch)
            taken: set[int] = set()  # positions already handled as part of a batch
            try:
                for position, message in enumerate(batch):
                    if position in taken:
                        continue
                    if self._stopping.is_set():
                        break  # left uncommitted: the next owner gets it
                    batch_handler = self._batch_handlers.get(message.topic)
                    if batch_handler is None:
                        group = [message]
                        outcomes = [self._process(message, marks)]
                    else:
                        # this record and the next ones of its topic in the poll, in order
                        picks = [
                            i
                            for i in range(position, len(batch))
                            if batch[i].topic == message.topic and i not in taken
                        ][: self._max_batch]
                        taken.update(picks)
                        group = [batch[i] for i in picks]
                        outcomes = self._process_batch(batch_handler, group, marks)
                    for record, outcome in zip(group, outcomes, strict=True):
                        where = (record.topic, record.partition)
                        if outcome is None:
                            blocked.add(where)
                            continue
                        done += 1
                        if where not in blocked:
                            finished[where] = record
                    if None in outcomes:
                        break  # stopped during a back-off, or the handler was interrupted
            finally:
                self._commit(subscription, finished.values())
            return done
        except (_Rewind, TransientError) as exc:
            log.warning("consumer %s rejoins after: %s", self._group, exc)
            self._leave()
            self._stopping.wait(self._retry_backoff_s)
            return 0

    def stop(self) -> None:
        """Ask the loop to finish the in-flight record and return (safe from any thread)."""
        self._stopping.set()

    def close(self) -> None:
        self._leave()

    def _subscribe(self) -> Subscription:
        if self._subscription is None:
            self._subscription = self._bus.subscribe(self._group, self._topics)
        return self._subscription

    def _leave(self) -> None:
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            try:
                subscription.close()
            except RiffloopError as exc:
                log.warning("consumer %s: closing the subscription failed: %s", self._group, exc)

    def _report_lag(self, subscription: Subscription) -> None:
        now = time.monotonic()
        if self._hooks.on_lag is None or now - self._last_lag < self._lag_interval_s:
            return
        self._last_lag = now
        try:
            lags = subscription.lag()
        except TransientError as exc:  # a metric, not a reason to rejoin the group
            log.info("consumer %s: lag not available: %s", self._group, exc)
            return
        for topic, lag in lags.items():
            self._hooks.lag(topic, lag)

    # -- one record ---------------------------------------------------------------------------

    def _keys(self, event_id: str) -> tuple[str, str]:
        return (
            f"riffloop:dedupe:{self._group}:{event_id}",
            f"riffloop:attempts:{self._group}:{event_id}",
        )

    def _commit(self, subscription: Subscription, finished: Iterable[Message]) -> None:
        """Commit past the last finished record of each partition (one commit per batch)."""
        for message in finished:
            try:
                subscription.commit(message)
            except TransientError as exc:
                # The partition moved to another member; it will see the dedupe marks and skip.
                raise _Rewind(str(exc)) from exc

    def _prefetch_marks(self, batch: Sequence[Message]) -> _Marks:
        """Every record's dedupe and attempts values in ONE round trip (steps 2 and 3 read them).

        Per record that saves two of the five key-value round trips, the consumer's main cost
        (py-spy on the gateway at 200 ratings/s). Only this consumer owns these partitions, so
        the values stay valid for the batch; an event twice in one batch is caught by
        ``_Marks.handled_here``.
        """
        marks = _Marks()
        keys: list[str] = []
        for message in batch:
            try:
                envelope = decode_envelope(message.value, message.topic)
            except ValidationError:
                continue  # poison: _process dead-letters it
            marks.envelopes[(message.topic, message.partition, message.offset)] = envelope
            keys.extend(self._keys(envelope.event_id))
        if keys:
            values = self._kv.get_many(keys)
            for i in range(0, len(keys), 2):
                marks.values[keys[i]] = values[i]
                marks.values[keys[i + 1]] = values[i + 1]
        return marks

    def _process(self, message: Message, marks: _Marks | None = None) -> Outcome | None:
        marks = marks or _Marks()
        envelope = marks.envelopes.get((message.topic, message.partition, message.offset))
        if envelope is None:
            try:
                envelope = decode_envelope(message.value, message.topic)
            except ValidationError as exc:
                with record_span(message, None, self._group):
                    log.error("poison record %s[%d]@%d: %s", *_where(message), exc.reason)
                    self._dead_letter(message, None, exc, attempts=1)
                    return self._finish(message, Outcome.DEAD_LETTERED, None)
        # One span per record, continuing the producer's trace; logs and the events the
        # handler makes carry its ids.
        with record_span(message, envelope, self._group), handling(envelope):
            return self._process_envelope(message, envelope, marks)

    def _process_envelope(
        self, message: Message, envelope: events_pb2.Envelope, marks: _Marks
    ) -> Outcome | None:
        dedupe_key, attempts_key = self._keys(envelope.event_id)
        if envelope.event_id in marks.handled_here or marks.read(self._kv, dedupe_key) is not None:
            return self._finish(message, Outcome.DUPLICATE, None)

        # Tries made by earlier processes that died inside the handler count too.
        previous = int(marks.read(self._kv, attempts_key) or 0)
        error: BaseException = TransientError(
            f"the consumer process died while handling this event {previous} time(s)"
        )
        attempt = previous
        while attempt < self._max_attempts:
            attempt += 1
            self._kv.set(attempts_key, str(attempt), ttl_s=self._dedupe_ttl_s)
            try:
                self._handler(Delivery(message, envelope, attempt))
            except Interrupted as exc:
                self._interrupted(message, attempts_key, attempt, exc)
                return None  # left uncommitted: the next owner handles it from the start
            except ItemsRefused as refused:
                return self._refused(message, envelope, refused, attempt, marks)
            except Exception as exc:
                error = exc
                self._failed(message, attempt, exc)
                if isinstance(exc, NON_RETRYABLE):
                    break
                if attempt < self._max_attempts:
                    backoff = min(self._max_backoff_s, self._retry_backoff_s * 2 ** (attempt - 1))
                    if self._stopping.wait(backoff):
                        return None  # stopping: leave it uncommitted for the next owner
                continue
            marks.handled_here.add(envelope.event_id)
            return self._finish(message, Outcome.HANDLED, envelope.event_id)

        self._dead_letter(message, envelope, error, attempts=attempt)
        return self._finish(message, Outcome.DEAD_LETTERED, envelope.event_id)

    def _interrupted(
        self, message: Message, attempts_key: str, attempt: int, exc: Interrupted
    ) -> None:
        """The try stopped by a drain does not count; the service is draining: no retry."""
        log.info("handler interrupted on %s[%d]@%d: %s", *_where(message), exc.reason)
        if attempt > 1:
            self._kv.set(attempts_key, str(attempt - 1), ttl_s=self._dedupe_ttl_s)
        else:
            self._kv.delete(attempts_key)
        self.stop()

    def _refused(
        self,
        message: Message,
        envelope: events_pb2.Envelope,
        refused: ItemsRefused,
        attempt: int,
        marks: _Marks,
    ) -> Outcome:
        """The good items are applied; the refused ones go to the DLQ on their own."""
        log.warning("handler refused items of %s[%d]@%d: %s", *_where(message), refused.reason)
        self._dead_letter(message, refused.rest, refused, attempts=attempt)
        marks.handled_here.add(envelope.event_id)
        return self._finish(message, Outcome.PARTLY_DEAD_LETTERED, envelope.event_id)

    def _failed(self, message: Message, attempt: int, exc: BaseException) -> None:
        self._hooks.outcome(message.topic, Outcome.FAILED)
        log.warning(
            "handler failed on %s[%d]@%d (attempt %d/%d): %s: %s",
            *_where(message),
            attempt,
            self._max_attempts,
            type(exc).__name__,
            exc,
        )

    # -- one batch ----------------------------------------------------------------------------

    def _process_batch(
        self, handler: BatchHandler, messages: Sequence[Message], marks: _Marks
    ) -> list[Outcome | None]:
        """Steps 1–5 for records of one topic with ONE handler call per try: each record's
        outcome, None for one left uncommitted (a stop during the back-off, or a drain). Each
        record has its span, ended when the batch is done."""
        spans: dict[int, Span] = {}
        try:
            return self._handle_batch(handler, messages, marks, spans)
        finally:
            for span in spans.values():
                span.end()

    def _handle_batch(
        self,
        handler: BatchHandler,
        messages: Sequence[Message],
        marks: _Marks,
        spans: dict[int, Span],
    ) -> list[Outcome | None]:
        outcomes: list[Outcome | None] = [None] * len(messages)
        pending: list[_BatchItem] = []
        pending_ids: set[str] = set()  # an event twice in one batch runs once
        for i, message in enumerate(messages):
            envelope = marks.envelopes.get((message.topic, message.partition, message.offset))
            if envelope is None:  # poison, or an envelope not prefetched: the per-record path
                outcomes[i] = self._process(message, marks)
                continue
            dedupe_key, attempts_key = self._keys(envelope.event_id)
            spans[i] = start_record_span(message, envelope, self._group)
            with as_current(spans[i]), handling(envelope):
                if (
                    envelope.event_id in marks.handled_here
                    or envelope.event_id in pending_ids
                    or marks.read(self._kv, dedupe_key) is not None
                ):
                    outcomes[i] = self._finish(message, Outcome.DUPLICATE, None)
                    continue
                previous = int(marks.read(self._kv, attempts_key) or 0)
                if previous >= self._max_attempts:
                    died = TransientError(
                        f"the consumer process died while handling this event {previous} time(s)"
                    )
                    self._dead_letter(message, envelope, died, attempts=previous)
                    outcomes[i] = self._finish(message, Outcome.DEAD_LETTERED, envelope.event_id)
                    continue
            pending.append(_BatchItem(i, message, envelope, attempts_key, previous))
            pending_ids.add(envelope.event_id)

        while pending:
            for item in pending:
                item.attempt += 1
                self._kv.set(item.attempts_key, str(item.attempt), ttl_s=self._dedupe_ttl_s)
            with batch_span(messages[0].topic, [spans[item.index] for item in pending]):
                failed = self._call_batch(handler, pending)
            retry: list[_BatchItem] = []
            interrupted = False
            for item in pending:
                error = failed.get(item.envelope.event_id)
                message, envelope = item.message, item.envelope
                with as_current(spans[item.index]), handling(envelope):
                    if error is None:
                        marks.handled_here.add(envelope.event_id)
                        outcomes[item.index] = self._finish(
                            message, Outcome.HANDLED, envelope.event_id
                        )
                    elif isinstance(error, Interrupted):
                        self._interrupted(message, item.attempts_key, item.attempt, error)
                        interrupted = True
                    elif isinstance(error, ItemsRefused):
                        outcomes[item.index] = self._refused(
                            message, envelope, error, item.attempt, marks
                        )
                    else:
                        self._failed(message, item.attempt, error)
                        if isinstance(error, NON_RETRYABLE) or item.attempt >= self._max_attempts:
                            self._dead_letter(message, envelope, error, attempts=item.attempt)
                            outcomes[item.index] = self._finish(
                                message, Outcome.DEAD_LETTERED, envelope.event_id
                            )
                        else:
                            retry.append(item)
            if interrupted or not retry:
                break  # an interrupted record and the retries stay uncommitted (None)
            first = min(item.attempt for item in retry)
            backoff = min(self._max_backoff_s, self._retry_backoff_s * 2 ** (first - 1))
            if self._stopping.wait(backoff):
                break  # stopping: the retries are left uncommitted for the next owner
            pending = retry
        return outcomes

    def _call_batch(
        self, handler: BatchHandler, items: Sequence[_BatchItem]
    ) -> Mapping[str, BaseException]:
        """One call of the batch handler: the failed deliveries by event id (an exception out of
        the handler is every delivery's failure)."""
        deliveries = [Delivery(i.message, i.envelope, i.attempt) for i in items]
        try:
            result = handler(deliveries)
        except Exception as exc:
            return {i.envelope.event_id: exc for i in items}
        if result is None:
            return {}
        if not isinstance(result, BatchResult):
            raise TypeError(f"a batch handler returns a BatchResult or None, not {type(result)}")
        known = {i.envelope.event_id for i in items}
        if unknown := sorted(set(result.failed) - known):
            log.error("batch handler named event ids it was not given: %s", unknown[:5])
        return result.failed

    def _finish(self, message: Message, outcome: Outcome, event_id: str | None) -> Outcome:
        if event_id is not None and outcome is not Outcome.DUPLICATE:
            dedupe_key, attempts_key = self._keys(event_id)
            # A dead letter is NOT marked as handled: once the cause is fixed, replaying it
            # (replay_dead_letters) must run the handler again, with a fresh attempt budget.
            if outcome in (Outcome.HANDLED, Outcome.PARTLY_DEAD_LETTERED):
                self._kv.set_if_absent(dedupe_key, outcome.value, ttl_s=self._dedupe_ttl_s)
            self._kv.delete(attempts_key)
        self._hooks.outcome(message.topic, outcome)
        note_outcome(outcome.value)
        return outcome

    def _dead_letter(
        self,
        message: Message,
        envelope: events_pb2.Envelope | None,
        error: BaseException,
        *,
        attempts: int,
    ) -> None:
        publish_dead_letter(
            self._bus,
            group=self._group,
            topic=message.topic,
            key=message.key,
            # the refused items alone when a batch handler refused only some (ItemsRefused)
            value=(
                error.rest.SerializeToString() if isinstance(error, ItemsRefused) else message.value
            ),
            event_id=envelope.event_id if envelope is not None else "",
            error=error,
            attempts=attempts,
            partition=message.partition,
            offset=message.offset,
        )


def publish_dead_letter(
    bus: EventBus,
    *,
    group: str,
    topic: str,
    key: str,
    value: bytes,
    event_id: str,
    error: BaseException,
    attempts: int,
    partition: int = -1,
    offset: int = -1,
) -> None:
    """Publish ``value`` (a record of ``topic``) to ``<topic>.dlq`` as a DeadLetter envelope with
    the error (also as headers). Partition and offset are -1 for a record the group had already
    committed (e.g. feedback the feedback service parked, then refused when it could apply it)."""
    events = load_generated("events_pb2")
    text = (error.reason if isinstance(error, RiffloopError) else str(error)) or repr(error)
    text = text[:_MAX_ERROR_CHARS]
    if topic.endswith(DLQ_SUFFIX):
        # A reader of a dead-letter topic (the gateway marks failed generations) could not
        # handle one: there is no third level. The record stays in the DLQ for operators.
        log.error(
            "skipped %s[%d]@%d of a dead-letter topic after %d attempt(s): %s",
            topic,
            partition,
            offset,
            attempts,
            text,
        )
        return
    dead = events.DeadLetter(
        original_topic=topic,
        original_partition=partition,
        original_offset=offset,
        original_key=key,
        original_value=value,
        original_event_id=event_id,
        error=text,
        error_type=type(error).__name__,
        attempts=attempts,
        consumer_group=group,
    )
    headers = {
        "riffloop-error": text.replace("\n", " ")[:500],
        "riffloop-error-type": type(error).__name__,
        "riffloop-attempts": str(attempts),
        "riffloop-original-topic": topic,
        "riffloop-original-partition": str(partition),
        "riffloop-original-offset": str(offset),
        "riffloop-consumer-group": group,
    }
    target = dlq_topic(topic)
    bus.publish(target, key, new_envelope(group, dead), headers)
    log.error(
        "dead-lettered %s[%d]@%d to %s after %d attempt(s): %s",
        topic,
        partition,
        offset,
        target,
        attempts,
        text,
    )


def _where(message: Message) -> tuple[str, int, int]:
    return message.topic, message.partition, message.offset


REPLAY_GROUP = "riffloop-dlq-replay"


def replay_dead_letters(
    bus: EventBus,
    topic: str,
    *,
    group: str = REPLAY_GROUP,
    limit: int | None = None,
    idle_timeout_s: float = 2.0,
) -> int:
    """Republish the originals of ``<topic>.dlq`` to the topics they came from; return how many.

    Run it after fixing what made them fail. Each original goes back with its key and exact bytes
    (so its event_id: consumers that already handled it skip it as a duplicate); the replay group
    commits its DLQ offset after each republish, so a replay interrupted half-way resumes where it
    stopped. Stops after ``limit`` records or when the DLQ has been idle for ``idle_timeout_s``.
    """
    source = dlq_topic(topic)
    subscription = bus.subscribe(validate_group(group), [source])
    replayed = 0
    try:
        while limit is None or replayed < limit:
            batch = subscription.poll(idle_timeout_s, 1 if limit else 100)
            if not batch:
                break
            for message in batch:
                dead = decode_envelope(message.value, source).dead_letter
                bus.publish_raw(
                    dead.original_topic or topic,
                    dead.original_key or message.key,
                    dead.original_value,
                    {"riffloop-replayed-from": f"{source}[{message.partition}]@{message.offset}"},
                )
                subscription.commit(message)
                replayed += 1
                log.info(
                    "replayed %s[%d]@%d (event %s) from %s",
                    dead.original_topic,
                    dead.original_partition,
                    dead.original_offset,
                    dead.original_event_id or "?",
                    source,
                )
                if limit is not None and replayed >= limit:
                    break
    finally:
        subscription.close()
    return replayed
