"""Key-value keys that one service writes and another reads (every other key is private to
the service whose prefix it carries)."""

from __future__ import annotations

# Written by the feedback service's scoring pass, read by the gateway's ListModels:
# hash model version → JSON {generated_mean, generated_count, baseline_mean, baseline_count}.
MODEL_RATINGS_KEY = "fb:model-ratings"

__all__ = ["MODEL_RATINGS_KEY"]
