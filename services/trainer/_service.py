"""The trainer: training sets in, gated model versions out (design.md §3 "Versioning").

The release cycle itself — fine-tune, offline gate, canary, promote or roll back, the next
baseline index, deferral during a canary, crash safety — is ``riffloop.loop.ReleaseCycle``
(its docstring). This module wires it to the process:

- trainset.published.v1 → ``ReleaseCycle.on_training_set``; tracks.scored.v1 →
  ``ReleaseCycle.on_scores`` (the scored tracks of either watched version, generations and
  baselines);
- every ``Release`` the cycle decides goes out as model.published.v1 with the one key
  ``models`` (one partition: every consumer sees CANARY, PROMOTE and ROLLBACK in order); a
  deferred training set goes out again as trainset.published.v1;
- the encoded songs (the ``latents`` bucket) are the gate's x_T and its reference windows;
- ``TrainStatus``, ``Promote`` and ``Rollback`` RPCs; metrics.

At start-up, with no model at all, the trainer publishes the base model: the trained one in
``base_model_dir`` (by default the bundled ``assets/base-model``, docs/BASE_MODEL.md). Only with
``untrained_base`` set (RIFFLOOP_UNTRAINED_BASE=1, for smoke tests) does it publish a fresh,
untrained ``base_preset`` model instead, whose samples are noise; without a trained base model
and without that flag the trainer refuses to start (ConfigurationError, exit 2).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from riffloop.core import ConfigurationError, NotFoundError, ValidationError
from riffloop.loop import (
    CycleObserver,
    CyclePhase,
    Release,
    ReleaseAction,
    ReleaseCycle,
    ScoredTrack,
    TrackKind,
    TrainingProgress,
    TrainingSet,
)
from riffloop.runtime import (
    LATENTS_BUCKET,
    MODEL_CONSTRUCTION_LOCK,
    LatentRecord,
    ModelStore,
    Ports,
    metrics,
    scored_items,
)
from riffloop.v1 import common_pb2, events_pb2
from riffloop.v1 import trainer_service_pb2 as pb
from riffloop.v1 import trainer_service_pb2_grpc as pb_grpc
from services.trainer._settings import TrainerSettings

_log = logging.getLogger("riffloop.trainer")

MODELS_KEY = "models"  # the one key of model.published.v1: one partition, events in order
_ACTIONS = {
    ReleaseAction.CANARY: common_pb2.MODEL_ACTION_CANARY,
    ReleaseAction.PROMOTE: common_pb2.MODEL_ACTION_PROMOTE,
    ReleaseAction.ROLLBACK: common_pb2.MODEL_ACTION_ROLLBACK,
}
_PHASES = {
    CyclePhase.IDLE: pb.TRAINER_STATE_IDLE,
    CyclePhase.TRAINING: pb.TRAINER_STATE_TRAINING,
    CyclePhase.GATING: pb.TRAINER_STATE_GATING,
    CyclePhase.PUBLISHING: pb.TRAINER_STATE_PUBLISHING,
}
_KINDS = {
    common_pb2.TRACK_KIND_GENERATED: TrackKind.GENERATED,
    common_pb2.TRACK_KIND_BASELINE: TrackKind.BASELINE,
}


class EncodedSongsInStore:
    """The encoder's records (one per song) in the ``latents`` bucket: x_T and windows."""

    def __init__(self, objects: Any) -> None:
        self.objects = objects

    def _records(self) -> list[Any]:
        return [
            LatentRecord.from_bytes(self.objects.get(LATENTS_BUCKET, key))
            for key in LatentRecord.song_keys(self.objects)
        ]

    def latents(self, limit: int) -> Any:
        import torch

        rows = [record.latents for record in self._records()]
        return torch.cat(rows)[:limit] if rows else None

    def windows(self) -> Any:
        import torch

        from riffloop.music import image_from_uint8

        images = [image_from_uint8(record.images) for record in self._records()]
        return torch.cat(images) if images else None


class TrainerMetrics(CycleObserver):
    """The cycle's reports as Prometheus metrics."""

    def progress(self, progress: TrainingProgress) -> None:
        metrics.TRAINING_STEPS.inc(progress.steps_run)

    def training_failed(self, error: BaseException) -> None:
        metrics.TRAINING_FAILURES.inc()

    def resumed(self, progress: TrainingProgress) -> None:
        metrics.FINETUNE_RESUMES.inc()

    def rolled_back(self, version: str) -> None:
        metrics.MODEL_ROLLBACKS.inc()

    def released(self, release: Release) -> None:
        if release.action is not ReleaseAction.CANARY:
            metrics.set_current_model("trainer", release.version)


def model_published(release: Release) -> events_pb2.ModelPublished:
    """A ``Release`` as model.published.v1."""
    event = events_pb2.ModelPublished(
        version=release.version,
        parent_version=release.parent,
        checkpoint=release.checkpoint.to_proto(),
        trainset_id=release.trainset_id,
        action=_ACTIONS[release.action],
        canary_share=release.canary_share,
    )
    if release.gate is not None:
        event.gate_report.CopyFrom(gate_summary(release.gate))
    return event


def gate_summary(gate: Any) -> common_pb2.GateReportSummary:
    metric, before, after, p_value = gate.headline()  # what decided, not always FD
    return common_pb2.GateReportSummary(
        passed=gate.passed,
        metric=metric,
        current_value=before,
        candidate_value=after,
        p_value=p_value,
        sample_count=gate.samples,
        summary=gate.summary(),
    )


def training_set(event: events_pb2.TrainsetPublished) -> TrainingSet:
    return TrainingSet(
        trainset_id=event.trainset_id,
        manifest_bucket=event.manifest.bucket,
        manifest_key=event.manifest.key,
        pair_count=int(event.pair_count),
        iteration=int(event.iteration),
        model_version=event.model_version,
    )


