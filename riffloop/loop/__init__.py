"""The human-computation loop as domain logic (arXiv 2506.04852, §3 of the design).

dispatch → feedback → quality control → confidence ω → genetic selection + purge → fine-tune →
gate → canary → registry; generation requests are admitted per user and against the
generators' backlog (``GenerationBacklog``). No transport here: services call these objects
from their handlers, and state goes through ``riffloop.core`` ports. The simulated listeners,
the demo's experiment, its report and its CLI are ``riffloop.sim``, a client of this package
(never the reverse).

The torch-bound part (the release gate and canary) loads on first use (PEP 562): a process that
only records and scores feedback, such as the feedback service's scoring child, imports numpy and
scipy but not torch (≈ 2.5 s and ≈ 200 MB less per process).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from riffloop.loop._admission import AdmissionPolicy, GenerationBacklog
from riffloop.loop._confidence import ConfidenceWeight, TrackScored, TrackScores
from riffloop.loop._dispatch import Dispatcher, ReadyDelay
from riffloop.loop._feedback import (
    FeedbackLedger,
    ListenEvent,
    Observation,
    RaterNormaliser,
    RaterScale,
    Rating,
)
from riffloop.loop._intake import (
    FeedbackHooks,
    FeedbackIntake,
    FeedbackMirror,
    ParkedFeedback,
    ReplicaOp,
    TrackRecord,
    replay_ops,
)
from riffloop.loop._model_ratings import (
    KindRatings,
    ModelRatings,
    ModelRatingsView,
    model_ratings,
    star_summary,
)
from riffloop.loop._provenance import TrackKind, TrackProvenance
from riffloop.loop._queue import QueuedTrack, QueuePolicy, choose_next_track
from riffloop.loop._selection import (
    GeneticSelector,
    PurgeCycle,
    PurgeResult,
    RandomSelector,
    SelectionResult,
    TrainingPair,
    WeightedSelector,
    auto_near_duplicate,
    baseline_scores,
    cosine_distance,
    diversity_guard,
    manifest_json,
    model_score_by_input,
)
from riffloop.loop._spam import SpamFilter, SpamReason, SpamReport

if TYPE_CHECKING:
    from riffloop.loop._cycle import (
        CycleObserver,
        CyclePhase,
        CycleSettings,
        CycleStatus,
        GateVerdict,
        QualityEmbedding,
        Release,
        ReleaseAction,
        ReleaseCycle,
        ScoredTrack,
        TrainingProgress,
        TrainingSet,
        canary_margins,
    )
    from riffloop.loop._progress import FineTuneJournal, FineTuneProgress
    from riffloop.loop._release import (
        Canary,
        CanaryDecision,
        CanaryVerdict,
        GateReport,
        ModelRecord,
        ModelRegistry,
        OfflineGate,
        VersionStatus,
        welch_ci,
    )

_LAZY = {
    "CycleObserver": "riffloop.loop._cycle",
    "CyclePhase": "riffloop.loop._cycle",
    "CycleSettings": "riffloop.loop._cycle",
    "CycleStatus": "riffloop.loop._cycle",
    "GateVerdict": "riffloop.loop._cycle",
    "QualityEmbedding": "riffloop.loop._cycle",
    "Release": "riffloop.loop._cycle",
    "ReleaseAction": "riffloop.loop._cycle",
    "ReleaseCycle": "riffloop.loop._cycle",
    "ScoredTrack": "riffloop.loop._cycle",
    "TrainingProgress": "riffloop.loop._cycle",
    "TrainingSet": "riffloop.loop._cycle",
    "canary_margins": "riffloop.loop._cycle",
    "FineTuneJournal": "riffloop.loop._progress",
    "FineTuneProgress": "riffloop.loop._progress",
    "Canary": "riffloop.loop._release",
    "CanaryDecision": "riffloop.loop._release",
    "CanaryVerdict": "riffloop.loop._release",
    "GateReport": "riffloop.loop._release",
    "ModelRecord": "riffloop.loop._release",
    "ModelRegistry": "riffloop.loop._release",
    "OfflineGate": "riffloop.loop._release",
    "VersionStatus": "riffloop.loop._release",
    "welch_ci": "riffloop.loop._release",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'riffloop.loop' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain module attribute
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "AdmissionPolicy",
    "Canary",
    "CanaryDecision",
    "CanaryVerdict",
    "ConfidenceWeight",
    "CycleObserver",
    "CyclePhase",
    "CycleSettings",
    "CycleStatus",
    "Dispatcher",
    "FeedbackHooks",
    "FeedbackIntake",
    "FeedbackLedger",
    "FeedbackMirror",
    "FineTuneJournal",
    "FineTuneProgress",
    "GateReport",
    "GateVerdict",
    "GenerationBacklog",
    "GeneticSelector",
    "KindRatings",
    "ListenEvent",
    "ModelRatings",
    "ModelRatingsView",
    "ModelRecord",
    "ModelRegistry",
    "Observation",
    "OfflineGate",
    "ParkedFeedback",
    "PurgeCycle",
    "PurgeResult",
    "QualityEmbedding",
    "QueuePolicy",
    "QueuedTrack",
    "RandomSelector",
    "RaterNormaliser",
    "RaterScale",
    "Rating",
    "ReadyDelay",
    "Release",
    "ReleaseAction",
    "ReleaseCycle",
    "ReplicaOp",
    "ScoredTrack",
    "SelectionResult",
    "SpamFilter",
    "SpamReason",
    "SpamReport",
    "TrackKind",
    "TrackProvenance",
    "TrackRecord",
    "TrackScored",
    "TrackScores",
    "TrainingPair",
    "TrainingProgress",
    "TrainingSet",
    "VersionStatus",
    "WeightedSelector",
    "auto_near_duplicate",
    "baseline_scores",
    "canary_margins",
    "choose_next_track",
    "cosine_distance",
    "diversity_guard",
    "manifest_json",
    "model_ratings",
    "model_score_by_input",
    "replay_ops",
    "star_summary",
    "welch_ci",
]
