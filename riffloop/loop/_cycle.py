"""One release cycle of the served model (design.md §3 "Versioning"): a training set in, a
version promoted or rolled back out. The trainer service calls it from its handlers; anything
else that drives the loop (a simulation, a benchmark) reaches it through that service.

1. Fine-tune (``train``): a LoRA candidate (rank 8, α 8: only the adapters learn, the parent's
   weights stay) of the served version P on the training set's target windows x_0 with their
   confidence ω, loss ω_i · w(t) · ‖target − ε_θ(x_t, t)‖² (``riffloop.music.Trainer``: the
   model's own parametrisation, Min-SNR-γ w(t), ω used relative to their mean), half of every
   batch replayed from the base-corpus windows of P's baseline index (``replay_windows``) so the
   model keeps what it knew. Recipe (``CycleSettings``): 60 steps, batch 8, lr 5e-4, warm-up 10 %,
   no EMA (a short fine-tune keeps its final weights) — the loop experiment's, under which the
   selected arm beat the random control (docs/LOOP.md §7, docs/results/). In steps_per_chunk
   chunks, so a stop request (SIGTERM) is honoured between them; or in a PyTorchJob
   (``launcher``, riffloop/music/_pytorchjob.py).
2. Baseline index Z_V of the candidate: P's rows plus the set's winners, re-inverted by V; each
   input's best new winner becomes its baseline (``riffloop.music.TrainingIndex.next_version``).
3. Offline gate (``gate``): samples of P and of the candidate from the same x_T (the encoded
   songs' latents), and of the lineage's root (the base model) when P is not the root, embedded
   with the quality embedding (``QualityEmbedding``: the trained ``AudioEmbedding`` when it was
   trained for this image size, else per-bin mel mean and std), against the encoded songs'
   windows, by ``OfflineGate`` (FD rise and diversity drop, each with a permutation test). The
   embedding's name is recorded in the report. A failed gate registers a REJECTED version.
4. Canary (``canary_share`` > 0): checkpoint, registry (CANARY), ``models/CANARY``, then the
   CANARY announcement: generators serve the candidate to that share of requests. Every scored
   track of either version is recorded (``on_scores``); each version's generations enter the
   test as margins R − R_b(input) over that version's baselines of the same input (as the
   selector's survival rule), so a drift of the listeners' scale between the two versions'
   ratings cancels. ``Canary`` (one-sided Mann-Whitney, group-sequential looks at α / K) decides:
   significantly worse → ROLLBACK (the candidate is ROLLED_BACK, ``models/CURRENT`` never
   moved); better, or ``canary_max_ratings`` reached without being worse → PROMOTE. With
   ``canary_share`` = 0 the candidate is promoted at once and the same comparison watches it.
5. One canary at a time: a training set that arrives during one waits (``defer``) and is sent
   again (``resubmit``) when it ends, unless a newer set was trained meanwhile.

Crash and outage safety (nothing decided is lost, nothing accepted is dropped):

- ``models/CURRENT`` and ``models/CANARY`` say what should be served; ``trainer:announced``
  (key-value) what the last announcement said. A failed announcement, or a crash between a
  decision and its announcement, leaves them apart; ``reconcile`` (at start-up, and before the
  next event is handled after a failure) announces what is missing. A decision writes the
  registry first, then the pointers.
- A watch's evidence (every scored track's latest R) lives in ``trainer:canary:<version>``, its
  looks taken in ``…:looks``, so a restart continues the comparison; a version promoted at once
  is named in ``trainer:watch`` so its watch resumes too.
- A deferred training set lives in ``trainer:deferred`` (the newest wins: the selector's sets
  are cumulative); ``trainer:last-iteration`` is the newest set trained.
- A set redelivered after a crash before its gate is trained again under the version it was
  given; one with a final verdict is not. The fine-tune's progress (adapters, optimiser state,
  step, RNG) is saved every ``finetune_save_every`` steps, on a stop request and after the last
  step (``FineTuneJournal``, riffloop/loop/_progress.py), so the redelivered set resumes where
  the killed trainer stopped — after the last step, a gate or publish that failed (an object
  store outage) does not cost the fine-tune again. Its slot is cleared once the candidate is
  stored or rejected.
- Each version's checkpoint content hash (riffloop.runtime.ModelStore) is recorded in its
  registry record and in the marker that names it; every load is checked against it.
"""

from __future__ import annotations

import bisect
import copy
import functools
import hashlib
import json
import logging
import math
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from riffloop.core import (
    Interrupted,
    KeyValueStore,
    NotFoundError,
    ObjectStore,
    PermanentError,
    TransientError,
    ValidationError,
)
from riffloop.loop._progress import FineTuneJournal, FineTuneProgress
from riffloop.loop._provenance import TrackKind
from riffloop.loop._release import (
    Canary,
    CanaryDecision,
    CanaryVerdict,
    GateReport,
    ModelRecord,
    ModelRegistry,
    OfflineGate,
    VersionStatus,
)

_log = logging.getLogger("riffloop.trainer")

ANNOUNCED_KEY = "trainer:announced"
DEFERRED_KEY = "trainer:deferred"
LAST_ITERATION_KEY = "trainer:last-iteration"  # of the newest training set trained
WATCH_KEY = "trainer:watch"  # [parent, version] of a version promoted at once and watched
# R_b when no baseline of either version was rated yet: the middle of the 1–5 star scale. Both
# versions' margins then shift alike, and the test compares raw R.
NEUTRAL_RATING = 3.0
# Row ids of riffloop.music.TrainingIndex: corpus:…, tone:… (base rows), track:… (winners).
WINNER_ROW_PREFIX = "track:"


