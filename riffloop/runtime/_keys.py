"""Key-value keys that one service writes and another reads (every other key is private to
the service whose prefix it carries)."""

from __future__ import annotations

# Written by the feedback service's scoring pass, read by the gateway's ListModels:
# hash model version → JSON {generated_mean, generated_count, baseline_mean, baseline_count}.
MODEL_RATINGS_KEY = "fb:model-ratings"

# The Kafka key of every TrackScoredBatch on tracks.scored.v1: one key, one partition, so the
# chunks of successive scoring passes are read in the order they were written.
TRACK_SCORES_KEY = "track-scores"

__all__ = ["MODEL_RATINGS_KEY", "TRACK_SCORES_KEY"]
