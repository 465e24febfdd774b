"""What listeners think of each model version: per-version rating summaries of a scoring pass.

Generated tracks and baseline tracks (z0, served under the version that was current) apart, so
the pair compares the model with its own training data on the same requests. ``model_ratings``
aggregates a pass's :class:`TrackScores`; :class:`ModelRatingsView` keeps the key-value hash that
readers (the gateway's ListModels) serve, rewriting only the versions that changed.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping

import numpy as np
from scipy import stats

from riffloop.core import KeyValueStore
from riffloop.loop._confidence import TrackScores
from riffloop.loop._provenance import TrackKind, TrackProvenance

STAR_INTERVAL_LEVEL = 0.95


@dataclasses.dataclass(frozen=True)
class KindRatings:
    """What listeners said of one kind of track (generated or baseline) of one model version.

    Stars, for people: the raw stars x_i ∈ {1 … 5} of the accepted ratings whose raters quality
    control trusts (ρ_r > 0; a caught spammer or bot has ρ_r = 0), pooled over the tracks:

        x̄ = Σ x_i / n      s² = (Σ x_i² − n·x̄²) / (n − 1)
        95 % interval  x̄ ± t_{0.975, n−1} · s / √n, clipped to the star range [1, 5];
        none when n < 2 (``stars_low``/``stars_high`` None); [x̄, x̄] when every star is equal.

    The t-interval treats the ratings as independent. Ratings of one track share that track's
    quality, so when a few tracks carry most ratings the interval is narrower than the
    uncertainty about the version (a bootstrap over tracks would widen it).

    Normalised score, for the loop: Σ_j R_j·n_j / Σ_j n_j over the tracks j (R_j the track's
    shrunk, rater-normalised score, n_j its accepted ratings, trusted or not): what the
    selector and the canary compare, on the star scale but not a mean of stars."""

    mean_stars: float = 0.0
    stars_low: float | None = None
    stars_high: float | None = None
    rating_count: int = 0  # n, the ratings behind mean_stars
    track_count: int = 0  # the tracks they rate
    mean_normalised_score: float = 0.0
    normalised_rating_count: int = 0  # Σ_j n_j


def star_summary(n: int, total: float, total_sq: float) -> tuple[float, float | None, float | None]:
    """(x̄, low, high) of n stars from Σ x and Σ x² (the t-interval of :class:`KindRatings`)."""
    if n < 1:
        return 0.0, None, None
    mean = total / n
    if n < 2:
        return mean, None, None
    variance = max(0.0, (total_sq - n * mean * mean) / (n - 1))  # round-off can dip below 0
    half = float(stats.t.ppf(0.5 + STAR_INTERVAL_LEVEL / 2, n - 1)) * math.sqrt(variance / n)
    return mean, max(1.0, mean - half), min(5.0, mean + half)


@dataclasses.dataclass(frozen=True)
class ModelRatings:
    """What listeners think of one model version, generated and baseline tracks apart — the
    baseline z0 is served under the version that was current, so the pair compares the model
    with its own training data on the same requests. The ``fb:model-ratings`` value."""

    generated: KindRatings = KindRatings()
    baseline: KindRatings = KindRatings()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def model_ratings(
    scores: TrackScores, provenance: Callable[[str], TrackProvenance]
) -> dict[str, ModelRatings]:
    """Per-version aggregates of the latest scores (tracks without a version are skipped)."""
    groups: dict[tuple[str, TrackKind], int] = {}  # (version, kind) → g
    codes = np.full(len(scores.first), -1, dtype=np.int64)
    for j, o in enumerate(scores.first):
        prov = provenance(o.track_id)
        if prov.model_version:
            codes[j] = groups.setdefault((prov.model_version, prov.kind), len(groups))
    k = len(groups)

    def per_group(keep: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return np.bincount(codes[keep], weights=weights[keep], minlength=k)

    # the normalised score: Σ R_j n_j and Σ n_j
    rated = (codes >= 0) & (scores.n_ratings > 0)
    n = scores.n_ratings.astype(float)
    score_total, score_count = per_group(rated, scores.score * n), per_group(rated, n)
    # the stars: Σ x, Σ x², n over trusted ratings, and the tracks they rate
    trusted = (codes >= 0) & (scores.n_trusted > 0)
    n_t = scores.n_trusted.astype(float)
    with np.errstate(invalid="ignore"):  # mean_stars is NaN where n_trusted = 0 (not kept)
        star_total = per_group(trusted, scores.mean_stars * n_t)
    star_sq, star_count = per_group(trusted, scores.sum_sq_stars), per_group(trusted, n_t)
    tracks = per_group(trusted, np.ones(len(codes)))

    def of(version: str, kind: TrackKind) -> KindRatings:
        g = groups.get((version, kind))
        if g is None:
            return KindRatings()
        count = round(float(star_count[g]))
        mean, low, high = star_summary(count, float(star_total[g]), float(star_sq[g]))
        scored = int(score_count[g])
        return KindRatings(
            mean_stars=mean,
            stars_low=low,
            stars_high=high,
            rating_count=count,
            track_count=int(tracks[g]),
            mean_normalised_score=float(score_total[g] / scored) if scored else 0.0,
            normalised_rating_count=scored,
        )

    return {
        version: ModelRatings(of(version, TrackKind.GENERATED), of(version, TrackKind.BASELINE))
        for version in {version for version, _ in groups}
    }


class ModelRatingsView:
    """The per-version :class:`ModelRatings` as readers see them: one key-value hash, version →
    JSON. :meth:`write` rewrites only the versions whose value differs from the last one it
    wrote, so a pass with nothing new writes nothing, and a failed write is retried whole by
    the next call."""

    def __init__(self, kv: KeyValueStore, key: str) -> None:
        self.kv = kv
        self.key = key
        self._written: dict[str, str] = {}

    def write(self, ratings: Mapping[str, ModelRatings]) -> dict[str, str]:
        """Write the changed versions; return them (version → JSON)."""
        fresh = {version: r.to_json() for version, r in ratings.items()}
        changed = {v: raw for v, raw in fresh.items() if self._written.get(v) != raw}
        if changed:
            self.kv.hset_many({self.key: changed})
            self._written.update(changed)
        return changed

    def forget(self) -> None:
        """The hash was lost (an emptied store): the next :meth:`write` writes every version."""
        self._written = {}