# -- settings ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CycleSettings:
    """The release cycle's parameters (the trainer service reads them from RIFFLOOP_*)."""

    # 1. fine-tune (the loop experiment's recipe; see the module docstring)
    finetune_steps: int = 60
    batch_size: int = 8
    learning_rate: float = 5e-4
    warmup_fraction: float = 0.1
    ema_decay: float = 0.0  # 0: the candidate is the final weights
    replay_ratio: float = 0.5  # share of each batch drawn from the base-corpus windows
    lora_rank: int = 8  # 0: full fine-tune (every UNet weight learns)
    lora_alpha: int = 8  # the adapter's update is scaled by alpha / rank
    # β of the preference loss (Diffusion-DPO) on sets whose every pair names a loser; 0 = the
    # ω-weighted ε loss toward the targets alone (docs/LOOP.md §5)
    preference_beta: float = 0.0
    # What the fine-tune learns from a kept track: "first", its first window (x_res frames; a
    # 5.9 s track has four), or "all", every window of the track the listener rated, each with
    # the track's ω (measured in docs/results/services/README.md, "What limits it")
    train_windows: str = "first"
    steps_per_chunk: int = 10
    # progress saved every this many steps (and on a stop, and after the last step), so a
    # killed trainer resumes there; 0 = never (a redelivered set trains from step 0)
    finetune_save_every: int = 20
    device: str = "cpu"  # riffloop.music.resolve_device: auto, cpu, cuda, cuda:N
    # 2. baseline index of a base model without one
    base_corpus_dir: str = ""
    baseline_rows: int = 256
    baseline_inversion_steps: int = 50
    baseline_refresh_every: int = 3  # every row re-inverted at this version in a row; else carried
    # 3. offline gate
    gate_mode: str = "offline"  # offline | skip
    gate_samples: int = 16
    gate_steps: int = 20
    gate_fd_increase: float = 0.25
    gate_diversity_drop: float = 0.15
    # 4. canary
    canary_share: float = 0.2
    canary_min_ratings: int = 20
    canary_max_ratings: int = 200
    canary_alpha: float = 0.05

    def __post_init__(self) -> None:
        at_least = {
            "finetune_steps": 1,
            "batch_size": 2,
            "lora_rank": 0,
            "lora_alpha": 1,
            "steps_per_chunk": 1,
            "finetune_save_every": 0,
            "baseline_rows": 1,
            "baseline_inversion_steps": 1,
            "baseline_refresh_every": 1,
            "gate_samples": 2,
            "gate_steps": 1,
            "canary_min_ratings": 2,
            "canary_max_ratings": 2,
        }
        for name, low in at_least.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValidationError(f"{name} must be an integer ≥ {low}, got {value!r}")
        ranges = {  # name: (low, high, high included?)
            "learning_rate": (0.0, 1.0, True),
            "warmup_fraction": (0.0, 1.0, False),
            "ema_decay": (0.0, 1.0, False),
            "replay_ratio": (0.0, 1.0, False),
            "preference_beta": (0.0, math.inf, False),
            "gate_fd_increase": (0.0, math.inf, False),
            "gate_diversity_drop": (0.0, 1.0, True),
            "canary_share": (0.0, 1.0, False),
            "canary_alpha": (0.0, 1.0, False),
        }
        for name, (floor, ceiling, closed) in ranges.items():
            value = getattr(self, name)
            inside = floor <= value <= ceiling if closed else floor <= value < ceiling
            if not (isinstance(value, int | float) and math.isfinite(value) and inside):
                bracket = "]" if closed else ")"
                raise ValidationError(
                    f"{name} must lie in [{floor:g}, {ceiling:g}{bracket}, got {value}"
                )
        if self.learning_rate == 0 or self.canary_alpha == 0:
            raise ValidationError("learning_rate and canary_alpha must be above 0")
        if round(self.replay_ratio * self.batch_size) >= self.batch_size:
            raise ValidationError("replay_ratio leaves no room for the training set in a batch")
        if self.canary_max_ratings < self.canary_min_ratings:
            raise ValidationError("canary_max_ratings must be at least canary_min_ratings")
        if self.gate_mode not in ("offline", "skip"):
            raise ValidationError(f"gate_mode must be offline or skip, got {self.gate_mode!r}")
        if self.train_windows not in ("first", "all"):
            raise ValidationError(f"train_windows must be first or all, got {self.train_windows!r}")
        if self.train_windows == "all" and self.preference_beta > 0:
            raise ValidationError(
                "train_windows must be first when preference_beta > 0 (a preference pair is "
                "one winner window against one loser window)"
            )

    def training_config(self, seed: int, replay: bool, preference: bool = False) -> Any:
        """The trainer's recipe (riffloop.music.TrainingConfig) for one fine-tune: replay only
        when there are base rows to replay, the preference loss only for preference pairs."""
        from riffloop.music import LoraSettings, TrainingConfig

        lora = (
            LoraSettings(rank=self.lora_rank, alpha=self.lora_alpha) if self.lora_rank > 0 else None
        )
        return TrainingConfig(
            total_steps=self.finetune_steps,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            warmup_fraction=self.warmup_fraction,
            ema_decay=self.ema_decay,
            replay_ratio=self.replay_ratio if replay else 0.0,
            lora=lora,
            preference_beta=self.preference_beta if preference else 0.0,
            seed=max(int(seed), 0),
            log_every=max(1, min(self.steps_per_chunk, self.finetune_steps)),
        )


# -- what goes in and out ----------------------------------------------------------------------
class ReleaseAction(StrEnum):
    CANARY = "canary"  # serve the version to canary_share of requests, beside its parent
    PROMOTE = "promote"  # serve the version alone
    ROLLBACK = "rollback"  # serve the version alone, going back (a canary ended, or an ancestor)


@dataclass(frozen=True)
class GateVerdict:
    """The offline gate's outcome as the announcement carries it."""

    report: GateReport  # report.embedding names the quality embedding
    samples: int  # samples per model (from the same x_T)
    skipped: bool = False  # gate_mode=skip: passed without a test

    @property
    def passed(self) -> bool:
        return self.report.passed

    def headline(self) -> tuple[str, float, float, float]:
        """(metric, value before, candidate's value, p) of the comparison that decided."""
        return ("none", 0.0, 0.0, 1.0) if self.skipped else self.report.headline()

    def summary(self) -> str:
        if self.skipped:
            return "gate skipped by settings"
        verdict = "passed" if self.passed else "failed: " + ", ".join(self.report.reasons)
        return f"{verdict} ({self.report.embedding})"


@dataclass(frozen=True)
class Release:
    """One announcement (model.published.v1): what generators should serve from now on."""

    version: str
    parent: str
    trainset_id: str
    action: ReleaseAction
    checkpoint: Any  # the version's checkpoint pointer (riffloop.core.ObjectRef)
    gate: GateVerdict | None = None
    canary_share: float = 0.0
    reconciled: bool = False  # a decision made earlier whose announcement had not gone out
    event_id: str = ""  # the announcement's event id, once it went out


@dataclass(frozen=True)
class TrainingSet:
    """A training set the selector published: its manifest of (input, target, ω) pairs."""

    trainset_id: str
    manifest_bucket: str
    manifest_key: str
    pair_count: int = 0
    iteration: int = 0  # the loop iteration that produced it (sets are cumulative)
    model_version: str = ""  # whose generations were selected

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)

    @classmethod
    def from_json(cls, raw: str) -> TrainingSet:
        return cls(**json.loads(raw))


@dataclass(frozen=True, slots=True)
class ScoredTrack:
    """A track's latest score R (and confidence ω) as the canary records it."""

    track_id: str
    kind: TrackKind
    model_version: str  # a generation's model; a baseline's: the version whose index chose it
    input_key: str  # the input merge it answers (TrackProvenance.input_key)
    score: float
    omega: float = 1.0

    def to_json(self) -> str:
        return json.dumps(
            [self.model_version, str(self.kind), self.input_key, self.score, self.omega]
        )

    @classmethod
    def from_json(cls, track_id: str, raw: str) -> ScoredTrack:
        values = json.loads(raw)
        if len(values) == 2:  # [version, R] of a generation, as watches recorded it before
            return cls(track_id, TrackKind.GENERATED, str(values[0]), "", float(values[1]))
        version, kind, input_key, score, omega = values
        return cls(track_id, TrackKind(kind), str(version), str(input_key), float(score), omega)