def trainset_published(trainset: TrainingSet) -> events_pb2.TrainsetPublished:
    event = events_pb2.TrainsetPublished(
        trainset_id=trainset.trainset_id,
        pair_count=trainset.pair_count,
        iteration=trainset.iteration,
        model_version=trainset.model_version,
    )
    event.manifest.bucket, event.manifest.key = trainset.manifest_bucket, trainset.manifest_key
    return event


def scored_tracks(envelope: events_pb2.Envelope) -> list[ScoredTrack]:
    """The rated tracks of a tracks.scored.v1 record whose provenance names kind and model."""
    tracks = []
    for scored in scored_items(envelope):  # one score, or a chunk of a scoring pass
        prov = scored.provenance
        kind = _KINDS.get(prov.kind)
        if kind is None or scored.rating_count < 1 or not prov.model_version:
            continue
        if not math.isfinite(scored.mean_rating):
            continue  # the selector dead-letters such a score; the canary never records it
        omega = float(scored.confidence) if math.isfinite(scored.confidence) else 0.0
        tracks.append(
            ScoredTrack(
                track_id=scored.track_id,
                kind=kind,
                model_version=prov.model_version,
                input_key="+".join(sorted(prov.input_song_ids)),
                score=float(scored.mean_rating),
                omega=omega,
            )
        )
    return tracks


class TrainerHandlers:
    """The consumer's handlers and the bootstrap, around one ``ReleaseCycle``."""

    def __init__(self, settings: TrainerSettings, ports: Ports) -> None:
        self.settings = settings
        self.ports = ports
        self.store = ModelStore(ports.objects)
        launcher = None
        if settings.train_launcher == "pytorchjob":
            from riffloop.music._pytorchjob import PyTorchJobLauncher

            try:  # in the pod: its service account, namespace and the mounted template
                launcher = PyTorchJobLauncher.from_files(
                    settings.train_job_template, settings.train_job_dir
                )
            except (ValidationError, OSError) as exc:
                raise ConfigurationError(f"RIFFLOOP_TRAIN_LAUNCHER=pytorchjob: {exc}") from None
        self.cycle = ReleaseCycle(
            settings.cycle_settings(),
            ports.objects,
            ports.kv,
            self.store,
            EncodedSongsInStore(ports.objects),
            self._announce,
            self._resubmit,
            observer=TrainerMetrics(),
            launcher=launcher,
            construction_lock=MODEL_CONSTRUCTION_LOCK,
        )

    def _announce(self, release: Release) -> str:
        return str(self.ports.publish("model.published.v1", MODELS_KEY, model_published(release)))

    def _resubmit(self, trainset: TrainingSet) -> str:
        event = trainset_published(trainset)
        return str(self.ports.publish("trainset.published.v1", trainset.trainset_id, event))

    def ensure_base(self) -> str:
        """Publish the base model if no model is served yet; return the served version."""
        return self.cycle.bootstrap(self._base_model)

    def _base_model(self) -> Any:
        from riffloop.music import MelConfig, ModelConfig, MusicDiffusion

        base_dir = self.settings.base_model_path()
        with MODEL_CONSTRUCTION_LOCK:
            if base_dir is not None:
                return MusicDiffusion.from_pretrained(base_dir)
            _log.warning(
                "RIFFLOOP_UNTRAINED_BASE: publishing an untrained %s model (noise, smoke tests "
                "only)",
                self.settings.base_preset,
            )
            config = ModelConfig.preset(self.settings.base_preset)
            mel = MelConfig(n_mels=config.resolution, x_res=config.resolution)
            return MusicDiffusion.create(config, mel, version="v0001")

    def on_trainset_published(self, envelope: events_pb2.Envelope) -> None:
        self.cycle.on_training_set(training_set(envelope.trainset_published))

    def on_track_scored(self, envelope: events_pb2.Envelope) -> None:
        self.cycle.on_scores(scored_tracks(envelope))


class TrainerServicer(pb_grpc.TrainerServiceServicer):
    def __init__(self, handlers: TrainerHandlers) -> None:
        self.cycle = handlers.cycle
        self.store = handlers.store

    def TrainStatus(self, request: Any, context: Any) -> pb.TrainStatusResponse:
        current = self.store.current() or {}
        s = self.cycle.status()
        gate = gate_summary(s.gate) if s.gate is not None else common_pb2.GateReportSummary()
        response = pb.TrainStatusResponse(
            state=_PHASES[s.phase],
            current_version=str(current.get("version", "")),
            candidate_version=s.candidate,
            trainset_id=s.trainset_id,
            step=s.step,
            total_steps=s.total_steps,
            last_loss=s.last_loss,
            last_gate_report=gate,
            versions=self.cycle.registry.versions(),
        )
        response.updated_at.FromNanoseconds(int(s.updated_at * 1e9))
        return response

    def Promote(self, request: pb.PromoteRequest, context: Any) -> pb.PromoteResponse:
        if not request.version:
            raise ValidationError("version is required")
        try:
            release = self.cycle.promote(request.version)
        except NotFoundError:
            raise NotFoundError(f"model version {request.version} is not registered") from None
        return pb.PromoteResponse(version=request.version, event_id=release.event_id)

    def Rollback(self, request: pb.RollbackRequest, context: Any) -> pb.RollbackResponse:
        if request.version and request.version not in self.cycle.registry.versions():
            raise NotFoundError(f"model version {request.version} is not registered")
        target, previous, release = self.cycle.rollback(request.version)
        return pb.RollbackResponse(
            version=target, previous_version=previous, event_id=release.event_id
        )
