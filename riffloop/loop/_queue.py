"""The listening queue's rules: which track a listener hears next (design.md §8).

The paper's quality control needs several independent ratings per track, and a track heard only
by the user who asked for it gets one. So every ready track — generation ẑ or baseline z0, made
for anyone's inputs — also enters a shared queue that any signed-in listener draws from, blind,
until it has been served to ``target_listeners`` listeners or grows stale. The rules:

1. A listener never draws a track they have heard (their own requests included).
2. The kind is drawn first, Bernoulli(baseline_share) → a baseline, so the 25/75 share holds in
   what each listener hears even when the queue's mix drifts; if no track of that kind is
   waiting, the other kind is served.
3. Within the kind, the track served to the fewest listeners so far, oldest first on ties, so
   ratings spread evenly and no track starves.
4. With probability ``probe_share`` (1 in 25 by default) a baseline the listener has already
   rated comes back under a new id: a consistency probe. The spam filter compares the two
   ratings of the same z0 (same ``baseline_sample_id``); an honest listener gives about the
   same stars twice, a random rater does not.

Only tracks are ever served: a baseline is a window of the model's training data and a
generation is new, so no listener receives another user's upload. This module holds only the
rules; the gateway keeps the state (riffloop key-value store, rebuilt from tracks.ready.v1).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from riffloop.core import ValidationError
from riffloop.loop._provenance import TrackKind

__all__ = ["QueuePolicy", "QueuedTrack", "choose_next_track"]


@dataclass(frozen=True)
class QueuePolicy:
    """How the queue spreads tracks over listeners."""

    # A track leaves the queue once served to this many listeners (its requester not counted):
    # 8–12 independent raters make ω's shrinkage estimable and the spam checks comparable.
    target_listeners: int = 10
    # ... or once it has waited this long (a stale track says little about the current model).
    max_age_s: float = 7 * 24 * 3600.0
    # Bernoulli p of serving a baseline, as the generator's dispatch.
    baseline_share: float = 0.25
    # Share of draws that re-serve a rated baseline as a consistency probe.
    probe_share: float = 0.04

    def __post_init__(self) -> None:
        if not 1 <= self.target_listeners <= 1000:
            raise ValidationError("target_listeners must lie in 1–1000")
        if not (math.isfinite(self.max_age_s) and self.max_age_s > 0):
            raise ValidationError("max_age_s must be positive")
        for name in ("baseline_share", "probe_share"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValidationError(f"{name} must be a probability")

    def is_open(self, track: QueuedTrack, now_s: float) -> bool:
        """Still in the queue: served to fewer than the target and not stale."""
        return track.served < self.target_listeners and now_s - track.ready_at < self.max_age_s


@dataclass(frozen=True)
class QueuedTrack:
    """A ready track waiting in the queue (its kind is the server's secret, never a client's)."""

    track_id: str
    kind: TrackKind
    owner: str
    ready_at: float
    served: int = 0  # listeners it has been served to through the queue


def choose_next_track(
    policy: QueuePolicy,
    waiting: Iterable[QueuedTrack],
    listener: str,
    heard: Collection[str],
    u: float,
    now_s: float,
) -> QueuedTrack | None:
    """The track ``listener`` hears next (rules 1–3), or None when nothing is left for them.

    ``u`` is a uniform draw in [0, 1) that decides the kind (rule 2); ``heard`` holds the ids
    of every track already served to the listener."""
    if not 0.0 <= u < 1.0:
        raise ValidationError("u must be a uniform draw in [0, 1)")
    wanted = TrackKind.BASELINE if u < policy.baseline_share else TrackKind.GENERATED
    best: dict[TrackKind, QueuedTrack] = {}
    for track in waiting:
        if track.owner == listener or track.track_id in heard:
            continue
        if not policy.is_open(track, now_s):
            continue
        current = best.get(track.kind)
        if current is None or (track.served, track.ready_at, track.track_id) < (
            current.served,
            current.ready_at,
            current.track_id,
        ):
            best[track.kind] = track
    return best.get(wanted) or next(iter(best.values()), None)