def canary_margins(
    evidence: Mapping[str, ScoredTrack], versions: Sequence[str]
) -> dict[str, list[float]]:
    """Per version, R − R_b(input) of each of its generations, in track order. R_b(v, k) is the
    ω-weighted mean R of version v's baselines of input k; without one, of all v's baselines;
    without any, of both versions' baselines; without any at all, ``NEUTRAL_RATING``."""
    sums: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])

    def add(key: tuple[str, str], s: ScoredTrack) -> None:
        w = s.omega if s.omega > 0 else 1e-9  # an all-zero-ω input still has a mean
        sums[key][0] += w * s.score
        sums[key][1] += w

    for s in evidence.values():
        if s.kind is TrackKind.BASELINE and s.model_version in versions:
            for key in ((s.model_version, s.input_key), (s.model_version, ""), ("", "")):
                add(key, s)

    def r_b(version: str, input_key: str) -> float:
        for key in ((version, input_key), (version, ""), ("", "")):
            if key in sums:
                total, weight = sums[key]
                return total / weight
        return NEUTRAL_RATING

    margins: dict[str, list[float]] = {v: [] for v in versions}
    for track in sorted(evidence):
        s = evidence[track]
        if s.kind is TrackKind.GENERATED and s.model_version in margins:
            margins[s.model_version].append(s.score - r_b(s.model_version, s.input_key))
    return margins


class CyclePhase(StrEnum):
    IDLE = "idle"
    TRAINING = "training"
    GATING = "gating"
    PUBLISHING = "publishing"


@dataclass
class CycleStatus:
    phase: CyclePhase = CyclePhase.IDLE
    candidate: str = ""
    trainset_id: str = ""
    step: int = 0
    total_steps: int = 0
    last_loss: float = 0.0
    gate: GateVerdict | None = None
    updated_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class TrainingProgress:
    version: str
    step: int
    total_steps: int
    loss: float
    steps_run: int  # since the last report


class CycleObserver:
    """What the cycle reports as it goes (the trainer service counts it); each does nothing."""

    def progress(self, progress: TrainingProgress) -> None:
        """After each chunk of fine-tuning steps."""

    def training_failed(self, error: BaseException) -> None:
        """A fine-tune raised (not when it was stopped)."""

    def resumed(self, progress: TrainingProgress) -> None:
        """A fine-tune resumed from its saved progress at ``progress.step``."""

    def rolled_back(self, version: str) -> None:
        """``version`` was rolled back (a lost canary, or an operator's rollback)."""

    def released(self, release: Release) -> None:
        """``release`` was announced."""


# -- ports --------------------------------------------------------------------------------------
class ModelShelf(Protocol):
    """Model checkpoints and the serving pointers (riffloop.runtime.ModelStore)."""

    def publish(self, model: Any) -> Any: ...
    def load(self, version: str) -> Any: ...
    def checkpoint_ref(self, version: str) -> Any: ...
    def pointer_key(self, version: str) -> str: ...
    def current(self) -> dict[str, Any] | None: ...
    def set_current(self, version: str, parent: str = "", checkpoint_sha256: str = "") -> None: ...
    def canary(self) -> dict[str, Any] | None: ...
    def set_canary(
        self, version: str, parent: str, share: float, checkpoint_sha256: str = ""
    ) -> None: ...
    def clear_canary(self, version: str | None = None) -> None: ...


class EncodedSongs(Protocol):
    """The users' songs as the encoder stored them: the gate's x_T and its reference."""

    def latents(self, limit: int) -> torch.Tensor | None:
        """Up to ``limit`` DDIM-inverted windows x_T [N, C, h, w], or None before any song."""
        ...

    def windows(self) -> torch.Tensor | None:
        """Every encoded window [N, 1, H, W] in [−1, 1], or None before any song."""
        ...


Announce = Callable[[Release], str]  # publishes the release, returns its event id
Resubmit = Callable[[TrainingSet], str]  # publishes a deferred training set again


# -- the quality embedding ----------------------------------------------------------------------
@dataclass(frozen=True)
class QualityEmbedding:
    """embed(images [N, 1, H, W]) → [N, D] float64, with the name the gate report records."""

    name: str
    embed: Callable[[torch.Tensor], np.ndarray]

    @classmethod
    def for_images(cls, image_size: tuple[int, int]) -> QualityEmbedding:
        """The trained ``AudioEmbedding`` (assets/quality-embedding: an instrument classifier's
        pooled features) when it was trained on images of this size; else the coarse mel
        statistics of design.md §7, per-bin mean and std over time."""
        from riffloop.music import AudioEmbedding

        try:
            embedder = AudioEmbedding.load()
        except NotFoundError:
            embedder = None
        if embedder is not None and tuple(embedder.image_size) == tuple(image_size):
            trained = embedder

            def embed(images: torch.Tensor) -> np.ndarray:
                return trained.embed(images).numpy()

            return cls("AudioEmbedding (instrument CNN)", embed)
        return cls("mel statistics (per-bin mean and std)", mel_statistics)


def mel_statistics(images: torch.Tensor) -> np.ndarray:
    """[N, 1, H, W] → [N, 2H]: per mel bin, the mean and the standard deviation over time."""
    x = images.detach().to(torch.float32).squeeze(1)
    return torch.cat([x.mean(dim=2), x.std(dim=2)], dim=1).numpy().astype(np.float64)


# -- the cycle ----------------------------------------------------------------------------------
def _one_decision_at_a_time(method: Any) -> Any:
    """Registry and pointer changes are read-modify-write in the object store; callers on other
    threads (an operator's Promote or Rollback) and the event handlers take turns."""

    @functools.wraps(method)
    def serialised(self: ReleaseCycle, *args: Any, **kwargs: Any) -> Any:
        with self.decisions:
            try:
                return method(self, *args, **kwargs)
            except Exception:
                self.unannounced = True  # half done, maybe: the next event reconciles first
                raise

    return serialised


def _evidence_key(candidate: str) -> str:
    """Key-value hash: scored track → ScoredTrack JSON gathered by the watch of ``candidate``."""
    return f"trainer:canary:{candidate}"


