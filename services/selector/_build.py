"""Assemble the selector process: rebuild, consume, select periodically, serve."""

from __future__ import annotations

import logging
import threading
from typing import Any

from riffloop.runtime import (
    ConsumerWorker,
    EventRouter,
    LoopWorker,
    OperatorAuthInterceptor,
    Ports,
    RebuildPlan,
    RebuildWatch,
    ServiceRuntime,
    ensure_rebuilt,
    selector_rebuild_plan,
)
from riffloop.v1 import selector_service_pb2_grpc as pb_grpc
from services.selector._service import SelectorServicer, SelectorSettings, SelectorState

_log = logging.getLogger("riffloop.selector")


def rebuild_plan(settings: SelectorSettings, ports: Ports) -> RebuildPlan:
    """What rebuilds this selector's Redis state from Kafka (riffloop.runtime)."""

    def consumer_handlers() -> dict[str, Any]:
        fresh = SelectorState(ports, settings)  # writes the store as the live handlers do
        return {
            "tracks.scored.v1": fresh.on_track_scored,
            "model.published.v1": fresh.on_model_published,
        }

    return selector_rebuild_plan(
        ports.kv, ports.objects, consumer_handlers, purges=settings.selection == "genetic"
    )


def build(settings: SelectorSettings, ports: Ports) -> tuple[ServiceRuntime, SelectorState]:
    operator_auth = OperatorAuthInterceptor.from_settings(settings)  # no secret: refuse
    # the buckets it reads or writes: its S3 policy in production allows no others
    ports.prepare(settings.kafka_partitions, buckets=("tracks", "trainsets"))
    state = SelectorState(ports, settings)
    # Redis emptied (or a new deployment): its state again from the log before it is read
    plan = rebuild_plan(settings, ports)
    ensure_rebuilt(ports.bus, ports.kv, plan)
    state.rebuild()
    runtime = ServiceRuntime.from_settings(settings, interceptors=[operator_auth])
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
    # emptied while serving: the scores in memory hold on; the store, purged pairs included,
    # is written again before a selection pass reads it wrong for long
    runtime.add_worker(
        RebuildWatch(
            settings.service_name, ports.bus, ports.kv, plan, interval_s=settings.rebuild_check_s
        )
    )

    def select_loop(stop: threading.Event) -> None:
        while not stop.wait(settings.select_interval_s):
            try:
                state.select_once()
            except Exception:  # the next tick retries; scores stay in memory
                _log.exception("selection pass failed")

    runtime.add_worker(LoopWorker("selector-select", select_loop))
    return runtime, state
