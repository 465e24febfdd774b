"""Assemble the selector process: rebuild, consume, select periodically, serve."""

from __future__ import annotations

import logging
import threading

from riffloop.runtime import ConsumerWorker, EventRouter, LoopWorker, Ports, ServiceRuntime
from riffloop.v1 import selector_service_pb2_grpc as pb_grpc
from services.selector._service import SelectorServicer, SelectorSettings, SelectorState

_log = logging.getLogger("riffloop.selector")


def build(settings: SelectorSettings, ports: Ports) -> tuple[ServiceRuntime, SelectorState]:
    ports.prepare(settings.kafka_partitions)
    state = SelectorState(ports, settings)
    state.rebuild()
    runtime = ServiceRuntime.from_settings(settings)
    runtime.add_service(
        pb_grpc.add_SelectorServiceServicer_to_server,
        SelectorServicer(state),
        "riffloop.v1.SelectorService",
    )
    for dependency, check in ports.readiness_checks().items():
        runtime.readiness.add_check(dependency, check)
    router = EventRouter(
        {"tracks.scored.v1": state.on_track_scored, "model.published.v1": state.on_model_published}
    )
    runtime.add_worker(ConsumerWorker(settings, ports, router))

    def select_loop(stop: threading.Event) -> None:
        while not stop.wait(settings.select_interval_s):
            try:
                state.select_once()
            except Exception:  # the next tick retries; scores stay in memory
                _log.exception("selection pass failed")

    runtime.add_worker(LoopWorker("selector-select", select_loop))
    return runtime, state
