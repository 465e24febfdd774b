"""A service's Kafka consumer loop as a process worker, with its metrics wired in.

``EventRouter`` maps each topic to one handler taking the decoded Envelope (services write
``{"tracks.ready.v1": events.on_track_ready}``), and a topic to a *batch* handler taking the
decoded Envelopes of one poll together (up to ``max_batch``, in order) and returning a
``riffloop.core.BatchResult`` that names the envelopes it failed on (the generator batches its
UNet this way); ``ConsumerWorker`` runs the shared idempotent
``riffloop.core.Consumer`` (dedupe, retries, DLQ) in a thread and stops it on drain, which
commits the in-flight record's offset before the process exits.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from riffloop.core import BatchResult, Settings, ValidationError
from riffloop.runtime import metrics

EnvelopeHandler = Callable[[Any], None]
BatchEnvelopeHandler = Callable[[Sequence[Any]], BatchResult | None]
_log = logging.getLogger("riffloop.runtime")


class EventRouter:
    def __init__(
        self,
        handlers: Mapping[str, EnvelopeHandler],
        batches: Mapping[str, BatchEnvelopeHandler] | None = None,
        *,
        max_batch: int = 16,
    ) -> None:
        self.handlers = dict(handlers)
        self.batches = dict(batches or {})
        if both := sorted(set(self.handlers) & set(self.batches)):
            raise ValidationError(f"topics with a handler and a batch handler: {both}")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValidationError(f"max_batch must be an integer ≥ 1, got {max_batch!r}")
        self.max_batch = max_batch

    @property
    def topics(self) -> list[str]:
        return sorted({*self.handlers, *self.batches})

    def __call__(self, delivery: Any) -> None:
        handler = self.handlers.get(delivery.message.topic)
        if handler is None:
            raise ValidationError(f"no handler for topic {delivery.message.topic}")
        handler(delivery.envelope)

    def batch_handlers(self) -> dict[str, Callable[[Sequence[Any]], BatchResult | None]]:
        """The consumer's batch handlers: each passes the deliveries' envelopes on."""

        def of(handler: BatchEnvelopeHandler) -> Callable[[Sequence[Any]], BatchResult | None]:
            return lambda deliveries: handler([d.envelope for d in deliveries])

        return {topic: of(handler) for topic, handler in self.batches.items()}


class ConsumerWorker:
    """Worker (see ``ServiceRuntime.add_worker``) around one ``riffloop.core.Consumer``."""

    def __init__(self, settings: Settings, ports: Any, router: EventRouter) -> None:
        from riffloop.core import Consumer, ConsumerHooks

        service = settings.service_name
        self.name = f"{service}-consumer"

        def on_outcome(topic: str, outcome: Any) -> None:
            metrics.KAFKA_MESSAGES.labels(service, topic, str(outcome)).inc()
            if str(outcome) in ("dead_lettered", "partly_dead_lettered") and not topic.endswith(
                ".dlq"
            ):  # a DLQ record each (a DLQ's own unreadable record is skipped, not sent on)
                metrics.DLQ_MESSAGES.labels(service, topic).inc()

        def on_lag(topic: str, lag: int) -> None:
            metrics.KAFKA_CONSUMER_LAG.labels(service, topic).set(lag)

        metrics.init_consumer_series(service, router.topics)
        self.consumer = Consumer.from_settings(
            settings,
            ports.bus,
            ports.kv,
            topics=router.topics,
            handler=router,
            hooks=ConsumerHooks(on_outcome=on_outcome, on_lag=on_lag),
            batch_handlers=router.batch_handlers(),
            max_batch=router.max_batch,
        )
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self.failed: BaseException | None = None

    def _run(self) -> None:
        try:
            self.consumer.run()
        except BaseException as exc:  # a bug or an error the loop does not retry: the process
            self.failed = exc  # is broken, and its liveness says so (ServiceRuntime)
            _log.exception("consumer %s died", self.name)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float) -> None:
        self.consumer.stop()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
