"""Feedback: ratings and listen events, validated into an event-sourced ledger.

The ledger is the aggregate the feedback service owns. Every accepted input is one event;
``apply`` is deterministic, so the state can be rebuilt from the topic (Kafka is the log, the
key-value store only a cache: ``snapshot``/``restore``). A rejected input raises a typed error
from ``riffloop.core`` *before* any state changes.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from riffloop.core import (
    ConflictError,
    KeyValueStore,
    NotFoundError,
    PermissionDeniedError,
    ValidationError,
)
from riffloop.loop._provenance import TrackKind, TrackProvenance

MIN_STARS, MAX_STARS = 1, 5


@dataclass(frozen=True, slots=True)
class Rating:
    """One listener's 1–5 star rating of one served track."""

    track_id: str
    rater_id: str
    stars: int
    submitted_at: float  # seconds, the client's clock as stamped by the gateway


@dataclass(frozen=True, slots=True)
class ListenEvent:
    """How long a listener played a served track (reported once, when playback stops)."""

    track_id: str
    rater_id: str
    seconds_listened: float
    clip_seconds: float
    completed: bool
    skipped: bool
    submitted_at: float


@dataclass(frozen=True, slots=True)
class Observation:
    """A rating joined with its listen event and the track's (hidden) provenance."""

    track_id: str
    rater_id: str
    stars: int
    submitted_at: float
    seconds_listened: float  # 0 when no listen event arrived
    clip_seconds: float
    kind: TrackKind
    input_key: str
    baseline_sample_id: str | None

    @property
    def listened_fraction(self) -> float:
        return min(1.0, self.seconds_listened / self.clip_seconds) if self.clip_seconds else 0.0


@dataclass
class _ServedTrack:
    provenance: TrackProvenance
    clip_seconds: float
    served_to: dict[str, float] = field(default_factory=dict)  # rater → served_at


