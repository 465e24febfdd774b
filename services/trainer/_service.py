"""The trainer: training sets in, gated model versions out (design.md §3 "Versioning").

On trainset.published.v1:

1. Read the manifest (``trainsets/<id>.json``: (input, target track, ω) pairs) and each target's
   mel window from its provenance object (``tracks/<id>.json``, written by the generator).
2. Fine-tune the served model with ``riffloop.music.Trainer`` (ω-weighted, v-prediction + Min-SNR,
   EMA), replaying the encoded songs' real windows so the model does not forget; a few steps at a
   time so SIGTERM is honoured between chunks.
3. Gate the EMA candidate with ``riffloop.loop.OfflineGate`` (Fréchet distance and diversity of
   samples from the same x_T vs the real windows, against the parent's and, when the parent is
   not the base model, the base model's) unless ``gate_mode=skip``.
4. Canary (``canary_share`` > 0, the default): checkpoint parts, pointer, registry record
   (CANARY), then model.published.v1 (CANARY, share): generators serve the candidate to that share
   of requests, hash-routed by request id, and the parent to the rest. The trainer compares the
   two versions' per-track ratings (TrackScored) with ``riffloop.loop.Canary`` (one-sided
   Mann-Whitney): significantly worse → ROLLBACK to the parent (the candidate is ROLLED_BACK);
   better, or ``canary_max_ratings`` reached without being worse → PROMOTE (``models/CURRENT``
   moves, written last). With ``canary_share`` = 0 the candidate is promoted at once and the same
   comparison watches it afterwards. A failed gate registers a REJECTED version.

Promote/Rollback RPCs move the registry and ``models/CURRENT`` and publish model.published.v1.
At start-up, with no model at all, the trainer publishes the base model: the trained one in
``base_model_dir`` (by default the bundled ``assets/base-model``, docs/BASE_MODEL.md). Only with
``untrained_base`` set (RIFFLOOP_UNTRAINED_BASE=1, for smoke tests) does it publish a fresh,
untrained ``base_preset`` model instead, whose samples are noise; without a trained base model
and without that flag the trainer refuses to start (ConfigurationError, exit 2).

Crash and outage safety (nothing decided is lost, nothing accepted is dropped):

- Every model.published.v1 event has one key, ``models``: one partition, so every consumer sees
  CANARY, PROMOTE and ROLLBACK in the order they were decided.
- ``models/CURRENT`` and ``models/CANARY`` say what should be served; ``trainer:announced``
  (key-value) what the last event that went out said. An announcement that failed, or a crash
  between a decision and its event, leaves them apart; ``reconcile`` (at start-up, and before
  the next event is handled after a failure) publishes what is missing.
- A canary's evidence (each generated track's latest R) lives in ``trainer:canary:<version>``, so
  a restart continues the comparison instead of starting it again; a version promoted at once
  is named in ``trainer:watch`` so its watch resumes too.
- A training set that arrives during a canary is kept in ``trainer:deferred`` (the newest wins:
  the selector's sets are cumulative) and published again when the canary ends, unless a newer
  set was trained meanwhile (``trainer:last-iteration``).
- A set redelivered after a crash before its gate is trained again under the version it was
  given; one with a final verdict is not.
"""

from __future__ import annotations

import bisect
import copy
import dataclasses
import functools
import hashlib
import json
import logging
import math
import threading
import time
from pathlib import Path
from typing import Any

from riffloop.core import (
    ConfigurationError,
    Interrupted,
    NotFoundError,
    PermanentError,
    ValidationError,
)
from riffloop.loop import (
    Canary,
    CanaryDecision,
    GateReport,
    ModelRecord,
    ModelRegistry,
    OfflineGate,
    VersionStatus,
)
from riffloop.runtime import (
    LATENTS_BUCKET,
    MODEL_CONSTRUCTION_LOCK,
    LatentRecord,
    ModelStore,
    ServiceSettings,
    metrics,
    scored_items,
)
from riffloop.v1 import common_pb2, events_pb2
from riffloop.v1 import trainer_service_pb2 as pb
from riffloop.v1 import trainer_service_pb2_grpc as pb_grpc

_log = logging.getLogger("riffloop.trainer")

MODELS_KEY = "models"  # the one key of model.published.v1: one partition, events in order
ANNOUNCED_KEY = "trainer:announced"
DEFERRED_KEY = "trainer:deferred"
LAST_ITERATION_KEY = "trainer:last-iteration"  # of the newest training set trained
WATCH_KEY = "trainer:watch"  # [parent, version] of a version promoted at once and watched
# The trained base model shipped with the code (docs/BASE_MODEL.md): <root>/assets/base-model,
# /app/assets/base-model in the trainer image (services/trainer/Dockerfile copies it there).
BUNDLED_BASE_MODEL = Path(__file__).resolve().parents[2] / "assets" / "base-model"


