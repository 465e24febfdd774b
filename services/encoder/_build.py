"""Assemble the encoder process: model holder (waits for models/CURRENT), consumer, server."""

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
from riffloop.v1 import encoder_service_pb2_grpc as pb_grpc
from services.encoder._service import Encoder, EncoderServicer, EncoderSettings, keep_latents

_log = logging.getLogger("riffloop.encoder")


def build(settings: EncoderSettings, ports: Ports) -> tuple[ServiceRuntime, Encoder]:
    import torch

    operator_auth = OperatorAuthInterceptor.from_settings(settings)  # no secret: refuse
    torch.set_num_threads(settings.torch_threads)
    # the buckets it reads or writes: its S3 policy in production allows no others
    ports.prepare(settings.kafka_partitions, buckets=("songs", "latents", "models"))
    # the encoder inverts with the current model only; a canary is the generators' business
    models = ServedModel(ModelStore(ports.objects), settings.service_name, canaries=False)
    encoder = Encoder(settings, ports, models)
    runtime = ServiceRuntime.from_settings(settings, interceptors=[operator_auth], max_workers=4)
    runtime.add_service(
        pb_grpc.add_EncoderServiceServicer_to_server,
        EncoderServicer(encoder),
        "riffloop.v1.EncoderService",
    )
    for dependency, check in ports.readiness_checks().items():
        runtime.readiness.add_check(dependency, check)
    runtime.readiness.add_check("model", lambda: models.ready)

    # the first model, then the markers every model_poll_s (the event reaches one replica)
    runtime.add_worker(LoopWorker("encoder-model", keep_current(models, settings.model_poll_s)))
    # every known song's latents under each served version (a new one, a canary's candidate)
    runtime.add_worker(LoopWorker("encoder-latents", keep_latents(encoder, settings.model_poll_s)))
    router = EventRouter(
        {
            "songs.uploaded.v1": encoder.on_song_uploaded,
            "model.published.v1": encoder.on_model_published,
        }
    )
    runtime.add_worker(
        DeferredWorker(ConsumerWorker(settings, ports, router), lambda: models.ready)
    )
    return runtime, encoder
