"""Which unit of work the current thread is doing, for the logs and for the events it publishes.

- ``correlation_id``: the id of what started a chain of events, the client's request id when a
  gRPC call started it. ``new_envelope`` copies it into every event it makes, and a consumer
  handling an event makes the event's correlation id current again, so the log lines and events
  that follow from one ``Upload``, ``Generate`` or ``Rate`` call (upload → encoded → requested
  → ready; rating → recorded) carry that call's request id. Work a timer starts (the feedback
  service's scoring pass, the selector's selection, training on its set) aggregates many calls
  and starts a chain of its own: its events carry an empty correlation id, and their handlers
  log under the event's own id.
- ``event_id``: the event a consumer is handling now (logs only).

Context variables: each gRPC call and each consumer thread sees its own values.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

correlation_id_var: contextvars.ContextVar[str] = contextvars.ContextVar(
    "correlation_id", default=""
)
event_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("event_id", default="")


@contextmanager
def correlated(correlation_id: str) -> Iterator[None]:
    """Events made inside carry ``correlation_id`` (a gRPC call: its request id)."""
    token = correlation_id_var.set(correlation_id)
    try:
        yield
    finally:
        correlation_id_var.reset(token)


@contextmanager
def handling(envelope: Any) -> Iterator[None]:
    """While a consumer handles ``envelope``: its event id and its correlation id (its own
    event id when it carries none, e.g. one made outside any call) are current."""
    event = event_id_var.set(str(envelope.event_id))
    correlation = correlation_id_var.set(str(envelope.correlation_id or envelope.event_id))
    try:
        yield
    finally:
        correlation_id_var.reset(correlation)
        event_id_var.reset(event)