@dataclasses.dataclass(frozen=True, repr=False)
class TrainerSettings(ServiceSettings):
    service_name: str = "trainer"
    grpc_port: int = 50056
    metrics_port: int = 9106
    # Bootstrap: the trained base model, a MusicDiffusion folder; "" = the bundled
    # assets/base-model next to the code (/app/assets/base-model in the trainer image).
    base_model_dir: str = ""
    # Smoke tests only: publish a fresh, untrained ``base_preset`` model (its samples are noise)
    # instead of a trained one. Never set together with base_model_dir.
    untrained_base: bool = False
    base_preset: str = "cpu_small"
    # The baseline index Z_V stored with every version (riffloop.music.TrainingIndex): a base
    # model folder that ships baseline-index.safetensors is published with it; otherwise the
    # trainer builds it from ``baseline_rows`` windows strided through the train split of the
    # corpus mel folder ``base_corpus_dir`` (the untrained smoke-test model: synthetic tones),
    # each inverted with ``baseline_inversion_steps`` DDIM steps (the encoder's default).
    base_corpus_dir: str = ""
    baseline_rows: int = 256
    baseline_inversion_steps: int = 50
    # Training runs in the consumer thread (between polls): allow it up to 30 min per set.
    kafka_max_poll_interval_s: float = 1800.0
    finetune_steps: int = 120
    batch_size: int = 8
    learning_rate: float = 5e-5
    replay_ratio: float = 0.5
    steps_per_chunk: int = 10
    gate_mode: str = "offline"  # "offline" or "skip"
    gate_samples: int = 16
    gate_steps: int = 20
    # Canary: the share of requests a gated candidate serves before it is promoted or rolled
    # back (riffloop.loop.Canary statistics on the ratings of each version's generations);
    # 0 = promote at once and watch afterwards.
    canary_share: float = 0.2
    canary_min_ratings: int = 20
    canary_max_ratings: int = 200
    canary_alpha: float = 0.05
    torch_threads: int = 1
    # Where fine-tuning runs: auto (the GPU when the pod has one, else the CPU), cpu, cuda,
    # cuda:N. The candidate comes back to the CPU for the gate and for serving.
    device: str = "auto"
    # Or fine-tune in a Kubeflow PyTorchJob (data-parallel GPU pods): "pytorchjob" creates one
    # per training set from the PyTorchJob manifest ``train_job_template`` (a mounted ConfigMap)
    # with its bundle in ``train_job_dir``, a volume the job's pods mount at the same path
    # (riffloop/music/_pytorchjob.py; RBAC and volumes in docs/DEPLOY.md).
    train_launcher: str = "in_process"  # in_process | pytorchjob
    train_job_template: str = ""
    train_job_dir: str = ""

    def _validate(self) -> None:
        super()._validate()
        from riffloop.music import ModelConfig

        if self.base_preset not in ModelConfig.PRESET_NAMES:
            raise ConfigurationError(
                f"RIFFLOOP_BASE_PRESET must be one of {', '.join(ModelConfig.PRESET_NAMES)}, "
                f"got {self.base_preset!r}"
            )
        if self.finetune_steps < 1 or self.batch_size < 2 or self.steps_per_chunk < 1:
            raise ConfigurationError(
                "RIFFLOOP_FINETUNE_STEPS ≥ 1, RIFFLOOP_BATCH_SIZE ≥ 2, _STEPS_PER_CHUNK ≥ 1"
            )
        if self.gate_mode not in ("offline", "skip"):
            raise ConfigurationError("RIFFLOOP_GATE_MODE must be offline or skip")
        if self.canary_min_ratings < 2 or not 0 < self.canary_alpha < 1:
            raise ConfigurationError("RIFFLOOP_CANARY_MIN_RATINGS ≥ 2, 0 < _CANARY_ALPHA < 1")
        if not 0 <= self.canary_share < 1:
            raise ConfigurationError("RIFFLOOP_CANARY_SHARE must lie in [0, 1)")
        if not 0 <= self.replay_ratio < 1:
            raise ConfigurationError("RIFFLOOP_REPLAY_RATIO must lie in [0, 1)")
        if self.baseline_rows < 1 or not 1 <= self.baseline_inversion_steps <= 1000:
            raise ConfigurationError(
                "RIFFLOOP_BASELINE_ROWS ≥ 1 and RIFFLOOP_BASELINE_INVERSION_STEPS in 1–1000"
            )
        if self.base_corpus_dir and not (Path(self.base_corpus_dir) / "manifest.json").is_file():
            raise ConfigurationError(
                f"RIFFLOOP_BASE_CORPUS_DIR {self.base_corpus_dir} is no corpus mel folder"
            )
        if self.untrained_base and self.base_model_dir:
            raise ConfigurationError(
                "RIFFLOOP_UNTRAINED_BASE and RIFFLOOP_BASE_MODEL_DIR exclude each other: the "
                "first publishes a fresh, untrained model, the second a trained one"
            )
        try:
            _device(self.device)  # a GPU named here must exist at start-up
        except ValidationError as exc:
            raise ConfigurationError(f"RIFFLOOP_DEVICE: {exc.reason}") from None
        if self.train_launcher not in ("in_process", "pytorchjob"):
            raise ConfigurationError("RIFFLOOP_TRAIN_LAUNCHER must be in_process or pytorchjob")
        if self.train_launcher == "pytorchjob" and not (
            self.train_job_template and self.train_job_dir
        ):
            raise ConfigurationError(
                "RIFFLOOP_TRAIN_LAUNCHER=pytorchjob needs RIFFLOOP_TRAIN_JOB_TEMPLATE and "
                "RIFFLOOP_TRAIN_JOB_DIR"
            )

    def base_model_path(self) -> Path | None:
        """The trained base model's folder, or None with ``untrained_base``. Checked when the
        trainer starts (not when the settings parse, so a manifest's settings can be checked
        where the image's folder does not exist): no trained model and no flag → refuse."""
        if self.untrained_base:
            return None
        path = Path(self.base_model_dir) if self.base_model_dir else BUNDLED_BASE_MODEL
        if not (path / "unet").is_dir() or not (path / "model_card.json").is_file():
            where = "RIFFLOOP_BASE_MODEL_DIR" if self.base_model_dir else "the bundled default"
            raise ConfigurationError(
                f"no trained base model at {path} ({where}): point RIFFLOOP_BASE_MODEL_DIR at a "
                "MusicDiffusion folder (docs/BASE_MODEL.md), or set RIFFLOOP_UNTRAINED_BASE=1 "
                "for a smoke test with an untrained model, whose tracks are noise"
            )
        return path


@dataclasses.dataclass
class Status:
    state: Any = pb.TRAINER_STATE_IDLE
    candidate: str = ""
    trainset_id: str = ""
    step: int = 0
    total_steps: int = 0
    last_loss: float = 0.0
    gate: common_pb2.GateReportSummary = dataclasses.field(
        default_factory=common_pb2.GateReportSummary
    )
    updated_at: float = dataclasses.field(default_factory=time.time)