class ReleaseCycle:
    """Fine-tune → gate → canary → promote or roll back (the module docstring), on ports:
    ``objects`` (registry, manifests, track sidecars), ``kv`` (announcements, watches, deferred
    sets), ``models`` (checkpoints and pointers), ``songs`` (the gate's inputs), ``announce``
    and ``resubmit`` (events). ``construction_lock`` serialises model construction with the
    rest of the process (diffusers patches torch.nn.Module while it loads a model)."""

    def __init__(
        self,
        settings: CycleSettings,
        objects: ObjectStore,
        kv: KeyValueStore,
        models: ModelShelf,
        songs: EncodedSongs,
        announce: Announce,
        resubmit: Resubmit,
        *,
        observer: CycleObserver | None = None,
        launcher: Any = None,
        construction_lock: Any = None,
    ) -> None:
        from riffloop.music import resolve_device

        self.settings = settings
        self.objects = objects
        self.kv = kv
        self.models = models
        self.songs = songs
        self.announce = announce
        self.resubmit = resubmit
        self.observer = observer or CycleObserver()
        self.launcher = launcher  # a riffloop.music PyTorchJobLauncher, or None: in process
        self.construction_lock = construction_lock or threading.RLock()
        self.device = resolve_device(settings.device)
        self.registry = ModelRegistry(objects)
        self.journal = FineTuneJournal(objects)
        self.stopping = threading.Event()  # set on SIGTERM: a fine-tune stops between chunks
        self.lock = threading.Lock()  # status and watch
        self.decisions = threading.RLock()  # see _one_decision_at_a_time
        self._status = CycleStatus()
        # (parent, candidate) under watch, the latest score of every scored track of either,
        # and the planned looks (Canary.looks) taken so far
        self.watch: tuple[str, str] | None = None
        self.evidence: dict[str, ScoredTrack] = {}
        self.looks_taken = 0
        self.unannounced = True  # an announcement may be missing (start-up, a failed publish)
        # The root model's gate samples: (root, steps, digest of x_T) → images. The root never
        # changes and x_T only when songs are encoded; each gate would make them again.
        self._root_samples: tuple[tuple[str, int, str], torch.Tensor] | None = None
        self._quality: QualityEmbedding | None = None
        self._quality_size: tuple[int, int] | None = None

    # -- status -----------------------------------------------------------------------------
    def status(self) -> CycleStatus:
        with self.lock:
            return replace(self._status)

    def _set(self, **changes: Any) -> None:
        with self.lock:
            for key, value in changes.items():
                setattr(self._status, key, value)
            self._status.updated_at = time.time()

    # -- 0. the base model --------------------------------------------------------------------
    def bootstrap(self, base: Callable[[], Any]) -> str:
        """The served version; with none yet, publish ``base()`` (a MusicDiffusion) as v0001
        with its baseline index. With one, resume a watch and announce what is missing."""
        current = self.models.current()
        if current is not None:
            self.resume_canary()
            self.catch_up()
            return str(current["version"])
        model = base()
        model.version, model.parent = "v0001", None
        if model.baseline_index is None:
            model.baseline_index = self.base_index(model)
        else:  # shipped with the folder, inverted by these weights under the folder's name
            model.baseline_index.model_version = model.version
        self.publish_version(model, trainset_id="")
        return str(model.version)

    def base_index(self, model: Any) -> Any:
        """Z_V of a base model: its corpus windows (or synthetic tones for an untrained model
        without a corpus), inverted by ``model``. Never a user's upload."""
        from riffloop.music import TrainingIndex, base_windows, load_corpus, tone_windows

        s = self.settings
        if s.base_corpus_dir:
            split = load_corpus(Path(s.base_corpus_dir), "train")
            if split.mel != model.mel:
                raise PermanentError(f"corpus {s.base_corpus_dir} was sliced with another mel")
            images, ids = base_windows(split, s.baseline_rows)
        else:
            _log.warning("no base corpus: the base index holds synthetic tones")
            images, ids = tone_windows(model.mel, min(s.baseline_rows, 64))
        return self._timed_index(
            lambda: TrainingIndex.build(
                model, images, ids, s.baseline_inversion_steps, model_version=model.version
            )
        )

    def next_index(
        self, parent: Any, candidate: Any, pairs: Sequence[Mapping[str, Any]], images: torch.Tensor
    ) -> Any:
        """Z_V of a fine-tuned version: the parent's rows plus this set's winners (``images``
        [N, 1, H, W] in [−1, 1], one per pair), the new rows inverted by the candidate (the
        older ones carried over, or re-inverted at every ``baseline_refresh_every``-th
        version); each input's best new winner becomes its baseline (the genetic step). A pair
        that did not beat its input's baseline (``beat_baseline`` false: a weighted set's
        losers, a control arm's pairs) or has no rated score (NaN: a random draw, chosen
        without ratings) trains the model but wins nothing: it never replaces a baseline."""
        from riffloop.music import Winner, to_uint8

        base = parent.baseline_index or self.base_index(parent)
        try:
            winners = [
                Winner(
                    input_key=str(pair["input_key"]),
                    track_id=str(pair["target_track_id"]),
                    score=float(pair["score"]),
                    image=to_uint8(image[0]),
                )
                for pair, image in zip(pairs, images, strict=True)
                if math.isfinite(float(pair.get("score", math.nan)))
                and pair.get("beat_baseline", True) is True
            ]
        except KeyError as exc:  # the manifest is riffloop.loop.TrainingPair.to_dict()
            raise ValidationError(f"a training pair names no {exc.args[0]}") from None
        return self._timed_index(
            lambda: base.next_version(
                candidate,
                winners,
                model_version=candidate.version,
                steps=self.settings.baseline_inversion_steps,
                refresh_every=self.settings.baseline_refresh_every,
            )
        )

    @staticmethod
    def _timed_index(build: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        index = build()
        seconds = round(time.perf_counter() - started, 2)
        _log.info("baseline index built", extra={**index.describe(), "seconds": seconds})
        return index

    # -- 1. a training set --------------------------------------------------------------------
    def on_training_set(self, trainset: TrainingSet) -> Release | None:
        """Train, gate and release a candidate from ``trainset`` (or defer it while a canary
        runs); returns what was announced, None when nothing was."""
        self.catch_up()
        unfinished = None  # the version a crash left before its gate: train it again
        for known in self.registry.versions():
            record = self.registry.get(known)
            if record.trainset_id == trainset.trainset_id:
                if record.status is VersionStatus.CANARY and self.models.canary() is None:
                    return self._finish_canary_start(record)  # a crash came before its marker
                if record.status is not VersionStatus.CANDIDATE:
                    self.journal.clear(trainset.trainset_id)  # in case a crash left it
                    return None  # already trained and judged (a redelivery)
                unfinished = known
        running = self.running_canary()
        if running is not None:
            # One experiment at a time: a second canary would replace this one before its
            # ratings decide. The set waits (persisted) and is sent again when it ends.
            self.defer(trainset)
            _log.info(
                "training set deferred: a canary is running",
                extra={"trainset_id": trainset.trainset_id, "model_version": running},
            )
            return None
        pairs, images, data = self.training_data(trainset)
        current = self.bootstrap(self._no_base)
        parent = self.models.load(current)
        version = unfinished or f"v{len(self.registry.versions()) + 1:04d}"
        self.kv.set(LAST_ITERATION_KEY, str(max(trainset.iteration, 0)))
        candidate = self.fine_tune(
            parent, data, version, seed=trainset.iteration, trainset_id=trainset.trainset_id
        )
        candidate.baseline_index = self.next_index(parent, candidate, pairs, images)
        gate = self.gate(parent, candidate)
        self._set(gate=gate)
        release: Release | None = None
        if not gate.passed:
            self._store_version(candidate, trainset.trainset_id)  # kept, for a look at why
            self.registry.gate(version, gate.report)
            self._set(phase=CyclePhase.IDLE, candidate="")
            _log.info("candidate rejected", extra={"model_version": version, "why": gate.summary()})
        elif self.settings.canary_share > 0:
            release = self.start_canary(candidate, trainset_id=trainset.trainset_id, gate=gate)
        else:
            release = self.publish_version(candidate, trainset_id=trainset.trainset_id, gate=gate)
        self.journal.clear(trainset.trainset_id)
        return release

    @staticmethod
    def _no_base() -> Any:
        raise PermanentError("no model is served yet: the base model is published at start-up")

    def training_data(
        self, trainset: TrainingSet
    ) -> tuple[list[dict[str, Any]], torch.Tensor, Any]:
        """The set's pairs, their targets' first windows [K, 1, H, W] (the baseline index's
        winner rows) and what the fine-tune learns from (riffloop.music.MelDataset): those
        windows, or with ``train_windows`` = all every window of each target."""
        from riffloop.music import MelDataset

        sidecars: dict[str, dict[str, Any]] = {}  # track → its sidecar, read once
        pairs, images, weights, losers = self._read_pairs(trainset, sidecars)
        manifest = {"trainset_id": trainset.trainset_id, "pairs": len(pairs)}
        if self.settings.train_windows == "all":
            windows, repeated = self._every_window(pairs, images, weights, sidecars)
            manifest["windows"] = len(windows)
            return pairs, images, MelDataset.from_images(windows, repeated, manifest, losers)
        return pairs, images, MelDataset.from_images(images, weights, manifest, losers)

    def _read_pairs(
        self, trainset: TrainingSet, sidecars: dict[str, dict[str, Any]] | None = None
    ) -> tuple[list[dict[str, Any]], torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The manifest's pairs, their targets' first windows x_0 [N, 1, H, W] in [−1, 1] (from
        each track's sidecar, written by the generator), their ω and, for the preference loss
        (``preference_beta`` > 0 and every pair names a ``loser_track_id``), the losers'
        windows x^l; otherwise None and the set trains toward its targets alone."""
        sidecars = {} if sidecars is None else sidecars
        raw = self.objects.get(trainset.manifest_bucket, trainset.manifest_key)
        pairs = json.loads(raw).get("pairs", [])
        if not pairs:
            raise ValidationError(f"training set {trainset.trainset_id} has no pairs")
        images, weights, loser_ids = [], [], []
        for pair in pairs:
            try:
                track, weight = str(pair["target_track_id"]), float(pair["weight"])
                loser_ids.append(str(pair.get("loser_track_id") or ""))
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise ValidationError(f"a training pair is malformed: {exc}") from None
            images.append(self._first_window(track, sidecars))
            weights.append(weight)
        losers = None
        if self.settings.preference_beta > 0:
            if all(loser_ids):
                losers = torch.cat([self._first_window(track, sidecars) for track in loser_ids])
            else:
                _log.warning(
                    "preference_beta is set but the training set's pairs name no loser: "
                    "training toward the targets alone (is RIFFLOOP_PREFERENCE_PAIRS set on "
                    "the selector?)",
                    extra={"trainset_id": trainset.trainset_id},
                )
        shapes = {tuple(image.shape) for image in images}
        if len(shapes) > 1:
            raise ValidationError(f"the set's tracks have windows of different shapes {shapes}")
        return pairs, torch.cat(images), torch.tensor(weights, dtype=torch.float32), losers

    def _every_window(
        self,
        pairs: list[dict[str, Any]],
        firsts: torch.Tensor,
        weights: torch.Tensor,
        sidecars: dict[str, dict[str, Any]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every window x_0 [M, 1, H, W] of the pairs' targets, each with its track's ω
        (``train_windows`` = all). A target stored without its whole image (a generator before
        ``mel_key``, or a one-window track) gives its first window alone."""
        from riffloop.music import TrackLength, grid_from_npy, image_from_uint8

        images, repeated = [], []
        for pair, first, weight in zip(pairs, firsts, weights, strict=True):
            track = str(pair["target_track_id"])
            sidecar = self._sidecar(track, sidecars)
            windows = first[None]
            try:
                stored = bool(sidecar.get("mel_key")) and int(sidecar.get("windows", 1)) > 1
                if stored:
                    length = TrackLength(
                        windows=int(sidecar["windows"]),
                        x_res=int(first.shape[-1]),
                        overlap=int(sidecar["window_overlap"]),
                    )
            except (KeyError, TypeError, ValueError) as exc:
                raise ValidationError(
                    f"track {track}: its window layout is malformed: {exc}"
                ) from None
            if stored:
                grid = grid_from_npy(self.objects.get("tracks", str(sidecar["mel_key"])))
                if grid.shape[0] != first.shape[-2]:
                    raise ValidationError(
                        f"track {track}: its mel image has {grid.shape[0]} bins, "
                        f"its first window {first.shape[-2]}"
                    )
                windows = length.windows_of(image_from_uint8(grid)[None])  # [n, 1, H, W]
            images.append(windows)
            repeated.append(weight.expand(len(windows)))
        return torch.cat(images), torch.cat(repeated)

    def _sidecar(self, track_id: str, sidecars: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """The track's sidecar (``tracks/<id>.json``, written by the generator), read once per
        training set: ``sidecars`` keeps what was read."""
        if track_id not in sidecars:
            sidecars[track_id] = json.loads(self.objects.get("tracks", f"{track_id}.json"))
        return sidecars[track_id]

    def _first_window(self, track_id: str, sidecars: dict[str, dict[str, Any]]) -> torch.Tensor:
        """The track's first window x_0 [1, 1, H, W] in [−1, 1], from its sidecar."""
        from riffloop.music import image_from_uint8

        sidecar = self._sidecar(track_id, sidecars)
        grid = torch.tensor(sidecar["image_uint8"], dtype=torch.uint8)
        return image_from_uint8(grid)[None, None]

    def replay_windows(self, parent: Any) -> Any:
        """Replay data: the base rows of the parent's baseline index (the base corpus's training
        windows, or the synthetic tones of an untrained smoke-test model), ω = 1 — what the
        base model learnt from. Not the users' uploads, and not the generations kept for
        training (the index's winner rows: the training sets carry those, with their ω).
        Every version's index carries its base rows, so no corpus folder is needed here."""
        from riffloop.music import MelDataset, image_from_uint8

        index = parent.baseline_index
        if index is None:
            return None
        rows = [i for i, row_id in enumerate(index.ids) if not row_id.startswith(WINNER_ROW_PREFIX)]
        if not rows:
            return None
        manifest = {"replay": "base rows of the baseline index", "rows": len(rows)}
        return MelDataset.from_images(image_from_uint8(index.images[rows]), manifest=manifest)

    def fine_tune(
        self, parent: Any, data: Any, version: str, *, seed: int = 0, trainset_id: str = ""
    ) -> Any:
        """The candidate ``version`` fine-tuned from ``parent`` on ``data`` (step 1). The parent
        is left as it was (the trainer trains a copy): the gate needs it. With ``trainset_id``
        the progress is saved as it goes and a saved one is resumed (``FineTuneJournal``)."""
        from riffloop.music import Trainer

        replay = self.replay_windows(parent)
        if replay is None and self.settings.replay_ratio > 0:
            _log.warning("no base rows to replay: fine-tuning without replay")
        config = self.settings.training_config(seed, replay is not None, data.losers is not None)
        total = config.total_steps
        self._set(
            phase=CyclePhase.TRAINING,
            candidate=version,
            trainset_id=str(data.manifest.get("trainset_id", "")),
            step=0,
            total_steps=total,
        )
        try:
            if self.launcher is not None:
                candidate = self._fine_tune_in_job(parent, data, config, replay, version)
            else:
                with self.construction_lock:
                    trainer = Trainer(
                        copy.deepcopy(parent), data, config, replay, device=self.device
                    )
                self._train_in_chunks(trainer, parent, version, trainset_id)
                with self.construction_lock:
                    candidate = trainer.ema_model(version)  # LoRA merged: W + (α/r)·B·A
        except Exception as exc:
            if not isinstance(exc, Interrupted):
                self.observer.training_failed(exc)
            self._set(phase=CyclePhase.IDLE, candidate="")
            raise
        candidate.parent = parent.version
        return candidate

    def _train_in_chunks(self, trainer: Any, parent: Any, version: str, trainset_id: str) -> None:
        """Run ``trainer`` to its last step in chunks of ``steps_per_chunk``, honouring a stop
        request between them; with ``trainset_id`` (and ``finetune_save_every`` > 0) resume
        the saved progress first and save it at every multiple of ``finetune_save_every``, on
        a stop and after the last step."""
        total, every = trainer.config.total_steps, self.settings.finetune_save_every
        progress: FineTuneProgress | None = None
        if trainset_id and every > 0:
            parent_checkpoint = self.models.checkpoint_ref(parent.version).sha256
            progress = FineTuneProgress(
                trainset_id, version, parent.version, parent_checkpoint, 0, total
            )
            step = self.journal.resume(progress, trainer)
            if step:
                loss = trainer.loss_history[-1][1] if trainer.loss_history else 0.0
                self._set(step=step, last_loss=loss)
                self.observer.resumed(TrainingProgress(version, step, total, loss, 0))
        saved = trainer.step_count

        def save() -> None:
            nonlocal saved
            if progress is None or trainer.step_count <= saved:
                return
            try:
                self.journal.save(replace(progress, step=trainer.step_count), trainer)
                saved = trainer.step_count
            except TransientError as exc:  # the store is down: train on, save at the next one
                _log.warning("fine-tune progress not saved", extra={"why": exc.reason})

        while trainer.step_count < total:
            if self.stopping.is_set():  # SIGTERM: the redelivered set resumes from here
                save()
                raise Interrupted("trainer stopping; the training set will be redelivered")
            before = trainer.step_count
            chunk = self.settings.steps_per_chunk
            if progress is not None:  # end the chunk at the next save
                chunk = min(chunk, every - before % every)
            report = trainer.train(chunk, progress=False)
            loss = report.losses[-1][1] if report.losses else self.status().last_loss
            self._set(step=trainer.step_count, last_loss=loss)
            self.observer.progress(
                TrainingProgress(
                    version, trainer.step_count, total, loss, trainer.step_count - before
                )
            )
            if trainer.step_count % max(every, 1) == 0 or trainer.step_count >= total:
                save()

    def _fine_tune_in_job(
        self, parent: Any, data: Any, config: Any, replay: Any, version: str
    ) -> Any:
        """The fine-tune in a PyTorchJob. On a stop request the job keeps running; the
        redelivered set finds it by its name and waits again."""
        from riffloop.music._pytorchjob import read_result

        bundle = self.launcher.launch(parent, data, config, replay, version)
        self.launcher.wait(bundle.name, self.stopping)
        with self.construction_lock:
            candidate = read_result(bundle, version)
        self._set(step=config.total_steps)
        self.observer.progress(
            TrainingProgress(
                version, config.total_steps, config.total_steps, math.nan, config.total_steps
            )
        )
        return candidate

    # -- 3. the offline gate ------------------------------------------------------------------
    def quality_embedding(self, image_size: tuple[int, int]) -> QualityEmbedding:
        """The gate's embedding for images of ``image_size`` (loaded once)."""
        if self._quality is None or self._quality_size != image_size:
            self._quality, self._quality_size = QualityEmbedding.for_images(image_size), image_size
        return self._quality

    def gate(self, parent: Any, candidate: Any) -> GateVerdict:
        """The offline gate (step 3): ``candidate`` against ``parent`` and the lineage's root."""
        from riffloop.music import generate

        self._set(phase=CyclePhase.GATING)
        s = self.settings
        if s.gate_mode == "skip":
            return GateVerdict(GateReport(True, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0), 0, skipped=True)
        x_t = self.songs.latents(s.gate_samples)
        reference = self.songs.windows()
        if x_t is None or reference is None:
            raise PermanentError("the gate needs encoded songs (reference windows and x_T)")
        parent_images = generate(parent, x_t, s.gate_steps)
        candidate_images = generate(candidate, x_t, s.gate_steps)
        # and against the base model (the lineage's root), so drift cannot compound: each
        # version within tolerance of its parent could otherwise walk far from where it began
        try:
            root = self._root_of(parent.version)
        except NotFoundError:  # a lineage the registry does not know (an older deployment)
            _log.warning(
                "no registry lineage for the gate", extra={"model_version": parent.version}
            )
            root = parent.version
        root_images = self._root_gate_samples(root, x_t) if root != parent.version else None
        quality = self.quality_embedding(tuple(parent.image_shape[-2:]))
        report = OfflineGate(s.gate_fd_increase, s.gate_diversity_drop).evaluate(
            quality.embed(reference),
            quality.embed(parent_images),
            quality.embed(candidate_images),
            quality.embed(root_images) if root_images is not None else None,
        )
        return GateVerdict(replace(report, embedding=quality.name), int(x_t.shape[0]))

    def _root_of(self, version: str) -> str:
        """The first version of ``version``'s lineage (the base model), following parents."""
        seen = {version}
        while (parent := self.registry.get(version).parent) and parent not in seen:
            seen.add(parent)
            version = parent
        return version

    def _root_gate_samples(self, root: str, x_t: torch.Tensor) -> torch.Tensor:
        """The root model's samples from ``x_t``, generated once per (root, steps, x_T)."""
        from riffloop.music import generate

        digest = hashlib.sha256(x_t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
        key = (root, self.settings.gate_steps, digest)
        if self._root_samples is None or self._root_samples[0] != key:
            images = generate(self.models.load(root), x_t, self.settings.gate_steps)
            self._root_samples = (key, images)
        return self._root_samples[1]

    # -- 4. releasing -------------------------------------------------------------------------
    def _store_version(self, model: Any, trainset_id: str) -> Any:
        """Checkpoint parts and pointer, then the registry record (a redelivery finds it)."""
        self._set(phase=CyclePhase.PUBLISHING)
        checkpoint = self.models.publish(model)
        key = self.models.pointer_key(model.version)
        if model.version not in self.registry.versions():
            self.registry.register(
                ModelRecord(
                    version=model.version,
                    parent=model.parent,
                    trainset_id=trainset_id or None,
                    status=VersionStatus.CANDIDATE if model.parent else VersionStatus.SERVING,
                    checkpoint_key=key,
                    checkpoint_sha256=checkpoint.sha256,
                )
            )
        else:  # trained again after a crash: the record names the new checkpoint
            self.registry.record_checkpoint(model.version, key, checkpoint.sha256)
        return checkpoint

    def _watch(self, parent: str, version: str) -> None:
        """Start watching ``version`` against ``parent`` with no evidence yet."""
        with self.lock:
            replaced = self.watch
            self.looks_taken = 0
            self.watch, self.evidence = (parent, version), {}
        if replaced is not None and replaced[1] != version:
            self._unwatch(replaced[1])  # its persisted watch must not come back at a restart

    @_one_decision_at_a_time
    def publish_version(
        self, model: Any, *, trainset_id: str, gate: GateVerdict | None = None
    ) -> Release:
        """Serve ``model`` alone at once (the base model, or ``canary_share`` = 0); a fine-tuned
        one is watched against its parent from now on, across restarts."""
        checkpoint = self._store_version(model, trainset_id)
        if model.parent:
            if gate is not None:
                self.registry.gate(model.version, gate.report)
            self.registry.promote(model.version)
            self._watch(model.parent, model.version)
            self.kv.set(WATCH_KEY, json.dumps([model.parent, model.version]))
        self.models.set_current(model.version, model.parent or "", checkpoint.sha256)
        return self._announce(
            Release(
                model.version,
                model.parent or "",
                trainset_id,
                ReleaseAction.PROMOTE,
                checkpoint,
                gate,
            )
        )

    @_one_decision_at_a_time
    def start_canary(self, model: Any, *, trainset_id: str, gate: GateVerdict) -> Release:
        """Checkpoint, registry (CANARY), ``models/CANARY``, then the CANARY announcement."""
        if not model.parent:
            raise ValidationError("the base model has no parent to run a canary against")
        if not gate.passed:
            raise ValidationError(f"model {model.version} failed its gate; it gets no canary")
        checkpoint = self._store_version(model, trainset_id)
        self.registry.gate(model.version, gate.report)  # passed: CANDIDATE → CANARY
        self.models.set_canary(
            model.version, model.parent, self.settings.canary_share, checkpoint.sha256
        )
        self._watch(model.parent, model.version)
        return self._announce(
            Release(
                model.version,
                model.parent,
                trainset_id,
                ReleaseAction.CANARY,
                checkpoint,
                gate,
                self.settings.canary_share,
            )
        )

    @_one_decision_at_a_time
    def _finish_canary_start(self, record: ModelRecord) -> Release:
        """A gated candidate the registry calls CANARY but no marker names (the process died
        between the two writes): the marker, the watch and the announcement it never got."""
        if not record.parent:
            raise PermanentError(f"model {record.version} has no parent to run a canary against")
        if self.settings.canary_share <= 0:  # configured since to promote at once
            return self.promote(record.version)
        self.models.set_canary(
            record.version,
            record.parent,
            self.settings.canary_share,
            record.checkpoint_sha256 or "",
        )
        self._watch_again(record.parent, record.version)
        _log.warning("canary start finished", extra={"model_version": record.version})
        return self._announce(
            Release(
                record.version,
                record.parent,
                record.trainset_id or "",
                ReleaseAction.CANARY,
                self.models.checkpoint_ref(record.version),
                canary_share=self.settings.canary_share,
            )
        )

    def _announce(self, release: Release) -> Release:
        """Announce ``release`` and record that it went out (``trainer:announced``)."""
        self.unannounced = True  # until the announcement is out and recorded
        event_id = self.announce(release)
        said = self.announced() or {"current": "", "canary": ""}
        if release.action is ReleaseAction.CANARY:
            said = {**said, "canary": release.version}
        else:  # PROMOTE or ROLLBACK: the version alone is served, any canary ended
            said = {"current": release.version, "canary": ""}
        self.kv.set(ANNOUNCED_KEY, json.dumps(said))
        self.unannounced = False
        release = replace(release, event_id=event_id)
        self.observer.released(release)
        self._set(phase=CyclePhase.IDLE, candidate="")
        _log.info(
            "model published",
            extra={"model_version": release.version, "action": str(release.action)},
        )
        return release

    def announced(self) -> dict[str, str] | None:
        raw = self.kv.get(ANNOUNCED_KEY)
        return dict(json.loads(raw)) if raw else None

    @_one_decision_at_a_time
    def reconcile(self) -> list[Release]:
        """Announce what ``models/CURRENT`` and ``models/CANARY`` say but no announcement said
        yet (a failed publish, or a crash between a decision and its announcement). A decision
        writes the registry first, then the pointers: when they disagree the registry is right,
        and the pointers are finished first."""
        current = self.models.current()
        decided = self.registry.serving()
        if decided and (current is None or current.get("version") != decided):
            record = self.registry.get(decided)
            self.models.set_current(decided, record.parent or "", record.checkpoint_sha256 or "")
            current = self.models.current()
        if current is None:
            return []
        serving = str(current["version"])
        marker = self.models.canary()
        canary = ""
        if marker is not None:
            try:
                running = self.registry.get(str(marker["version"])).status is VersionStatus.CANARY
            except NotFoundError:
                running = False
            canary = str(marker["version"]) if running else ""
            if not running:
                self.models.clear_canary(str(marker["version"]))  # a decision left it behind
        said = self.announced()
        sent: list[Release] = []
        if said is None:
            # a deployment from before this record: take the pointers as announced (generators
            # load them at start-up) rather than re-announce and flap a running canary
            self.kv.set(ANNOUNCED_KEY, json.dumps({"current": serving, "canary": canary}))
            said = self.announced()
        if said is not None and said.get("current") != serving:
            was = said.get("current", "")
            back = (
                bool(was)
                and was in self.registry.versions()
                and serving in self.registry.lineage(was)
            )
            record = self.registry.get(serving)
            action = ReleaseAction.ROLLBACK if back else ReleaseAction.PROMOTE
            sent.append(self._reannounce(record, action, record.trainset_id or ""))
            said = self.announced()
        if said is not None and said.get("canary", "") != canary:
            if canary and marker is not None:
                record = self.registry.get(canary)
                share = float(marker["share"])
                sent.append(
                    self._reannounce(record, ReleaseAction.CANARY, record.trainset_id or "", share)
                )
            else:  # the canary ended and no announcement said so: the served version alone
                sent.append(
                    self._reannounce(self.registry.get(serving), ReleaseAction.ROLLBACK, "")
                )
        self.unannounced = False
        if sent:
            _log.warning("announcements reconciled", extra={"events": len(sent)})
        return sent

    def _reannounce(
        self, record: ModelRecord, action: ReleaseAction, trainset_id: str, share: float = 0.0
    ) -> Release:
        checkpoint = self.models.checkpoint_ref(record.version)
        return self._announce(
            Release(
                record.version,
                record.parent or "",
                trainset_id,
                action,
                checkpoint,
                canary_share=share,
                reconciled=True,
            )
        )

    def catch_up(self) -> None:
        """Before an event is handled: announce what a failure left out, and send again a
        training set kept during a canary that has ended since."""
        if self.unannounced:
            self.reconcile()
        self.release_deferred()

    # -- 5. deferral ----------------------------------------------------------------------------
    def defer(self, trainset: TrainingSet) -> None:
        """Keep ``trainset`` for after the canary, unless a newer set (higher iteration) is
        kept: the selector's sets are cumulative, so the newest one stands for the others."""
        kept = self.deferred()
        if kept is not None and kept.iteration > trainset.iteration:
            return
        self.kv.set(DEFERRED_KEY, trainset.to_json())

    def deferred(self) -> TrainingSet | None:
        raw = self.kv.get(DEFERRED_KEY)
        if not raw:
            return None
        try:
            return TrainingSet.from_json(raw)
        except (ValueError, TypeError) as exc:
            # not a record this code wrote: dropped (the selector's next set carries its pairs)
            _log.warning("unreadable deferred training set dropped", extra={"error": str(exc)})
            self.kv.delete(DEFERRED_KEY)
            return None

    def release_deferred(self) -> str | None:
        """No canary running: send again the training set kept while one ran (a fresh event,
        so the consumers' de-duplication does not swallow it); returns its trainset id."""
        if self.running_canary() is not None:
            return None
        trainset = self.deferred()
        if trainset is None:
            return None
        if trainset.iteration < int(self.kv.get(LAST_ITERATION_KEY) or 0):
            # a newer set overtook it while it waited: its surviving pairs are in that one
            self.kv.delete(DEFERRED_KEY)
            _log.info(
                "deferred training set superseded", extra={"trainset_id": trainset.trainset_id}
            )
            return None
        self.resubmit(trainset)
        self.kv.delete(DEFERRED_KEY)
        _log.info("deferred training set released", extra={"trainset_id": trainset.trainset_id})
        return trainset.trainset_id

    # -- 4. the canary watch ------------------------------------------------------------------
    def on_scores(self, scores: Sequence[ScoredTrack]) -> CanaryVerdict | None:
        """Record the scores of the watched versions' tracks; at each planned look, decide with
        ``Canary`` on the margins (``canary_margins``) and act. Returns a final verdict."""
        self.catch_up()
        s = self.settings
        with self.lock:
            watch = self.watch
            if watch is None:
                return None
            fresh: dict[str, str] = {}
            for scored in scores:
                # a non-finite R, kept, would make every later decision raise (Canary.record
                # refuses it) and hold the watch forever
                if scored.model_version in watch and math.isfinite(scored.score):
                    self.evidence[scored.track_id] = scored
                    fresh[scored.track_id] = scored.to_json()
            if not fresh:
                return None
            parent, candidate = watch
            self.kv.hset(_evidence_key(candidate), fresh)  # a restart continues from it
            # group-sequential: test only when the smaller side's generations reach the next
            # planned look, each look at α / K, so watching the stream does not inflate the
            # error rate
            looks = Canary.looks(s.canary_min_ratings, s.canary_max_ratings)
            margins = canary_margins(self.evidence, watch)
            smaller = min(len(margins[parent]), len(margins[candidate]))
            reached = bisect.bisect_right(looks, smaller)
            if reached <= self.looks_taken:
                return None
            looked_before, self.looks_taken = self.looks_taken, reached
            self.kv.set(_evidence_key(candidate) + ":looks", str(reached))
        canary = Canary(
            parent,
            candidate,
            alpha=s.canary_alpha / len(looks),
            min_ratings=s.canary_min_ratings,
            max_ratings=s.canary_max_ratings,
        )
        for version in watch:
            for margin in margins[version]:
                canary.record(version, margin)
        verdict = canary.decide()
        if verdict.decision is CanaryDecision.CONTINUE:
            return None
        with self.decisions:  # an operator's Promote or Rollback waits, or went first
            with self.lock:
                if self.watch != watch:
                    return None  # another decision or promotion happened meanwhile
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
        return verdict

    def _undecided(self, watch: tuple[str, str]) -> bool:
        """The watched candidate still runs as a canary, or still serves as promoted at once."""
        try:
            status = self.registry.get(watch[1]).status
            current = (self.models.current() or {}).get("version")
        except Exception:  # the store is what failed: keep watching, the retry will tell
            return True
        return status is VersionStatus.CANARY or (
            status is VersionStatus.SERVING and current == watch[1]
        )

    def _unwatch(self, candidate: str) -> None:
        """The watch of ``candidate`` is over: its persisted evidence and marker go."""
        self.kv.delete(_evidence_key(candidate))
        self.kv.delete(_evidence_key(candidate) + ":looks")
        raw = self.kv.get(WATCH_KEY)
        if raw and json.loads(raw)[1] == candidate:
            self.kv.delete(WATCH_KEY)

    @_one_decision_at_a_time
    def _act_on(self, watch: tuple[str, str], verdict: CanaryVerdict) -> None:
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
            current = self.models.current() or {}
            if current.get("version") == candidate:
                self.rollback(parent)

    def resume_canary(self) -> str | None:
        """After a restart: watch the canary ``models/CANARY`` names, if the registry still has
        it as CANARY (a marker left by a crash after the decision is removed), with the evidence
        gathered before the restart; else a version promoted at once whose watch had not
        decided. Returns the version watched."""
        marker = self.models.canary()
        if marker is None:
            return self._resume_watch()
        version = str(marker["version"])
        try:
            record: ModelRecord | None = self.registry.get(version)
        except NotFoundError:
            record = None
        if record is None or record.status is not VersionStatus.CANARY or not record.parent:
            self.models.clear_canary(version)
            return None
        with self.lock:
            resumed = self.watch is None
        if resumed:
            evidence = self._watch_again(record.parent, version)
            _log.info("canary resumed", extra={"model_version": version, "scores": len(evidence)})
        return version

    def _watch_again(self, parent: str, version: str) -> dict[str, ScoredTrack]:
        """Watch ``version`` against ``parent`` with the evidence and looks persisted so far
        (unless a watch started meanwhile); returns that evidence."""
        key = _evidence_key(version)
        evidence = {
            track: ScoredTrack.from_json(track, raw) for track, raw in self.kv.hgetall(key).items()
        }
        looks = int(self.kv.get(key + ":looks") or 0)
        with self.lock:
            if self.watch is None:
                self.looks_taken = looks
                self.watch, self.evidence = (parent, version), evidence
        return evidence

    def _resume_watch(self) -> str | None:
        raw = self.kv.get(WATCH_KEY)
        if not raw:
            return None
        parent, version = (str(v) for v in json.loads(raw))
        current = self.models.current() or {}
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

    # -- promote and roll back ----------------------------------------------------------------
    @_one_decision_at_a_time
    def abort_canary(self, candidate: str, verdict: CanaryVerdict | None = None) -> Release:
        """The canary lost: mark it ROLLED_BACK; generators drop it and serve the parent."""
        record = self.registry.get(candidate)
        if record.status is not VersionStatus.CANARY or not record.parent:
            raise PermanentError(f"model {candidate} is {record.status}, not a canary")
        self.registry.roll_back(candidate, verdict)
        self.models.clear_canary(candidate)
        self.observer.rolled_back(candidate)
        with self.lock:
            if self.watch is not None and self.watch[1] == candidate:
                self.watch = None
        self._unwatch(candidate)
        parent = self.registry.get(record.parent)
        return self._announce(
            Release(
                parent.version,
                parent.parent or "",
                "",
                ReleaseAction.ROLLBACK,
                self.models.checkpoint_ref(parent.version),
            )
        )

    @_one_decision_at_a_time
    def promote(self, version: str, verdict: CanaryVerdict | None = None) -> Release:
        """Serve ``version`` alone: a canary's win (``verdict``), or an operator's promotion
        (a watched version stays watched)."""
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
            self.kv.set(WATCH_KEY, json.dumps([record.parent, version]))
        self.models.set_current(version, record.parent or "", record.checkpoint_sha256 or "")
        self.models.clear_canary(version)
        return self._announce(
            Release(
                version,
                record.parent or "",
                record.trainset_id or "",
                ReleaseAction.PROMOTE,
                self.models.checkpoint_ref(version),
            )
        )

    @_one_decision_at_a_time
    def rollback(self, version: str = "") -> tuple[str, str, Release]:
        """Serve ``version`` (an ancestor of the served one; "" = its parent) again. During a
        canary, "" or the canary's parent ends the canary. Returns (served now, served before
        or the dropped canary, the announcement)."""
        candidate = self.running_canary()
        if candidate is not None:
            parent = self.registry.get(candidate).parent or ""
            if version in ("", parent):
                # A running canary is what "roll back" means to an operator: drop it.
                return parent, candidate, self.abort_canary(candidate)
        current = self.models.current()
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
        target_record = self.registry.get(target)
        target_parent = target_record.parent or ""
        self.models.set_current(target, target_parent, target_record.checkpoint_sha256 or "")
        self.observer.rolled_back(serving)
        with self.lock:
            watched, self.watch = self.watch, None
        if watched is not None:
            self._unwatch(watched[1])
        release = self._announce(
            Release(
                target,
                target_parent,
                "",
                ReleaseAction.ROLLBACK,
                self.models.checkpoint_ref(target),
            )
        )
        return target, serving, release
