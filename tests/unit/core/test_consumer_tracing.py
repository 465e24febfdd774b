"""Trace context through envelopes and the consumer loop (riffloop.core._tracing), recorded by an
in-memory span exporter."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from riffloop.core import (
    BatchResult,
    Consumer,
    Delivery,
    MemoryEventBus,
    MemoryKeyValueStore,
    Topic,
    decode_envelope,
    dlq_topic,
    install_tracing,
    new_envelope,
    tracing_enabled,
    uninstall_tracing,
)
from riffloop.v1 import events_pb2

pytestmark = pytest.mark.unit

TOPIC = Topic.FEEDBACK_RECEIVED.value
SCORED = Topic.TRACKS_SCORED.value


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    install_tracing(provider)
    try:
        yield exporter
    finally:
        uninstall_tracing()


def rating(track_id: str = "t1") -> events_pb2.Envelope:
    return new_envelope(
        "gateway",
        events_pb2.FeedbackReceived(
            user_id="u1", track_id=track_id, rating=events_pb2.TrackRating(stars=4)
        ),
    )


def test_with_tracing_off_envelopes_carry_no_trace_context_and_nothing_records() -> None:
    assert not tracing_enabled()
    assert dict(rating().trace_context) == {}
    bus, kv = _bus(), MemoryKeyValueStore()
    bus.publish(TOPIC, "t1", rating())
    seen: list[bool] = []
    consumer = Consumer(
        bus,
        kv,
        group="g",
        topics=[TOPIC],
        handler=lambda d: seen.append(trace.get_current_span().is_recording()),
    )
    while consumer.run_once(0.01):
        pass
    assert seen == [False]


def test_an_envelope_made_in_a_span_carries_its_w3c_context(
    spans: InMemorySpanExporter,
) -> None:
    tracer = trace.get_tracer("test", tracer_provider=_provider_of(spans))
    with tracer.start_as_current_span("call") as span:
        envelope = rating()
    context = span.get_span_context()
    version, trace_id, span_id, flags = envelope.trace_context["traceparent"].split("-")
    assert version == "00" and int(flags, 16) & 1  # sampled
    assert int(trace_id, 16) == context.trace_id
    assert int(span_id, 16) == context.span_id
    # the context survives the wire format
    assert decode_envelope(envelope.SerializeToString(), TOPIC).trace_context == (
        envelope.trace_context
    )


def test_the_consumer_continues_the_producers_trace_in_one_span_per_record(
    spans: InMemorySpanExporter,
) -> None:
    bus, kv = _bus(), MemoryKeyValueStore()
    tracer = trace.get_tracer("test", tracer_provider=_provider_of(spans))
    with tracer.start_as_current_span("rpc") as rpc:
        first, second = rating("t1"), rating("t2")
    untraced = new_envelope(  # made outside any span: its record starts a trace
        "gateway", events_pb2.FeedbackReceived(user_id="u", track_id="t3")
    )
    published = [bus.publish(TOPIC, e.feedback_received.track_id, e) for e in (first, second)]
    bus.publish(TOPIC, "t3", untraced)

    def handle(delivery: Delivery) -> None:  # what the handler publishes continues the trace
        bus.publish(SCORED, "k", new_envelope("feedback", events_pb2.TrackScored(track_id="x")))

    consumer = Consumer(bus, kv, group="feedback", topics=[TOPIC], handler=handle)
    while consumer.run_once(0.01):
        pass

    records = [s for s in spans.get_finished_spans() if s.name == f"{TOPIC} process"]
    assert len(records) == 3
    trace_id = rpc.get_span_context().trace_id
    traced = [s for s in records if s.context.trace_id == trace_id]
    assert len(traced) == 2
    for span, envelope in zip(
        sorted(traced, key=lambda s: str(dict(s.attributes or {})["messaging.message.id"])),
        sorted((first, second), key=lambda e: e.event_id),
        strict=True,
    ):
        assert span.kind is SpanKind.CONSUMER
        assert span.parent is not None and span.parent.span_id == rpc.get_span_context().span_id
        attributes = dict(span.attributes or {})
        assert attributes["messaging.destination.name"] == TOPIC
        assert attributes["messaging.consumer.group.name"] == "feedback"
        assert attributes["messaging.message.id"] == envelope.event_id
        assert attributes["riffloop.consumer.outcome"] == "handled"
    positions = set()
    for span in traced:
        attributes = dict(span.attributes or {})
        positions.add(
            (attributes["messaging.destination.partition.id"], attributes["messaging.kafka.offset"])
        )
    assert positions == {(str(p.partition), p.offset) for p in published}
    (other,) = [s for s in records if s.context.trace_id != trace_id]
    assert other.parent is None

    scored = [decode_envelope(m.value, SCORED) for m in bus.replay(SCORED)]
    by_record = {s.context.span_id: s.context.trace_id for s in records}
    for envelope in scored:
        _, trace_hex, parent_hex, _ = envelope.trace_context["traceparent"].split("-")
        assert by_record[int(parent_hex, 16)] == int(trace_hex, 16)


def test_a_poison_record_and_a_dead_letter_each_get_a_span(spans: InMemorySpanExporter) -> None:
    bus, kv = _bus(), MemoryKeyValueStore()
    bus.publish_raw(TOPIC, "k", b"not an envelope")
    bus.publish(TOPIC, "t1", rating())

    def refuse(delivery: Delivery) -> None:
        from riffloop.core import ValidationError

        raise ValidationError("no such track")

    consumer = Consumer(bus, kv, group="g", topics=[TOPIC], handler=refuse)
    while consumer.run_once(0.01):
        pass
    records = [s for s in spans.get_finished_spans() if s.name == f"{TOPIC} process"]
    assert [dict(s.attributes or {})["riffloop.consumer.outcome"] for s in records] == [
        "dead_lettered",
        "dead_lettered",
    ]
    assert all(s.status.status_code is trace.StatusCode.ERROR for s in records)
    # the dead letter of the decodable record continues its record's trace
    letters = [decode_envelope(m.value, dlq_topic(TOPIC)) for m in bus.replay(dlq_topic(TOPIC))]
    traced = [e for e in letters if e.trace_context]
    assert len(traced) == 2
    assert {e.trace_context["traceparent"].split("-")[1] for e in traced} == {
        format(s.context.trace_id, "032x") for s in records
    }


def test_a_batch_handler_call_links_the_spans_of_its_records(spans: InMemorySpanExporter) -> None:
    bus, kv = _bus(), MemoryKeyValueStore()
    tracer = trace.get_tracer("test", tracer_provider=_provider_of(spans))
    for track in ("a", "b", "c"):
        with tracer.start_as_current_span(f"rpc {track}"):
            bus.publish(TOPIC, "same-key", rating(track))

    def batch(deliveries: list[Delivery]) -> BatchResult:
        return BatchResult()

    consumer = Consumer(
        bus,
        kv,
        group="g",
        topics=[TOPIC],
        handler=lambda d: None,
        batch_handlers={TOPIC: lambda ds: batch(list(ds))},
    )
    while consumer.run_once(0.01):
        pass
    finished = spans.get_finished_spans()
    rpcs = {s.context.trace_id for s in finished if s.name.startswith("rpc ")}
    records = [s for s in finished if s.name == f"{TOPIC} process"]
    assert {s.context.trace_id for s in records} == rpcs
    assert all(dict(s.attributes or {})["riffloop.consumer.outcome"] == "handled" for s in records)
    (call,) = [s for s in finished if s.name == f"{TOPIC} process batch"]
    assert {link.context.span_id for link in call.links} == {s.context.span_id for s in records}


def test_a_malformed_traceparent_starts_a_new_trace(spans: InMemorySpanExporter) -> None:
    bus, kv = _bus(), MemoryKeyValueStore()
    envelope = rating()
    envelope.trace_context["traceparent"] = "00-not-a-trace-01"
    bus.publish(TOPIC, "t1", envelope)
    consumer = Consumer(bus, kv, group="g", topics=[TOPIC], handler=lambda d: None)
    while consumer.run_once(0.01):
        pass
    (span,) = spans.get_finished_spans()
    assert span.parent is None and span.context.is_valid
    assert dict(span.attributes or {})["riffloop.consumer.outcome"] == "handled"


def _bus() -> MemoryEventBus:
    bus = MemoryEventBus()
    bus.ensure_topics([TOPIC, dlq_topic(TOPIC), SCORED])
    return bus


def _provider_of(spans: InMemorySpanExporter) -> trace.TracerProvider:
    """A second provider on the same exporter, for the spans that stand in for callers."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    return provider