def _device(name: str) -> Any:
    from riffloop.music import resolve_device

    return resolve_device(name)


def _embed(images: Any) -> Any:
    """Per-mel-bin mean over time of [N, 1, H, W] images → [N, H] (the gate's embedding)."""
    return images[:, 0].mean(dim=-1).double().numpy()


def _one_decision_at_a_time(method: Any) -> Any:
    """Registry and pointer changes are read-modify-write in the object store; gRPC threads
    (Promote, Rollback) and the consumer thread (canary decisions, training) take turns."""

    @functools.wraps(method)
    def serialised(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self.decisions:
            try:
                return method(self, *args, **kwargs)
            except Exception:
                self.unannounced = True  # half done, maybe: the next event reconciles first
                raise

    return serialised


class TrainerCore:
    def __init__(self, settings: TrainerSettings, ports: Any) -> None:
        self.settings = settings
        self.ports = ports
        self.store = ModelStore(ports.objects)
        self.registry = ModelRegistry(ports.objects)
        self.lock = threading.Lock()
        self.status = Status()
        self.stopping = threading.Event()
        # (parent, candidate) under watch since the candidate's promotion, and the latest score
        # of every generated track of either: track → (version, R).
        self.watch: tuple[str, str] | None = None
        self.watch_scores: dict[str, tuple[str, float]] = {}
        # True when an announcement may be missing (start-up, or a publish that failed)
        self.unannounced = True
        self.looks_taken = 0  # planned looks (Canary.looks) the watched canary has had
        self.decisions = threading.RLock()  # see _one_decision_at_a_time
        self.device = _device(settings.device)  # validated with the settings
        self.job_launcher: Any = None
        if settings.train_launcher == "pytorchjob":
            from riffloop.music._pytorchjob import PyTorchJobLauncher

            try:  # in the pod: its service account, namespace and the mounted template
                self.job_launcher = PyTorchJobLauncher.from_files(
                    settings.train_job_template, settings.train_job_dir
                )
            except (ValidationError, OSError) as exc:
                raise ConfigurationError(f"RIFFLOOP_TRAIN_LAUNCHER=pytorchjob: {exc}") from None
        # The base model's gate samples: (root version, steps, digest of x_T) → images. The base
        # never changes and x_T only when songs are encoded, so each gate after the first would
        # otherwise load the base model and run its sampler again for the same images.
        self._base_samples: tuple[tuple[str, int, str], Any] | None = None

    def _set(self, **changes: Any) -> None:
        with self.lock:
            for key, value in changes.items():
                setattr(self.status, key, value)
            self.status.updated_at = time.time()

    # -- bootstrap ----------------------------------------------------------------------------

    def ensure_base(self) -> str:
        """Publish the base model if no model is served yet; return the served version."""
        current = self.store.current()
        if current is not None:
            self.resume_canary()
            self.catch_up()
            return str(current["version"])
        from riffloop.music import MelConfig, ModelConfig, MusicDiffusion

        base_dir = self.settings.base_model_path()
        with MODEL_CONSTRUCTION_LOCK:
            if base_dir is not None:
                model = MusicDiffusion.from_pretrained(base_dir)
                model.version = "v0001"
            else:
                _log.warning(
                    "RIFFLOOP_UNTRAINED_BASE: publishing an untrained %s model (noise, smoke "
                    "tests only)",
                    self.settings.base_preset,
                )
                config = ModelConfig.preset(self.settings.base_preset)
                mel = MelConfig(n_mels=config.resolution, x_res=config.resolution)
                model = MusicDiffusion.create(config, mel, version="v0001")
        model.parent = None
        if model.baseline_index is None:
            model.baseline_index = self._base_index(model)
        else:  # shipped with the folder, inverted by these weights under the folder's name
            model.baseline_index.model_version = model.version
        self.publish_version(
            model, trainset_id="", gate=None, action=common_pb2.MODEL_ACTION_PROMOTE
        )
        return model.version

    def _base_index(self, model: Any) -> Any:
        """Z_V of a base model: its corpus windows (or synthetic tones for an untrained model
        without a corpus), inverted by ``model``. Never a user's upload."""
        from riffloop.music import TrainingIndex, base_windows, load_corpus, tone_windows

        settings = self.settings
        if settings.base_corpus_dir:
            split = load_corpus(Path(settings.base_corpus_dir), "train")
            if split.mel != model.mel:
                raise ConfigurationError(
                    f"corpus {settings.base_corpus_dir} was sliced with another mel config"
                )
            images, ids = base_windows(split, settings.baseline_rows)
        else:
            _log.warning(
                "no base corpus (RIFFLOOP_BASE_CORPUS_DIR): the base index holds synthetic tones"
            )
            images, ids = tone_windows(model.mel, min(settings.baseline_rows, 64))
        return self._timed_index(
            lambda: TrainingIndex.build(
                model,
                images,
                ids,
                settings.baseline_inversion_steps,
                model_version=model.version,
            )
        )

    def _next_index(self, parent: Any, candidate: Any, pairs: Any, images: Any) -> Any:
        """Z_V of a fine-tuned version: the parent's rows plus this set's winners, re-inverted
        by the candidate; each input's best new winner becomes its baseline (the genetic step,
        riffloop.music.TrainingIndex.next_version)."""
        from riffloop.music import Winner, to_uint8

        base = parent.baseline_index or self._base_index(parent)  # a parent from before indexes
        try:
            winners = [
                Winner(
                    input_key=str(pair["input_key"]),
                    track_id=str(pair["target_track_id"]),
                    score=float(pair["score"]),
                    image=to_uint8(image[0]),
                )
                for pair, image in zip(pairs, images, strict=True)
            ]
        except KeyError as exc:  # the manifest is riffloop.loop.TrainingPair.to_dict()
            raise ValidationError(f"a training pair names no {exc.args[0]}") from None
        return self._timed_index(
            lambda: base.next_version(candidate, winners, model_version=candidate.version)
        )

    def _timed_index(self, build: Any) -> Any:
        started = time.perf_counter()
        index = build()
        _log.info(
            "baseline index built",
            extra={**index.describe(), "seconds": round(time.perf_counter() - started, 2)},
        )
        return index

    def _store_version(self, model: Any, trainset_id: str) -> Any:
        """Checkpoint parts and pointer, then the registry record (a redelivery finds it)."""
        self._set(state=pb.TRAINER_STATE_PUBLISHING)
        checkpoint = self.store.publish(model)
        if model.version not in self.registry.versions():
            self.registry.register(
                ModelRecord(
                    version=model.version,
                    parent=model.parent,
                    trainset_id=trainset_id or None,
                    status=VersionStatus.CANDIDATE if model.parent else VersionStatus.SERVING,
                    checkpoint_key=self.store.pointer_key(model.version),
                )
            )
        return checkpoint

    @_one_decision_at_a_time
    def publish_version(
        self, model: Any, *, trainset_id: str, gate: Any, action: Any, report: Any = None
    ) -> str:
        checkpoint = self._store_version(model, trainset_id)
        if model.parent:
            if report is not None:
                self.registry.gate(model.version, report)
            self.registry.promote(model.version)
            with self.lock:
                replaced = self.watch
                self.looks_taken = 0
                self.watch, self.watch_scores = (model.parent, model.version), {}
            if replaced is not None and replaced[1] != model.version:
                self._unwatch(replaced[1])
            self.ports.kv.set(WATCH_KEY, json.dumps([model.parent, model.version]))
        self.store.set_current(model.version, model.parent or "")
        return self._announce(
            model.version, model.parent or "", trainset_id, gate, action, checkpoint
        )

    def _announce(
        self,
        version: str,
        parent: str,
        trainset_id: str,
        gate: Any,
        action: Any,
        checkpoint: Any = None,
        canary_share: float = 0.0,
    ) -> str:
        checkpoint = checkpoint or self.store.checkpoint_ref(version)
        event = events_pb2.ModelPublished(
            version=version,
            parent_version=parent,
            checkpoint=checkpoint.to_proto(),
            trainset_id=trainset_id,
            action=action,
            canary_share=canary_share,
        )
        if gate is not None:
            event.gate_report.CopyFrom(gate)
        self.unannounced = True  # until the event is out and recorded
        event_id = self.ports.publish("model.published.v1", MODELS_KEY, event)
        said = self.announced() or {"current": "", "canary": ""}
        if action == common_pb2.MODEL_ACTION_CANARY:
            said = {**said, "canary": version}
        else:  # PROMOTE or ROLLBACK: the version alone is served, any canary ended
            said = {"current": version, "canary": ""}
        self.ports.kv.set(ANNOUNCED_KEY, json.dumps(said))
        self.unannounced = False
        if action != common_pb2.MODEL_ACTION_CANARY:
            metrics.set_current_model("trainer", version)
        self._set(state=pb.TRAINER_STATE_IDLE, candidate="")
        _log.info("model published", extra={"model_version": version, "action": action})
        return event_id

    # -- announcements ------------------------------------------------------------------------

    def announced(self) -> dict[str, str] | None:
        raw = self.ports.kv.get(ANNOUNCED_KEY)
        return dict(json.loads(raw)) if raw else None

    @_one_decision_at_a_time
    def reconcile(self) -> list[str]:
        """Publish what ``models/CURRENT`` and ``models/CANARY`` say but no event said yet (a
        failed publish, or a crash between a decision and its event); returns the event ids.
        A decision writes the registry first, then the pointers: when they disagree the registry
        is right, and the pointers are finished first."""
        current = self.store.current()
        decided = self.registry.serving()
        if decided and (current is None or current.get("version") != decided):
            self.store.set_current(decided, self.registry.get(decided).parent or "")
            current = self.store.current()
        if current is None:
            return []
        serving = str(current["version"])
        marker = self.store.canary()
        canary = ""
        if marker is not None:
            try:
                running = self.registry.get(str(marker["version"])).status is VersionStatus.CANARY
            except NotFoundError:
                running = False
            canary = str(marker["version"]) if running else ""
            if not running:
                self.store.clear_canary(str(marker["version"]))  # a decision left it behind
        said = self.announced()
        sent: list[str] = []
        if said is None:
            # a deployment from before this record: take the pointers as announced (generators
            # load them at start-up) rather than re-announce and flap a running canary
            self.ports.kv.set(ANNOUNCED_KEY, json.dumps({"current": serving, "canary": canary}))
            said = self.announced()
        if said is not None and said.get("current") != serving:
            was = (said or {}).get("current", "")
            back = (
                bool(was)
                and was in self.registry.versions()
                and (serving in self.registry.lineage(was))
            )
            action = common_pb2.MODEL_ACTION_ROLLBACK if back else common_pb2.MODEL_ACTION_PROMOTE
            record = self.registry.get(serving)
            sent.append(
                self._announce(serving, record.parent or "", record.trainset_id or "", None, action)
            )
            said = self.announced()
        if said is not None and said.get("canary", "") != canary:
            if canary and marker is not None:
                record = self.registry.get(canary)
                sent.append(
                    self._announce(
                        canary,
                        record.parent or "",
                        record.trainset_id or "",
                        None,
                        common_pb2.MODEL_ACTION_CANARY,
                        canary_share=float(marker["share"]),
                    )
                )
            else:  # the canary ended and no event said so: the served version alone
                record = self.registry.get(serving)
                sent.append(
                    self._announce(
                        serving, record.parent or "", "", None, common_pb2.MODEL_ACTION_ROLLBACK
                    )
                )
        self.unannounced = False
        if sent:
            _log.warning("announcements reconciled", extra={"events": len(sent)})
        return sent

    def catch_up(self) -> None:
        """Before an event is handled: send an announcement a failure left out, and a training
        set kept during a canary that has ended since."""
        if self.unannounced:
            self.reconcile()
        self.release_deferred()

    def _defer(self, event: events_pb2.TrainsetPublished) -> None:
        """Keep ``event`` for after the canary, unless a newer set (higher iteration) is kept:
        the selector's sets are cumulative, so the newest one stands for the others."""
        raw = self.ports.kv.get(DEFERRED_KEY)
        if raw:
            kept = events_pb2.TrainsetPublished.FromString(bytes.fromhex(raw))
            if kept.iteration > event.iteration:
                return
        self.ports.kv.set(DEFERRED_KEY, event.SerializeToString().hex())

    def release_deferred(self) -> str | None:
        """No canary running: publish the training set kept while one ran (a fresh event, so
        the consumers' de-duplication does not swallow it); returns its trainset id."""
        raw = self.ports.kv.get(DEFERRED_KEY)
        if not raw or self.running_canary() is not None:
            return None
        event = events_pb2.TrainsetPublished.FromString(bytes.fromhex(raw))
        if event.iteration < int(self.ports.kv.get(LAST_ITERATION_KEY) or 0):
            # a newer set overtook it while it waited: its surviving pairs are in that one
            self.ports.kv.delete(DEFERRED_KEY)
            _log.info("deferred training set superseded", extra={"trainset_id": event.trainset_id})
            return None
        self.ports.publish("trainset.published.v1", event.trainset_id, event)
        self.ports.kv.delete(DEFERRED_KEY)
        _log.info("deferred training set released", extra={"trainset_id": event.trainset_id})
        return event.trainset_id

    # -- fine-tuning --------------------------------------------------------------------------

    def _replay_images(self) -> Any:
        import torch

        from riffloop.music import image_from_uint8

        images = []
        for key in LatentRecord.song_keys(self.ports.objects):  # one record per song
            record = LatentRecord.from_bytes(self.ports.objects.get(LATENTS_BUCKET, key))
            images.append(image_from_uint8(record.images))
        return torch.cat(images) if images else None

    def _latents(self, limit: int) -> Any:
        import torch

        rows = []
        for key in LatentRecord.song_keys(self.ports.objects):  # one record per song
            rows.append(
                LatentRecord.from_bytes(self.ports.objects.get(LATENTS_BUCKET, key)).latents
            )
        return torch.cat(rows)[:limit] if rows else None

    def on_trainset_published(self, envelope: events_pb2.Envelope) -> None:
        import torch

        from riffloop.music import MelDataset, Trainer, TrainingConfig, image_from_uint8

        event = envelope.trainset_published
        self.catch_up()
        unfinished = None  # the version a crash left before its gate: train it again
        for known in self.registry.versions():
            record = self.registry.get(known)
            if record.trainset_id == event.trainset_id:
                if record.status is VersionStatus.CANARY and self.store.canary() is None:
                    self._finish_canary_start(record)  # a crash came before its marker
                    return
                if record.status is not VersionStatus.CANDIDATE:
                    return  # already trained and judged (a redelivery)
                unfinished = known
        running = self.running_canary()
        if running is not None:
            # One experiment at a time: a second canary would replace this one before its
            # ratings decide. The set waits (persisted) and is published again when it ends.
            self._defer(event)
            _log.info(
                "training set deferred: a canary is running",
                extra={"trainset_id": event.trainset_id, "model_version": running},
            )
            return
        manifest = json.loads(self.ports.objects.get(event.manifest.bucket, event.manifest.key))
        pairs = manifest.get("pairs", [])
        if not pairs:
            raise ValidationError(f"training set {event.trainset_id} has no pairs")
        images, weights = [], []
        for pair in pairs:
            sidecar = json.loads(
                self.ports.objects.get("tracks", f"{pair['target_track_id']}.json")
            )
            grid = torch.tensor(sidecar["image_uint8"], dtype=torch.uint8)
            images.append(image_from_uint8(grid)[None, None])
            weights.append(float(pair["weight"]))
        current = self.ensure_base()
        model = self.store.load(current)
        version = unfinished or f"v{len(self.registry.versions()) + 1:04d}"
        replay_images = self._replay_images()
        replay = MelDataset.from_images(replay_images) if replay_images is not None else None
        settings = self.settings
        config = TrainingConfig(
            total_steps=settings.finetune_steps,
            batch_size=settings.batch_size,
            learning_rate=settings.learning_rate,
            replay_ratio=settings.replay_ratio if replay is not None else 0.0,
            seed=int(event.iteration),
        )
        data = MelDataset.from_images(
            torch.cat(images),
            torch.tensor(weights),
            {"trainset_id": event.trainset_id, "pairs": len(pairs)},
        )
        self.ports.kv.set(LAST_ITERATION_KEY, str(max(event.iteration, 0)))
        self._set(
            state=pb.TRAINER_STATE_TRAINING,
            candidate=version,
            trainset_id=event.trainset_id,
            step=0,
            total_steps=settings.finetune_steps,
        )
        try:
            if self.job_launcher is not None:
                candidate = self._fine_tune_in_job(model, data, config, replay, version)
            else:
                with MODEL_CONSTRUCTION_LOCK:
                    # a copy: Trainer trains in place, and the gate needs the parent as it was
                    trainer = Trainer(
                        copy.deepcopy(model), data, config, replay, device=self.device
                    )
                while trainer.step_count < config.total_steps:
                    if self.stopping.is_set():  # SIGTERM: the next trainer starts this set again
                        raise Interrupted("trainer stopping; the training set will be redelivered")
                    before = trainer.step_count
                    progress = trainer.train(settings.steps_per_chunk, progress=False)
                    metrics.TRAINING_STEPS.inc(trainer.step_count - before)
                    loss = progress.losses[-1][1] if progress.losses else self.status.last_loss
                    self._set(step=trainer.step_count, last_loss=loss)
                with MODEL_CONSTRUCTION_LOCK:
                    candidate = trainer.ema_model(version)
        except Exception as exc:
            if not isinstance(exc, Interrupted):
                metrics.TRAINING_FAILURES.inc()
            self._set(state=pb.TRAINER_STATE_IDLE, candidate="")
            raise
        candidate.parent = current
        candidate.baseline_index = self._next_index(model, candidate, pairs, images)
        gate, report = self._gate(model, candidate, replay_images)
        if not gate.passed:
            self._store_version(candidate, event.trainset_id)  # kept, for a look at why
            self.registry.gate(version, report)
            self._set(state=pb.TRAINER_STATE_IDLE, candidate="", gate=gate)
            _log.info("candidate rejected", extra={"model_version": version, "why": gate.summary})
            return
        self._set(gate=gate)
        if self.settings.canary_share > 0:
            self.start_canary(candidate, trainset_id=event.trainset_id, gate=gate, report=report)
            return
        self.publish_version(
            candidate,
            trainset_id=event.trainset_id,
            gate=gate,
            action=common_pb2.MODEL_ACTION_PROMOTE,
            report=report,
        )

    def _fine_tune_in_job(
        self, model: Any, data: Any, config: Any, replay: Any, version: str
    ) -> Any:
        """The fine-tune in a PyTorchJob (RIFFLOOP_TRAIN_LAUNCHER=pytorchjob). On SIGTERM the
        job keeps running; the redelivered set finds it by its name and waits again."""
        from riffloop.music._pytorchjob import read_result

        bundle = self.job_launcher.launch(model, data, config, replay, version)
        self.job_launcher.wait(bundle.name, self.stopping)
        with MODEL_CONSTRUCTION_LOCK:
            candidate = read_result(bundle, version)
        metrics.TRAINING_STEPS.inc(config.total_steps)
        self._set(step=config.total_steps)
        return candidate

    @_one_decision_at_a_time
    def start_canary(self, model: Any, *, trainset_id: str, gate: Any, report: GateReport) -> str:
        """Checkpoint, registry (CANARY), then model.published (CANARY): a share of requests."""
        if not model.parent:
            raise ValidationError("the base model has no parent to run a canary against")
        checkpoint = self._store_version(model, trainset_id)
        self.registry.gate(model.version, report)  # passed: CANDIDATE → CANARY
        self.store.set_canary(model.version, model.parent, self.settings.canary_share)
        with self.lock:
            replaced = self.watch
            self.looks_taken = 0
            self.watch, self.watch_scores = (model.parent, model.version), {}
        if replaced is not None and replaced[1] != model.version:
            self._unwatch(replaced[1])  # its persisted watch must not come back at a restart
        return self._announce(
            model.version,
            model.parent,
            trainset_id,
            gate,
            common_pb2.MODEL_ACTION_CANARY,
            checkpoint,
            canary_share=self.settings.canary_share,
        )

    @_one_decision_at_a_time
    def _finish_canary_start(self, record: ModelRecord) -> str:
        """A gated candidate the registry calls CANARY but no marker names (the process died
        between the two writes): the marker, the watch and the CANARY event it never got."""
        if not record.parent:
            raise PermanentError(f"model {record.version} has no parent to run a canary against")
        if self.settings.canary_share <= 0:  # configured since to promote at once
            return self.promote(record.version)
        self.store.set_canary(record.version, record.parent, self.settings.canary_share)
        self._watch_again(record.parent, record.version)
        _log.warning("canary start finished", extra={"model_version": record.version})
        return self._announce(
            record.version,
            record.parent,
            record.trainset_id or "",
            None,
            common_pb2.MODEL_ACTION_CANARY,
            canary_share=self.settings.canary_share,
        )

    def _root_of(self, version: str) -> str:
        """The first version of ``version``'s lineage (the base model), following parents."""
        seen = {version}
        while (parent := self.registry.get(version).parent) and parent not in seen:
            seen.add(parent)
            version = parent
        return version

    def _base_gate_samples(self, root: str, x_t: Any) -> Any:
        """The root model's samples from ``x_t``, generated once per (root, steps, x_T)."""
        from riffloop.music import generate

        digest = hashlib.sha256(x_t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
        key = (root, self.settings.gate_steps, digest)
        if self._base_samples is None or self._base_samples[0] != key:
            images = generate(self.store.load(root), x_t, self.settings.gate_steps)
            self._base_samples = (key, images)
        return self._base_samples[1]

    def _gate(self, parent: Any, candidate: Any, reference: Any) -> tuple[Any, GateReport]:
        """The offline gate's verdict as the event's summary and as the registry's report."""
        self._set(state=pb.TRAINER_STATE_GATING)
        if self.settings.gate_mode == "skip":
            skipped = GateReport(True, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
            summary = common_pb2.GateReportSummary(
                passed=True, metric="none", p_value=1.0, summary="gate skipped by settings"
            )
            return summary, skipped
        from riffloop.music import generate

        x_t = self._latents(self.settings.gate_samples)
        if x_t is None or reference is None:
            raise PermanentError("the gate needs encoded songs (reference windows and x_T)")
        parent_images = generate(parent, x_t, self.settings.gate_steps)
        candidate_images = generate(candidate, x_t, self.settings.gate_steps)
        # and against the base model (the lineage's root), so drift cannot compound: each
        # version within tolerance of its parent could otherwise walk far from where it began
        try:
            root = self._root_of(parent.version)
        except NotFoundError:  # a lineage the registry does not know (an older deployment)
            _log.warning(
                "no registry lineage for the gate", extra={"model_version": parent.version}
            )
            root = parent.version
        base_images = None
        if root != parent.version:
            base_images = self._base_gate_samples(root, x_t)
        report = OfflineGate().evaluate(
            _embed(reference),
            _embed(parent_images),
            _embed(candidate_images),
            _embed(base_images) if base_images is not None else None,
        )
        metric, before, after, p_value = report.headline()  # what decided, not always FD
        summary = common_pb2.GateReportSummary(
            passed=report.passed,
            metric=metric,
            current_value=before,
            candidate_value=after,
            p_value=p_value,
            sample_count=int(x_t.shape[0]),
            summary=("passed" if report.passed else "failed: " + ", ".join(report.reasons)),
        )
        return summary, report

    # -- control ------------------------------------------------------------------------------

    def on_track_scored(self, envelope: events_pb2.Envelope) -> None:
        """Canary watch: compare the new version's generations with its parent's, roll back a
        significantly worse one (one-sided Mann-Whitney on per-track R, ``Canary.decide``)."""
        self.catch_up()
        with self.lock:
            watch = self.watch
            if watch is None:
                return
            fresh: dict[str, str] = {}
            for scored in scored_items(envelope):  # one score, or a chunk of a scoring pass
                prov = scored.provenance
                if prov.kind != common_pb2.TRACK_KIND_GENERATED or scored.rating_count < 1:
                    continue
                if not math.isfinite(scored.mean_rating):
                    # kept, it would make every later decision raise (Canary.record refuses
                    # it) and hold the watch forever; the selector dead-letters such a score
                    continue
                if prov.model_version in watch:
                    self.watch_scores[scored.track_id] = (
                        prov.model_version,
                        float(scored.mean_rating),
                    )
                    fresh[scored.track_id] = json.dumps(self.watch_scores[scored.track_id])
            if not fresh:
                return
            parent, candidate = watch
            self.ports.kv.hset(_evidence_key(candidate), fresh)  # a restart continues from it
            # group-sequential: test only when the smaller side reaches the next planned look,
            # each look at α / K, so watching the stream does not inflate the error rate
            looks = Canary.looks(self.settings.canary_min_ratings, self.settings.canary_max_ratings)
            sides = [v for v, _ in self.watch_scores.values()]
            reached = bisect.bisect_right(looks, min(sides.count(parent), sides.count(candidate)))
            if reached <= self.looks_taken:
                return
            looked_before, self.looks_taken = self.looks_taken, reached
            self.ports.kv.set(_evidence_key(candidate) + ":looks", str(reached))
            canary = Canary(
                parent,
                candidate,
                alpha=self.settings.canary_alpha / len(looks),
                min_ratings=self.settings.canary_min_ratings,
                max_ratings=self.settings.canary_max_ratings,
            )
            for version, score in self.watch_scores.values():
                canary.record(version, score)
        verdict = canary.decide()
        if verdict.decision is CanaryDecision.CONTINUE:
            return
        with self.decisions:  # an operator's Promote or Rollback waits, or went first
            with self.lock:
                if self.watch != watch:
                    return  # another decision or promotion happened meanwhile
                self.watch = None
            try:
                self._act_on(watch, verdict)
            except Exception:
                # the retry of this event must decide again (the watch comes back) unless the
                # decision got through before the failure; a missing announcement is sent
                # first either way (``catch_up``)
                if self._undecided(watch):
                    with self.lock:
                        if self.watch is None:
                            self.watch, self.looks_taken = watch, looked_before
                raise
            self._unwatch(candidate)
        self.release_deferred()

    def _undecided(self, watch: tuple[str, str]) -> bool:
        """The watched candidate still runs as a canary, or still serves as promoted at once."""
        try:
            status = self.registry.get(watch[1]).status
            current = (self.store.current() or {}).get("version")
        except Exception:  # the store is what failed: keep watching, the retry will tell
            return True
        return status is VersionStatus.CANARY or (
            status is VersionStatus.SERVING and current == watch[1]
        )

    def _unwatch(self, candidate: str) -> None:
        """The watch of ``candidate`` is over: its persisted evidence and marker go."""
        self.ports.kv.delete(_evidence_key(candidate))
        self.ports.kv.delete(_evidence_key(candidate) + ":looks")
        raw = self.ports.kv.get(WATCH_KEY)
        if raw and json.loads(raw)[1] == candidate:
            self.ports.kv.delete(WATCH_KEY)

    @_one_decision_at_a_time
    def _act_on(self, watch: tuple[str, str], verdict: Any) -> None:
        parent, candidate = watch
        _log.info(
            "canary decided",
            extra={
                "decision": str(verdict.decision),
                "model_version": candidate,
                "p_worse": verdict.p_worse,
                "mean_candidate": verdict.mean_candidate,
                "mean_current": verdict.mean_current,
            },
        )
        status = self.registry.get(candidate).status
        if status is VersionStatus.CANARY:  # still a share of traffic: end the canary
            if verdict.decision is CanaryDecision.PROMOTE:
                self.promote(candidate, verdict)
            else:
                self.abort_canary(candidate, verdict)
        elif verdict.decision is CanaryDecision.ROLLBACK:  # promoted at once (canary_share 0)
            current = self.store.current() or {}
            if current.get("version") == candidate:
                self.rollback(parent)

    def resume_canary(self) -> str | None:
        """After a restart: watch the canary ``models/CANARY`` names, if the registry still has
        it as CANARY (a marker left by a crash after the decision is removed), with the scores
        gathered before the restart (``trainer:canary:<version>``)."""
        marker = self.store.canary()
        if marker is None:
            return self._resume_watch()
        version = str(marker["version"])
        try:
            record = self.registry.get(version)
        except NotFoundError:
            record = None
        if record is None or record.status is not VersionStatus.CANARY or not record.parent:
            self.store.clear_canary(version)
            return None
        with self.lock:
            resumed = self.watch is None
        if resumed:
            evidence = self._watch_again(record.parent, version)
            _log.info("canary resumed", extra={"model_version": version, "scores": len(evidence)})
        return version

    def _watch_again(self, parent: str, version: str) -> dict[str, tuple[str, float]]:
        """Watch ``version`` against ``parent`` with the evidence and looks persisted so far
        (unless a watch started meanwhile); returns that evidence."""
        key = _evidence_key(version)
        evidence = {
            track: (str(v), float(r))
            for track, raw in self.ports.kv.hgetall(key).items()
            for v, r in [json.loads(raw)]
        }
        looks = int(self.ports.kv.get(key + ":looks") or 0)
        with self.lock:
            if self.watch is None:
                self.looks_taken = looks
                self.watch, self.watch_scores = (parent, version), evidence
        return evidence

    def _resume_watch(self) -> str | None:
        """After a restart: watch again a version promoted at once (``canary_share`` 0) whose
        watch had not decided, with the scores gathered before."""
        raw = self.ports.kv.get(WATCH_KEY)
        if not raw:
            return None
        parent, version = (str(v) for v in json.loads(raw))
        current = self.store.current() or {}
        if current.get("version") != version:
            self._unwatch(version)  # rolled back or replaced since: nothing left to watch
            return None
        evidence = self._watch_again(parent, version)
        _log.info("watch resumed", extra={"model_version": version, "scores": len(evidence)})
        return version

    def running_canary(self) -> str | None:
        """The candidate serving a canary share now, if any."""
        with self.lock:
            watch = self.watch
        if watch is None or self.registry.get(watch[1]).status is not VersionStatus.CANARY:
            return None
        return watch[1]

    @_one_decision_at_a_time
    def abort_canary(self, candidate: str, verdict: Any = None) -> str:
        """The canary lost: mark it ROLLED_BACK; generators drop it and serve the parent."""
        record = self.registry.get(candidate)
        if record.status is not VersionStatus.CANARY or not record.parent:
            raise PermanentError(f"model {candidate} is {record.status}, not a canary")
        self.registry.roll_back(candidate, verdict)
        self.store.clear_canary(candidate)
        metrics.MODEL_ROLLBACKS.inc()
        with self.lock:
            if self.watch is not None and self.watch[1] == candidate:
                self.watch = None
        self._unwatch(candidate)
        parent = self.registry.get(record.parent)
        return self._announce(
            parent.version, parent.parent or "", "", None, common_pb2.MODEL_ACTION_ROLLBACK
        )

    @_one_decision_at_a_time
    def promote(self, version: str, verdict: Any = None) -> str:
        record = self.registry.get(version)  # NotFoundError for an unknown version
        if record.status not in (
            VersionStatus.CANARY,
            VersionStatus.CANDIDATE,
            VersionStatus.RETIRED,
        ):
            raise PermanentError(f"model {version} is {record.status}; it cannot be promoted")
        self.registry.promote(version, verdict)
        with self.lock:
            watched = self.watch is not None and self.watch[1] == version
            if watched and verdict is not None:
                self.watch = None  # the canary decided; a manual promote keeps watching
        if watched and verdict is not None:
            self._unwatch(version)
        elif watched and record.parent:  # watched on as a promoted version, across restarts
            self.ports.kv.set(WATCH_KEY, json.dumps([record.parent, version]))
        self.store.set_current(version, record.parent or "")
        self.store.clear_canary(version)
        return self._announce(
            version,
            record.parent or "",
            record.trainset_id or "",
            None,
            common_pb2.MODEL_ACTION_PROMOTE,
        )

    @_one_decision_at_a_time
    def rollback(self, version: str) -> tuple[str, str, str]:
        candidate = self.running_canary()
        if candidate is not None:
            parent = self.registry.get(candidate).parent or ""
            if version in ("", parent):
                # A running canary is what "roll back" means to an operator: drop it.
                return parent, candidate, self.abort_canary(candidate)
        current = self.store.current()
        if current is None:
            raise PermanentError("no model is served yet")
        serving = str(current["version"])
        record = self.registry.get(serving)
        target = version or (record.parent or "")
        if not target:
            raise PermanentError(f"model {serving} is the base model; nothing to roll back to")
        if target == serving:
            raise ValidationError(f"model {target} is already served")
        if target not in self.registry.lineage(serving):
            raise ValidationError(f"model {target} is not an ancestor of {serving}")
        if candidate is not None:
            self.abort_canary(candidate)  # going back further ends the canary too
        if target == record.parent:
            self.registry.roll_back(serving)
        else:
            self.registry.promote(target)
        self.store.set_current(target, self.registry.get(target).parent or "")
        metrics.MODEL_ROLLBACKS.inc()
        with self.lock:
            watched, self.watch = self.watch, None
        if watched is not None:
            self._unwatch(watched[1])
        event_id = self._announce(
            target,
            self.registry.get(target).parent or "",
            "",
            None,
            common_pb2.MODEL_ACTION_ROLLBACK,
        )
        return target, serving, event_id


def _evidence_key(candidate: str) -> str:
    """Key-value hash: generated track → [version, R] gathered by the canary of ``candidate``."""
    return f"trainer:canary:{candidate}"


class TrainerServicer(pb_grpc.TrainerServiceServicer):
    def __init__(self, core: TrainerCore) -> None:
        self.core = core

    def TrainStatus(self, request: Any, context: Any) -> pb.TrainStatusResponse:
        core = self.core
        current = core.store.current() or {}
        with core.lock:
            s = dataclasses.replace(core.status)
        response = pb.TrainStatusResponse(
            state=s.state,
            current_version=str(current.get("version", "")),
            candidate_version=s.candidate,
            trainset_id=s.trainset_id,
            step=s.step,
            total_steps=s.total_steps,
            last_loss=s.last_loss,
            last_gate_report=s.gate,
            versions=core.registry.versions(),
        )
        response.updated_at.FromNanoseconds(int(s.updated_at * 1e9))
        return response

    def Promote(self, request: pb.PromoteRequest, context: Any) -> pb.PromoteResponse:
        if not request.version:
            raise ValidationError("version is required")
        try:
            event_id = self.core.promote(request.version)
        except NotFoundError:
            raise NotFoundError(f"model version {request.version} is not registered") from None
        return pb.PromoteResponse(version=request.version, event_id=event_id)

    def Rollback(self, request: pb.RollbackRequest, context: Any) -> pb.RollbackResponse:
        if request.version and request.version not in self.core.registry.versions():
            raise NotFoundError(f"model version {request.version} is not registered")
        target, previous, event_id = self.core.rollback(request.version)
        return pb.RollbackResponse(version=target, previous_version=previous, event_id=event_id)
