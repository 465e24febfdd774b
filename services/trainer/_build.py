"""Assemble the trainer process: bootstrap the base model, consume training sets, serve."""

from __future__ import annotations

import logging
import threading

from riffloop.runtime import (
    ConsumerWorker,
    DeferredWorker,
    EventRouter,
    LoopWorker,
    OperatorAuthInterceptor,
    Ports,
    RebuildPlan,
    RebuildWatch,
    ServiceRuntime,
    ensure_rebuilt,
    trainer_rebuild_plan,
)
from riffloop.v1 import trainer_service_pb2_grpc as pb_grpc
from services.trainer._service import TrainerHandlers, TrainerServicer, scored_tracks
from services.trainer._settings import TrainerSettings

_log = logging.getLogger("riffloop.trainer")


def rebuild_plan(settings: TrainerSettings, ports: Ports) -> RebuildPlan:
    """What rebuilds this trainer's Redis state from Kafka (riffloop.runtime)."""
    return trainer_rebuild_plan(
        ports.kv,
        ports.objects,
        scored_tracks,
        min_ratings=settings.canary_min_ratings,
        max_ratings=settings.canary_max_ratings,
    )


def build(settings: TrainerSettings, ports: Ports) -> tuple[ServiceRuntime, TrainerHandlers]:
    import torch

    operator_auth = OperatorAuthInterceptor.from_settings(settings)  # no secret: refuse
    settings.base_model_path()  # no trained base model and no RIFFLOOP_UNTRAINED_BASE: refuse
    torch.set_num_threads(settings.torch_threads)
    # the buckets it reads or writes: its S3 policy in production allows no others
    ports.prepare(settings.kafka_partitions, buckets=("latents", "tracks", "trainsets", "models"))
    core = TrainerHandlers(settings, ports)
    # Redis emptied (or a new deployment): a running canary's evidence again from the log,
    # before the bootstrap resumes the canary from it; while serving, the watch does the same
    plan = rebuild_plan(settings, ports)
    ensure_rebuilt(ports.bus, ports.kv, plan)
    runtime = ServiceRuntime.from_settings(settings, interceptors=[operator_auth], max_workers=4)
    runtime.add_service(
        pb_grpc.add_TrainerServiceServicer_to_server,
        TrainerServicer(core),
        "riffloop.v1.TrainerService",
    )
    for dependency, check in ports.readiness_checks().items():
        runtime.readiness.add_check(dependency, check)
    base_ready = threading.Event()
    runtime.readiness.add_check("model", base_ready.is_set)

    def bootstrap(stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                core.ensure_base()
                base_ready.set()
                return
            except Exception:
                _log.exception("publishing the base model failed; retrying")
            stop.wait(2.0)

    runtime.add_worker(LoopWorker("trainer-bootstrap", bootstrap))
    router = EventRouter(
        {
            "trainset.published.v1": core.on_trainset_published,
            "tracks.scored.v1": core.on_track_scored,
        }
    )
    consumer = ConsumerWorker(settings, ports, router)
    runtime.add_worker(DeferredWorker(consumer, base_ready.is_set))
    runtime.add_worker(
        RebuildWatch(
            settings.service_name, ports.bus, ports.kv, plan, interval_s=settings.rebuild_check_s
        )
    )

    class _StopTraining:
        name = "trainer-stop"

        def start(self) -> None:
            pass

        def stop(self, timeout_s: float) -> None:
            core.cycle.stopping.set()

    runtime.add_worker(_StopTraining())
    return runtime, core