class FeedbackLedger:
    """Validates and records ratings and listen events for served tracks.

    Errors (each leaves the ledger unchanged):
    - ``ValidationError``: stars outside 1–5 or not an integer; negative or non-finite times;
      listening longer than the clip plus ``tolerance_s``; a clip length that disagrees with
      the served track's.
    - ``NotFoundError``: a track id that was never registered.
    - ``PermissionDeniedError``: a listener rating or reporting on a track never served to them.
    - ``ConflictError``: a second rating (or second listen report) of the same track by the same
      listener.
    """

    def __init__(self, tolerance_s: float = 0.5) -> None:
        self.tolerance_s = tolerance_s
        self._tracks: dict[str, _ServedTrack] = {}
        self._ratings: dict[tuple[str, str], Rating] = {}
        self._listens: dict[tuple[str, str], ListenEvent] = {}
        # Observation per (track, rater), built on first read and dropped when its listen
        # arrives: a scoring pass reads the whole ledger every few seconds, and rebuilding
        # every row each time was a sixth of the pass at 50,000 ratings.
        self._observed: dict[tuple[str, str], Observation] = {}
        self._stars_by_rater: dict[str, list[int]] = {}  # for one rater's report, O(theirs)

    # 1. tracks and serving ------------------------------------------------------------------
    def register_track(self, provenance: TrackProvenance, clip_seconds: float) -> None:
        if not (math.isfinite(clip_seconds) and clip_seconds > 0):
            raise ValidationError("clip_seconds must be a positive number")
        existing = self._tracks.get(provenance.track_id)
        if existing is not None:
            if existing.provenance != provenance:
                raise ConflictError(f"track {provenance.track_id} already registered differently")
            return  # idempotent: the same TrackReady delivered twice
        self._tracks[provenance.track_id] = _ServedTrack(provenance, clip_seconds)

    def mark_served(self, track_id: str, rater_id: str, served_at: float) -> None:
        track = self._track(track_id)
        track.served_to.setdefault(rater_id, served_at)

    def knows(self, track_id: str) -> bool:
        return track_id in self._tracks

    def provenance(self, track_id: str) -> TrackProvenance:
        return self._track(track_id).provenance

    def _track(self, track_id: str) -> _ServedTrack:
        track = self._tracks.get(track_id)
        if track is None:
            raise NotFoundError(f"unknown track {track_id}")
        return track

    def _served(self, track_id: str, rater_id: str) -> _ServedTrack:
        track = self._track(track_id)
        if rater_id not in track.served_to:
            raise PermissionDeniedError(f"track {track_id} was never served to this listener")
        return track

    # 2. feedback ----------------------------------------------------------------------------
    def rate(self, rating: Rating) -> None:
        self._keep(self.check_rating(rating))

    def check_rating(self, rating: Rating) -> Rating:
        """What :meth:`rate` would record (raising what it would raise), without recording it:
        for a caller that must store it elsewhere first."""
        if isinstance(rating.stars, bool) or not isinstance(rating.stars, int | np.integer):
            raise ValidationError("stars must be an integer")
        if not MIN_STARS <= rating.stars <= MAX_STARS:
            raise ValidationError(f"stars must lie in {MIN_STARS}–{MAX_STARS}")
        if not math.isfinite(rating.submitted_at):
            raise ValidationError("submitted_at must be finite")
        self._served(rating.track_id, rating.rater_id)
        key = (rating.track_id, rating.rater_id)
        if key in self._ratings:
            raise ConflictError("this listener already rated this track")
        return Rating(rating.track_id, rating.rater_id, int(rating.stars), rating.submitted_at)

    def _keep(self, rating: Rating) -> None:
        self._ratings[(rating.track_id, rating.rater_id)] = rating
        self._stars_by_rater.setdefault(rating.rater_id, []).append(rating.stars)

    def listen(self, event: ListenEvent) -> None:
        self.check_listen(event)
        key = (event.track_id, event.rater_id)
        self._listens[key] = event
        self._observed.pop(key, None)

    def check_listen(self, event: ListenEvent) -> None:
        """Raise what :meth:`listen` would raise for ``event``, without recording it."""
        times = (event.seconds_listened, event.clip_seconds, event.submitted_at)
        if not all(math.isfinite(t) for t in times):
            raise ValidationError("times must be finite")
        if event.seconds_listened < 0 or event.clip_seconds <= 0:
            raise ValidationError("seconds listened must be ≥ 0 and the clip length > 0")
        if event.seconds_listened > event.clip_seconds + self.tolerance_s:
            raise ValidationError("listened longer than the clip")
        track = self._served(event.track_id, event.rater_id)
        if abs(event.clip_seconds - track.clip_seconds) > self.tolerance_s:
            raise ValidationError("clip length disagrees with the served track")
        key = (event.track_id, event.rater_id)
        if key in self._listens:
            raise ConflictError("this listener already reported listening to this track")

    # 3. reading -----------------------------------------------------------------------------
    def observations(self) -> list[Observation]:
        """Every accepted rating, joined with its listen event and provenance, in time order."""
        observed = self._observed
        out = []
        for key, r in self._ratings.items():
            o = observed.get(key)
            if o is None:
                o = observed[key] = self._observe(key, r)
            out.append(o)
        out.sort(key=lambda o: (o.submitted_at, o.rater_id, o.track_id))
        return out

    def _observe(self, key: tuple[str, str], r: Rating) -> Observation:
        track_id, rater_id = key
        track = self._tracks[track_id]
        listen = self._listens.get(key)
        return Observation(
            track_id=track_id,
            rater_id=rater_id,
            stars=r.stars,
            submitted_at=r.submitted_at,
            seconds_listened=min(listen.seconds_listened, track.clip_seconds) if listen else 0.0,
            clip_seconds=track.clip_seconds,
            kind=track.provenance.kind,
            input_key=track.provenance.input_key,
            baseline_sample_id=track.provenance.baseline_sample_id,
        )

    def rating_count(self, track_id: str) -> int:
        """Accepted ratings of one track: O(listeners it was served to), not O(ledger)."""
        track = self._track(track_id)
        return sum((track_id, rater) in self._ratings for rater in track.served_to)

    def rater_stars(self, rater_id: str) -> list[int]:
        """The stars of one rater's accepted ratings, in the order accepted: O(theirs)."""
        return list(self._stars_by_rater.get(rater_id, ()))

    def provenances(self) -> list[TrackProvenance]:
        return [t.provenance for t in self._tracks.values()]

    # 4. persistence (a cache; the event log rebuilds it) ------------------------------------
    def snapshot(self) -> bytes:
        return json.dumps(
            {
                "tolerance_s": self.tolerance_s,
                "tracks": [
                    {
                        "provenance": t.provenance.to_json(),
                        "clip_seconds": t.clip_seconds,
                        "served_to": t.served_to,
                    }
                    for t in self._tracks.values()
                ],
                "ratings": [asdict(r) for r in self._ratings.values()],
                "listens": [asdict(e) for e in self._listens.values()],
            },
            sort_keys=True,
        ).encode()

    def save(self, store: KeyValueStore, key: str = "loop:feedback-ledger") -> None:
        """Cache the snapshot in the key-value port (Redis in production)."""
        store.set(key, self.snapshot().decode())

    @classmethod
    def load(cls, store: KeyValueStore, key: str = "loop:feedback-ledger") -> FeedbackLedger:
        """The cached ledger, or an empty one when nothing is cached (rebuild from the log)."""
        data = store.get(key)
        return cls() if data is None else cls.restore(data.encode())

    @classmethod
    def restore(cls, data: bytes) -> FeedbackLedger:
        raw = json.loads(data)
        ledger = cls(tolerance_s=raw["tolerance_s"])
        for t in raw["tracks"]:
            prov = TrackProvenance.from_json(t["provenance"])
            ledger._tracks[prov.track_id] = _ServedTrack(prov, t["clip_seconds"], t["served_to"])
        for r in raw["ratings"]:
            ledger._keep(Rating(**r))
        for e in raw["listens"]:
            ledger._listens[(e["track_id"], e["rater_id"])] = ListenEvent(**e)
        return ledger


