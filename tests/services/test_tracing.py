"""One trace from a gateway call through Kafka to the feedback service's handler; OTLP export
only when RIFFLOOP_OTLP_ENDPOINT is set.

The gateway and the feedback service run in one process on shared in-memory ports (as in
test_listening_queue.py); spans go to an in-memory exporter, or, for the export tests, over
OTLP/HTTP to a collector stand-in on a loopback port.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Callable, Iterator

import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from riffloop.core import (
    ConfigurationError,
    decode_envelope,
    install_tracing,
    tracing_enabled,
    uninstall_tracing,
)
from riffloop.runtime import ServiceSettings, traces_url
from riffloop.v1 import common_pb2, events_pb2
from riffloop.v1 import gateway_service_pb2 as pb
from riffloop.v1 import gateway_service_pb2_grpc as pb_grpc
from tests.services.conftest import Running, shared_ports, start_service, wait_for, wav_bytes

pytestmark = pytest.mark.contract

Auth = Callable[[str], tuple[tuple[str, str], ...]]
RATE = "riffloop.v1.GatewayService/Rate"
FEEDBACK = "feedback.received.v1"
# A caller's W3C trace context (the example of the W3C Trace Context spec).
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


def _stack(**gateway: object) -> dict[str, Running]:
    ports = shared_ports()
    return {
        "gateway": start_service("gateway", ports, audio=lambda _: 6.0, **gateway),
        "feedback": start_service("feedback", ports, score_interval_s=60.0, scorer="inline"),
    }


def _stop(running: dict[str, Running]) -> None:
    for r in running.values():
        r.channel.close()
        r.runtime.stop()


def _served_track(running: dict[str, Running], auth: Auth, listener: str) -> str:
    """Publish a track (outside any call) and serve it to ``listener``; its id."""
    ports = running["gateway"].state
    audio = ports.objects.put("tracks", "t1.wav", wav_bytes(6.0), content_type="audio/wav")
    ready = events_pb2.TrackReady(
        track_id="t1",
        user_id="alice",
        duration_seconds=6.0,
        audio=audio.to_proto(),
        provenance=common_pb2.TrackProvenance(
            kind=common_pb2.TRACK_KIND_GENERATED,
            model_version="v0001",
            input_song_ids=["a" * 64],
            similarity=0.5,
            quality=5,
            start_step=2,
            baseline_song_id="corpus#1",
        ),
    )
    ports.publish("tracks.ready.v1", "t1", ready)
    wait_for(lambda: len(ports.kv.hgetall("gw:queue")) >= 1, what="a queued track")
    stub = pb_grpc.GatewayServiceStub(running["gateway"].channel)
    served = stub.NextTrack(pb.NextTrackRequest(), metadata=auth(listener))
    return str(served.track.track_id)


def _recorded(running: dict[str, Running]) -> int:
    state = running["feedback"].state
    with state.lock:
        return len(list(state.ledger.observations()))


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


def _named(spans: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in spans.get_finished_spans() if s.name == name]


def test_one_trace_spans_the_rate_call_its_event_and_the_feedback_handler(
    spans: InMemorySpanExporter, auth: Auth
) -> None:
    running = _stack()
    try:
        track = _served_track(running, auth, "carol")
        stub = pb_grpc.GatewayServiceStub(running["gateway"].channel)
        traceparent = f"00-{TRACE_ID}-{CALLER_SPAN}-01"
        response = stub.Rate(
            pb.RateRequest(track_id=track, stars=4),
            metadata=(*auth("carol"), ("traceparent", traceparent)),
        )
        wait_for(lambda: _recorded(running) == 1, what="the rating recorded")
        wait_for(lambda: bool(_named(spans, f"{FEEDBACK} process")), what="the consumer span")
    finally:
        _stop(running)

    (rpc,) = _named(spans, RATE)
    assert rpc.kind is SpanKind.SERVER
    assert format(rpc.context.trace_id, "032x") == TRACE_ID
    assert rpc.parent is not None and format(rpc.parent.span_id, "016x") == CALLER_SPAN
    rpc_attributes = dict(rpc.attributes or {})
    assert rpc_attributes["rpc.system"] == "grpc"
    assert rpc_attributes["rpc.method"] == "Rate"
    assert rpc_attributes["rpc.grpc.status_code"] == "OK"

    # the event on the topic carries the call's span as its parent
    bus = running["gateway"].state.bus
    (message,) = [
        m
        for m in bus.replay(FEEDBACK)
        if decode_envelope(m.value, FEEDBACK).event_id == response.event_id
    ]
    envelope = decode_envelope(message.value, FEEDBACK)
    assert envelope.trace_context["traceparent"].split("-")[1:3] == [
        TRACE_ID,
        format(rpc.context.span_id, "016x"),
    ]

    # the feedback service handled it in a span of the same trace, child of the call's
    (handled,) = [
        s
        for s in _named(spans, f"{FEEDBACK} process")
        if dict(s.attributes or {})["messaging.message.id"] == response.event_id
    ]
    assert handled.kind is SpanKind.CONSUMER
    assert handled.context.trace_id == rpc.context.trace_id
    assert handled.parent is not None and handled.parent.span_id == rpc.context.span_id
    attributes = dict(handled.attributes or {})
    assert attributes["messaging.destination.name"] == FEEDBACK
    assert attributes["messaging.destination.partition.id"] == str(message.partition)
    assert attributes["messaging.kafka.offset"] == message.offset
    assert attributes["messaging.consumer.group.name"] == "feedback"
    assert attributes["riffloop.consumer.outcome"] == "handled"
    assert attributes["riffloop.correlation_id"] == envelope.correlation_id


def test_a_call_without_a_request_id_takes_its_trace_id_as_correlation_id(
    spans: InMemorySpanExporter, auth: Auth
) -> None:
    running = _stack()
    try:
        track = _served_track(running, auth, "carol")
        stub = pb_grpc.GatewayServiceStub(running["gateway"].channel)
        _, call = stub.Rate.with_call(
            pb.RateRequest(track_id=track, stars=3), metadata=auth("carol")
        )
        wait_for(lambda: _recorded(running) == 1, what="the rating recorded")
        wait_for(lambda: bool(_named(spans, f"{FEEDBACK} process")), what="the consumer span")
    finally:
        _stop(running)
    (rpc,) = _named(spans, RATE)
    assert rpc.parent is None  # no traceparent: the call starts the trace
    request_id = dict(call.trailing_metadata())["x-request-id"]
    assert request_id == format(rpc.context.trace_id, "032x")
    (handled,) = _named(spans, f"{FEEDBACK} process")
    assert handled.context.trace_id == rpc.context.trace_id
    assert dict(handled.attributes or {})["riffloop.correlation_id"] == request_id


class _Collector:
    """An OTLP/HTTP collector stand-in: the ExportTraceServiceRequests posted to it."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, trace_service_pb2.ExportTraceServiceRequest]] = []
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = trace_service_pb2.ExportTraceServiceRequest()
                request.ParseFromString(body)
                collector.posts.append((self.path, request))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()
                self.wfile.write(trace_service_pb2.ExportTraceServiceResponse().SerializeToString())

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def span_names(self) -> dict[str, set[str]]:
        """Span names by service.name."""
        names: dict[str, set[str]] = {}
        for _, request in self.posts:
            for resource_spans in request.resource_spans:
                service = next(
                    a.value.string_value
                    for a in resource_spans.resource.attributes
                    if a.key == "service.name"
                )
                for scope in resource_spans.scope_spans:
                    names.setdefault(service, set()).update(s.name for s in scope.spans)
        return names


