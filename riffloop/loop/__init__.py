"""The human-computation loop as domain logic (arXiv 2506.04852, §3 of the design).

dispatch → feedback → quality control → confidence ω → genetic selection + purge → fine-tune →
gate → canary → registry. No transport here: services call these objects from their handlers,
state goes through ``riffloop.core`` ports, and the demo runs everything in one process.
"""

from riffloop.loop._confidence import ConfidenceWeight, TrackScored
from riffloop.loop._dispatch import Dispatcher
from riffloop.loop._feedback import (
    FeedbackLedger,
    ListenEvent,
    Observation,
    RaterNormaliser,
    RaterScale,
    Rating,
)
from riffloop.loop._provenance import TrackKind, TrackProvenance
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

__all__ = [
    "Canary",
    "CanaryDecision",
    "CanaryVerdict",
    "ConfidenceWeight",
    "Dispatcher",
    "FeedbackLedger",
    "GateReport",
    "GeneticSelector",
    "ListenEvent",
    "ModelRecord",
    "ModelRegistry",
    "Observation",
    "OfflineGate",
    "PurgeCycle",
    "PurgeResult",
    "RandomSelector",
    "RaterNormaliser",
    "RaterScale",
    "Rating",
    "SelectionResult",
    "SpamFilter",
    "SpamReason",
    "SpamReport",
    "TrackKind",
    "TrackProvenance",
    "TrackScored",
    "TrainingPair",
    "VersionStatus",
    "auto_near_duplicate",
    "baseline_scores",
    "cosine_distance",
    "diversity_guard",
    "manifest_json",
    "model_score_by_input",
    "welch_ci",
]
