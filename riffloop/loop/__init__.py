"""The human-computation loop as domain logic (arXiv 2506.04852, §3 of the design).

dispatch → feedback → quality control → confidence ω → genetic selection + purge → fine-tune →
gate → canary → registry. No transport here: services call these objects from their handlers,
state goes through ``riffloop.core`` ports, and the demo runs everything in one process.

The torch-bound parts (the experiment, the release gate and canary, the demo's CLI and report)
load on first use (PEP 562): a process that only records and scores feedback, such as the
feedback service's scoring child, imports numpy and scipy but not torch (≈ 2.5 s and ≈ 200 MB
less per process).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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
from riffloop.loop._listeners import (
    FEATURES,
    TASTE_FAMILIES,
    AudioFeatures,
    BurstBot,
    ConstantBot,
    Listener,
    ListenerFactory,
    ListenOutcome,
    RandomBot,
    TasteListener,
    ZeroListenBot,
    audio_features,
    bright_dense_listeners,
    checked_answer,
    dark_sparse_listeners,
    load_listener_factory,
    make_population,
    taste_population,
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
    auto_near_duplicate,
    baseline_scores,
    cosine_distance,
    diversity_guard,
    manifest_json,
    model_score_by_input,
)
from riffloop.loop._spam import SpamFilter, SpamReason, SpamReport

if TYPE_CHECKING:
    from riffloop.loop._cli import demo, evidence
    from riffloop.loop._experiment import (
        IterationRow,
        LoopConfig,
        LoopExperiment,
        LoopResult,
        LoopWorld,
        load_world,
    )
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
    from riffloop.loop._report import format_table, paired_interval

_LAZY = {
    "Canary": "riffloop.loop._release",
    "CanaryDecision": "riffloop.loop._release",
    "CanaryVerdict": "riffloop.loop._release",
    "GateReport": "riffloop.loop._release",
    "IterationRow": "riffloop.loop._experiment",
    "LoopConfig": "riffloop.loop._experiment",
    "LoopExperiment": "riffloop.loop._experiment",
    "LoopResult": "riffloop.loop._experiment",
    "LoopWorld": "riffloop.loop._experiment",
    "ModelRecord": "riffloop.loop._release",
    "ModelRegistry": "riffloop.loop._release",
    "OfflineGate": "riffloop.loop._release",
    "VersionStatus": "riffloop.loop._release",
    "demo": "riffloop.loop._cli",
    "evidence": "riffloop.loop._cli",
    "format_table": "riffloop.loop._report",
    "load_world": "riffloop.loop._experiment",
    "paired_interval": "riffloop.loop._report",
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
    "FEATURES",
    "TASTE_FAMILIES",
    "AudioFeatures",
    "BurstBot",
    "Canary",
    "CanaryDecision",
    "CanaryVerdict",
    "ConfidenceWeight",
    "ConstantBot",
    "Dispatcher",
    "FeedbackLedger",
    "GateReport",
    "GeneticSelector",
    "IterationRow",
    "ListenEvent",
    "ListenOutcome",
    "Listener",
    "ListenerFactory",
    "LoopConfig",
    "LoopExperiment",
    "LoopResult",
    "LoopWorld",
    "ModelRecord",
    "ModelRegistry",
    "Observation",
    "OfflineGate",
    "PurgeCycle",
    "PurgeResult",
    "QueuePolicy",
    "QueuedTrack",
    "RandomBot",
    "RandomSelector",
    "RaterNormaliser",
    "RaterScale",
    "Rating",
    "ReadyDelay",
    "SelectionResult",
    "SpamFilter",
    "SpamReason",
    "SpamReport",
    "TasteListener",
    "TrackKind",
    "TrackProvenance",
    "TrackScored",
    "TrackScores",
    "TrainingPair",
    "VersionStatus",
    "ZeroListenBot",
    "audio_features",
    "auto_near_duplicate",
    "baseline_scores",
    "bright_dense_listeners",
    "checked_answer",
    "choose_next_track",
    "cosine_distance",
    "dark_sparse_listeners",
    "demo",
    "diversity_guard",
    "evidence",
    "format_table",
    "load_listener_factory",
    "load_world",
    "make_population",
    "manifest_json",
    "model_score_by_input",
    "paired_interval",
    "taste_population",
    "welch_ci",
]
