"""OpenTelemetry traces that follow a chain of work across gRPC and Kafka.

The correlation id (``riffloop.core._context``) says which client call a log line or an event
belongs to; the trace context says the same to a tracing backend, span by span:

1. A gRPC call is a SERVER span (``riffloop.runtime.ObservabilityInterceptor``). It continues
   the caller's trace when the call's metadata carries a W3C ``traceparent``, else it starts one;
   a call without ``x-request-id`` takes the trace id (32 hex digits) as its request id, so the
   correlation id in the logs and events is the trace id a tracing backend shows.
2. ``new_envelope`` copies the current span's context into ``Envelope.trace_context``
   (``traceparent``, ``tracestate``).
3. The consumer handles each record in a CONSUMER span whose parent is the envelope's context,
   with the topic, partition, offset, event id and consumer group as attributes; events the
   handler publishes continue the same trace. A batch handler's call is one span linked to the
   spans of its records.

A malformed ``traceparent`` is ignored and a new trace starts (W3C Trace Context: a receiver
that cannot parse it restarts the trace rather than refusing the request).

Off by default: until :func:`install_tracing` is given a provider (the runtime does so when
``RIFFLOOP_OTLP_ENDPOINT`` is set), spans come from OpenTelemetry's no-op tracer: nothing is
recorded or exported, and a context that arrives is passed on unchanged; a call or record that
brings none skips even the no-op tracer's context switch. Tracing is per process,
like logging: tests install a provider with an in-memory exporter and uninstall it after.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import INVALID_SPAN, Link, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

TRACEPARENT = "traceparent"
_W3C = TraceContextTextMapPropagator()
_SCOPE = "riffloop"

# gRPC codes that are the server's fault (OpenTelemetry semantic conventions for RPC servers:
# other codes, e.g. INVALID_ARGUMENT or NOT_FOUND, leave the span's status unset).
_SERVER_ERRORS = frozenset(
    {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
)

_lock = threading.Lock()
_tracer: trace.Tracer = trace.NoOpTracer()
_provider: Any = None


def install_tracing(provider: trace.TracerProvider) -> None:
    """Record spans with ``provider`` in this process (the previous one is shut down)."""
    global _tracer, _provider
    with _lock:
        previous, _provider = _provider, provider
        _tracer = provider.get_tracer(_SCOPE)
    if previous is not None and previous is not provider:
        previous.shutdown()


def uninstall_tracing() -> None:
    """Back to the no-op tracer; the installed provider flushes its spans and shuts down."""
    global _tracer, _provider
    with _lock:
        previous, _provider = _provider, None
        _tracer = trace.NoOpTracer()
    if previous is not None:
        previous.shutdown()


def tracing_enabled() -> bool:
    return _provider is not None


def _parent(carrier: Mapping[str, Any]) -> Any:
    """The context a W3C carrier names, or None (a new trace) when it names none."""
    if TRACEPARENT not in carrier:
        return None
    return _W3C.extract({k: v for k, v in carrier.items() if isinstance(v, str)})


@contextmanager
def rpc_span(full_method: str, metadata: Mapping[str, Any], system: str = "grpc") -> Iterator[Span]:
    """The SERVER span of one call (current while the handler runs): a gRPC call, or with
    ``system="connect_rpc"`` the same method over the Connect protocol (the browser API).
    ``metadata``: the call's metadata or HTTP headers, names in lower case."""
    if _provider is None and TRACEPARENT not in metadata:
        yield INVALID_SPAN  # what the no-op tracer would make, without its context switch
        return
    _, _, name = full_method.partition("/")
    service, _, method = name.partition("/")
    with _tracer.start_as_current_span(
        name or full_method,
        context=_parent(metadata),
        kind=SpanKind.SERVER,
        attributes={"rpc.system": system, "rpc.service": service, "rpc.method": method},
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        yield span


def request_id_of(span: Span) -> str:
    """A request id for a call that brought none: the trace id, or a UUID4 with no trace."""
    context = span.get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else uuid.uuid4().hex


def end_rpc(span: Span, code: str, request_id: str, system: str = "grpc") -> None:
    """Record the call's status code (a gRPC name such as "OK") and request id on its span. Over
    Connect the semantic conventions name only an error, in Connect's spelling ("not_found")."""
    if not span.is_recording():
        return
    if system == "connect_rpc":
        if code != "OK":
            span.set_attribute("rpc.connect_rpc.error_code", code.lower())
    else:
        span.set_attribute("rpc.grpc.status_code", code)
    span.set_attribute("riffloop.request_id", request_id)
    if code in _SERVER_ERRORS:
        span.set_status(Status(StatusCode.ERROR, code))


def inject_trace_context(carrier: MutableMapping[str, str]) -> None:
    """Write the current span's W3C context into ``carrier`` (nothing when there is none)."""
    _W3C.inject(carrier)


def _record_attributes(message: Any, envelope: Any, group: str) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "messaging.system": "kafka",
        "messaging.operation.type": "process",
        "messaging.destination.name": message.topic,
        "messaging.destination.partition.id": str(message.partition),
        "messaging.kafka.offset": message.offset,
        "messaging.consumer.group.name": group,
    }
    if envelope is not None:
        attributes["messaging.message.id"] = envelope.event_id
        attributes["riffloop.correlation_id"] = envelope.correlation_id
    return attributes


def start_record_span(message: Any, envelope: Any, group: str) -> Span:
    """The CONSUMER span of one record, child of the envelope's trace context (not current:
    :func:`record_span` or ``trace.use_span`` makes it so); ``envelope`` None for a record
    that does not parse."""
    carrier = envelope.trace_context if envelope is not None else {}
    if _provider is None and TRACEPARENT not in carrier:
        return INVALID_SPAN
    return _tracer.start_span(
        f"{message.topic} process",
        context=_parent(carrier),
        kind=SpanKind.CONSUMER,
        attributes=_record_attributes(message, envelope, group),
        record_exception=False,
        set_status_on_exception=False,
    )


@contextmanager
def record_span(message: Any, envelope: Any, group: str) -> Iterator[Span]:
    """One record handled: its span is current, and ended after."""
    span = start_record_span(message, envelope, group)
    if span is INVALID_SPAN:
        yield span
        return
    with trace.use_span(span, end_on_exit=True, record_exception=False):
        yield span


@contextmanager
def batch_span(topic: str, records: Sequence[Span]) -> Iterator[Span]:
    """One call of a batch handler: a span linked to the spans of the records it handles."""
    if _provider is None:
        yield INVALID_SPAN
        return
    links = [Link(s.get_span_context()) for s in records if s.get_span_context().is_valid]
    with _tracer.start_as_current_span(
        f"{topic} process batch",
        kind=SpanKind.CONSUMER,
        links=links,
        attributes={"messaging.system": "kafka", "messaging.batch.message_count": len(records)},
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        yield span


def as_current(span: Span) -> Any:
    """Make a started span current in a ``with`` block (it is not ended on exit)."""
    if span is INVALID_SPAN:
        return contextlib.nullcontext(span)
    return trace.use_span(span, end_on_exit=False, record_exception=False)


def note_outcome(outcome: str) -> None:
    """What became of the record being handled (handled, duplicate, dead_lettered…), on its
    span (the current one)."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attribute("riffloop.consumer.outcome", outcome)
        if outcome == "dead_lettered":
            span.set_status(Status(StatusCode.ERROR, "dead-lettered"))