@dataclass(frozen=True, slots=True)
class RaterScale:
    """A rater's shrunk location and spread: m̃_r, s̃_r."""

    mean: float
    std: float
    n: int


class RaterNormaliser:
    """Per-rater z-scores, shrunk toward the population when a rater has few ratings.

    With n_r ratings of mean m_r and variance v_r, population mean μ and pooled within-rater
    variance σ²:
        m̃_r = (n_r·m_r + k·μ) / (n_r + k)       a new rater is presumed typical
        s̃²_r = (n_r·v_r + k·σ²) / (n_r + k)     and equally spread
        x̂ = μ + σ·(x − m̃_r)/s̃_r                back on the star scale, bias removed
    ``k`` (pseudo-ratings of prior) defaults to 3: after 3 ratings a rater's own scale weighs half.
    """

    def __init__(self, prior_strength: float = 3.0, min_std: float = 0.25) -> None:
        self.prior_strength = prior_strength
        self.min_std = min_std  # a constant rater must not divide by ~0
        self.mu = 3.0
        self.sigma = 1.0
        self.scales: dict[str, RaterScale] = {}

    def fit(
        self, observations: Iterable[Observation], weights: dict[str, float] | None = None
    ) -> RaterNormaliser:
        by_rater: dict[str, list[int]] = defaultdict(list)
        for o in observations:
            if weights is None or weights.get(o.rater_id, 1.0) > 0:
                by_rater[o.rater_id].append(o.stars)
        all_stars = np.array([s for v in by_rater.values() for s in v], dtype=float)
        if all_stars.size:
            self.mu = float(all_stars.mean())
        # σ² = pooled within-rater variance: the spread of one rater's stars, leniency excluded
        ss = sum(float(((np.asarray(v) - np.mean(v)) ** 2).sum()) for v in by_rater.values())
        dof = sum(len(v) - 1 for v in by_rater.values())
        if dof > 0:
            self.sigma = max(math.sqrt(ss / dof), self.min_std)
        k = self.prior_strength
        self.scales = {}
        for rater, stars in by_rater.items():
            x = np.asarray(stars, dtype=float)
            n = x.size
            v = float(x.var()) if n > 1 else 0.0
            m = (n * float(x.mean()) + k * self.mu) / (n + k)
            s2 = (n * v + k * self.sigma**2) / (n + k)
            self.scales[rater] = RaterScale(m, max(math.sqrt(s2), self.min_std), n)
        return self

    def normalise(self, rater_id: str, stars: float) -> float:
        scale = self.scales.get(rater_id, RaterScale(self.mu, self.sigma, 0))
        return self.mu + self.sigma * (stars - scale.mean) / scale.std

    def normalise_all(self, observations: Sequence[Observation]) -> np.ndarray:
        """``normalise`` of every observation, as one array operation."""
        default = RaterScale(self.mu, self.sigma, 0)
        scales = [self.scales.get(o.rater_id, default) for o in observations]
        stars = np.fromiter((o.stars for o in observations), dtype=float, count=len(scales))
        mean = np.fromiter((sc.mean for sc in scales), dtype=float, count=len(scales))
        std = np.fromiter((sc.std for sc in scales), dtype=float, count=len(scales))
        return self.mu + self.sigma * (stars - mean) / std