@pytest.fixture
def collector() -> Iterator[_Collector]:
    c = _Collector()
    try:
        yield c
    finally:
        c.close()


def test_with_an_endpoint_the_calls_spans_are_exported_over_otlp(
    collector: _Collector, auth: Auth
) -> None:
    running = _stack(otlp_endpoint=collector.url)
    try:
        assert tracing_enabled()
        _served_track(running, auth, "carol")
    finally:
        _stop(running)  # flushes the queued spans
    assert not tracing_enabled()
    assert collector.posts and {path for path, _ in collector.posts} == {"/v1/traces"}
    assert "riffloop.v1.GatewayService/NextTrack" in collector.span_names()["gateway"]


def test_with_no_endpoint_nothing_is_recorded_or_exported(
    collector: _Collector, auth: Auth
) -> None:
    running = _stack()  # RIFFLOOP_OTLP_ENDPOINT unset: the default
    try:
        assert not tracing_enabled()
        track = _served_track(running, auth, "carol")
        stub = pb_grpc.GatewayServiceStub(running["gateway"].channel)
        response = stub.Rate(pb.RateRequest(track_id=track, stars=4), metadata=auth("carol"))
        wait_for(lambda: _recorded(running) == 1, what="the rating recorded")
    finally:
        _stop(running)
    assert collector.posts == []
    bus = running["gateway"].state.bus
    envelopes = [decode_envelope(m.value, FEEDBACK) for m in bus.replay(FEEDBACK)]
    (rated,) = [e for e in envelopes if e.event_id == response.event_id]
    assert dict(rated.trace_context) == {}  # no span, no context to carry


def test_the_otlp_endpoint_setting_is_checked() -> None:
    assert ServiceSettings.from_env({}).otlp_endpoint == ""
    good = ServiceSettings.from_env({"RIFFLOOP_OTLP_ENDPOINT": "http://collector:4318"})
    assert traces_url(good.otlp_endpoint) == "http://collector:4318/v1/traces"
    assert traces_url("https://c.example/v1/traces/") == "https://c.example/v1/traces"
    for bad in ("collector:4318", "grpc://collector:4317", "http://", "http://c:4318/?x=1"):
        with pytest.raises(ConfigurationError, match="RIFFLOOP_OTLP_ENDPOINT"):
            ServiceSettings.from_env({"RIFFLOOP_OTLP_ENDPOINT": bad})
