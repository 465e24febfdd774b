"""Assemble the feedback process: rebuild the ledger, consume, score periodically, serve."""

from __future__ import annotations

import logging
import threading
import time

from riffloop.loop import ConfidenceWeight, SpamFilter
from riffloop.runtime import (
    ConsumerWorker,
    EventRouter,
    LoopWorker,
    OperatorAuthInterceptor,
    Ports,
    RebuildWatch,
    ServiceRuntime,
    ensure_rebuilt,
    feedback_rebuild_plan,
)
from riffloop.v1 import feedback_service_pb2_grpc as pb_grpc
from services.feedback._scorer import InlineScorer, ProcessScorer
from services.feedback._service import FeedbackServicer, FeedbackSettings, FeedbackState

_log = logging.getLogger("riffloop.feedback")


def build(settings: FeedbackSettings, ports: Ports) -> tuple[ServiceRuntime, FeedbackState]:
    operator_auth = OperatorAuthInterceptor.from_settings(settings)  # no secret: refuse
    # the buckets it reads or writes: its S3 policy in production allows no others
    ports.prepare(settings.kafka_partitions, buckets=())
    spam, confidence = SpamFilter(), ConfidenceWeight()
    scorer = (
        ProcessScorer(
            spam,
            confidence,
            niceness=settings.scorer_niceness,
            timeout_s=settings.score_timeout_s,
        )
        if settings.scorer == "process"
        else InlineScorer(spam, confidence)
    )
    # Its imports (≈ 2 s of CPU) happen before the service reports SERVING, not in a pass.
    scorer.start()
    state = FeedbackState(ports, scorer=scorer)
    # Redis emptied since the last start (or a new deployment): its state again from the log,
    # before the ledger is read from it
    plan = feedback_rebuild_plan(ports.kv, ports.bus, producer=ports.producer)
    ensure_rebuilt(ports.bus, ports.kv, plan)
    rebuilt = state.rebuild()
    released = state.release_parked()  # parked before a crash, their tracks ready since
    _log.info("ledger rebuilt", extra={"ratings": rebuilt, "parked_released": released})
    runtime = ServiceRuntime.from_settings(settings, interceptors=[operator_auth])
    runtime.add_service(
        pb_grpc.add_FeedbackServiceServicer_to_server,
        FeedbackServicer(state),
        "riffloop.v1.FeedbackService",
    )
    for dependency, check in ports.readiness_checks().items():
        runtime.readiness.add_check(dependency, check)
    router = EventRouter(
        {"tracks.ready.v1": state.on_track_ready, "feedback.received.v1": state.on_feedback}
    )
    runtime.add_worker(ConsumerWorker(settings, ports, router))
    # emptied while serving: the ledger in memory holds on; its mirror is written again
    runtime.add_worker(
        RebuildWatch(
            settings.service_name,
            ports.bus,
            ports.kv,
            plan,
            interval_s=settings.rebuild_check_s,
            on_rebuilt=state.on_store_rebuilt,
        )
    )

    def score_loop(stop: threading.Event) -> None:
        last_pass_s = 0.0
        try:
            while not stop.wait(settings.score_wait_s(last_pass_s)):
                started = time.monotonic()
                try:
                    state.publish_scores()
                except Exception:  # a failed pass retries on the next tick; tracks stay dirty
                    _log.exception("scoring pass failed")
                try:
                    state.expire_parked(settings.park_max_age_s)
                except Exception:  # retried on the next tick; nothing was forgotten
                    _log.exception("expiring parked feedback failed")
                last_pass_s = time.monotonic() - started
        finally:
            state.close()  # the scorer's child process ends with the loop

    runtime.add_worker(LoopWorker("feedback-scorer", score_loop))
    return runtime, state
