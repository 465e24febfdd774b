"""Assemble the generator process: served model, consumer (deferred until a model is loaded)."""

from __future__ import annotations

import logging

from riffloop.runtime import (
    ConsumerWorker,
    DeferredWorker,
    EventRouter,
    LoopWorker,
    ModelStore,
    OperatorAuthInterceptor,
    Ports,
    ServedModel,
    ServiceRuntime,
    keep_current,
)
from riffloop.v1 import generator_service_pb2_grpc as pb_grpc
from services.generator._service import Generator, GeneratorServicer, GeneratorSettings

_log = logging.getLogger("riffloop.generator")


def build(settings: GeneratorSettings, ports: Ports) -> tuple[ServiceRuntime, Generator]:
    import torch

    operator_auth = OperatorAuthInterceptor.from_settings(settings)  # no secret: refuse
    torch.set_num_threads(settings.torch_threads)
    # the buckets it reads or writes: its S3 policy in production allows no others
    ports.prepare(settings.kafka_partitions, buckets=("songs", "latents", "tracks", "models"))
    model = ServedModel(ModelStore(ports.objects), settings.service_name)
    generator = Generator(settings, ports, model)
    runtime = ServiceRuntime.from_settings(settings, interceptors=[operator_auth], max_workers=4)
    runtime.add_service(
        pb_grpc.add_GeneratorServiceServicer_to_server,
        GeneratorServicer(generator),
        "riffloop.v1.GeneratorService",
    )
    for dependency, check in ports.readiness_checks().items():
        runtime.readiness.add_check(dependency, check)
    runtime.readiness.add_check("model", lambda: model.ready)

    # the first model, then the markers every model_poll_s (the event reaches one replica)
    runtime.add_worker(LoopWorker("generator-model", keep_current(model, settings.model_poll_s)))
    router = EventRouter(
        {"model.published.v1": generator.on_model_published},
        {"generation.requested.v1": generator.on_generation_requests},
        max_batch=settings.generation_batch,
    )
    runtime.add_worker(DeferredWorker(ConsumerWorker(settings, ports, router), lambda: model.ready))
    return runtime, generator
