"""Trace export over OTLP/HTTP: the SDK side of riffloop.core._tracing.

``start_tracing(settings)`` installs a tracer provider that batches spans to
``RIFFLOOP_OTLP_ENDPOINT`` (``<endpoint>/v1/traces``), with ``service.name`` = the service's
name; with no endpoint it does nothing and the process keeps OpenTelemetry's no-op tracer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from riffloop.core._tracing import install_tracing, uninstall_tracing

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

TRACES_PATH = "/v1/traces"


def traces_url(endpoint: str) -> str:
    """The collector's traces URL: ``endpoint`` + /v1/traces unless it names that path."""
    base = endpoint.rstrip("/")
    return base if base.endswith(TRACES_PATH) else base + TRACES_PATH


def tracer_provider(service_name: str, exporter: SpanExporter) -> TracerProvider:
    """A provider that sends spans to ``exporter`` in batches (the SDK's defaults: up to 512
    spans every 5 s, 2,048 queued; spans beyond the queue are dropped, never blocking a call)."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def start_tracing(settings: object) -> bool:
    """Export spans over OTLP/HTTP when the settings name an endpoint; True if it does."""
    endpoint = str(getattr(settings, "otlp_endpoint", ""))
    if not endpoint:
        return False
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    exporter = OTLPSpanExporter(endpoint=traces_url(endpoint))
    install_tracing(tracer_provider(str(getattr(settings, "service_name", "riffloop")), exporter))
    return True


def stop_tracing() -> None:
    """Flush the spans still queued and go back to the no-op tracer."""
    uninstall_tracing()
