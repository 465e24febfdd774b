"""Blind dispatch: per request, Bernoulli(p) → the baseline z0, else a fresh generation ẑ.

The draw is a pure function of (seed, request id), not of arrival order, so any number of
generator replicas agree on it and a replay of the request log reproduces every track.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np

from riffloop.core import ValidationError
from riffloop.loop._provenance import TrackKind, TrackProvenance


def _stream(seed: int, *parts: str) -> np.random.Generator:
    """An independent random stream keyed by (seed, parts): sha256 → SeedSequence entropy."""
    digest = hashlib.sha256("\x1f".join((str(seed), *parts)).encode()).digest()
    return np.random.default_rng(np.random.SeedSequence(int.from_bytes(digest[:16], "big")))


class Dispatcher:
    """Decides, blind to the listener, whether a request is answered by z0 or by a generation.

    ``baseline_share`` is the Bernoulli p (the paper serves the baseline 25 % of the time so that
    every input has a reference rated by the same people under the same conditions).
    """

    def __init__(self, baseline_share: float = 0.25, seed: int = 0) -> None:
        if not 0.0 <= baseline_share <= 1.0:
            raise ValidationError("baseline_share must be a probability")
        self.baseline_share = baseline_share
        self.seed = seed

    def kind_for(self, request_id: str) -> TrackKind:
        u = _stream(self.seed, "dispatch", request_id).random()
        return TrackKind.BASELINE if u < self.baseline_share else TrackKind.GENERATED

    def track_id_for(self, request_id: str) -> str:
        """Opaque id: reveals neither the kind nor the request (the listener stays blind)."""
        return hashlib.sha256(f"{self.seed}\x1ftrack\x1f{request_id}".encode()).hexdigest()[:20]

    def generation_seed_for(self, request_id: str) -> int:
        return int(_stream(self.seed, "generation-seed", request_id).integers(0, 2**31 - 1))

    def dispatch(
        self,
        request_id: str,
        input_song_ids: Sequence[str],
        similarity: float,
        quality: int,
        model_version: str,
        start_step: int,
        nearest_baseline: Callable[[], str],
    ) -> TrackProvenance:
        """One track's provenance. ``nearest_baseline()`` returns the id of argmax_z Γ(z_agg, z);
        it is called for both kinds so a generation also records the reference it competes with."""
        kind = self.kind_for(request_id)
        return TrackProvenance(
            track_id=self.track_id_for(request_id),
            kind=kind,
            model_version=model_version,
            input_song_ids=tuple(input_song_ids),
            seed=self.generation_seed_for(request_id),
            similarity=similarity,
            quality=quality,
            start_step=start_step if kind is TrackKind.GENERATED else None,
            baseline_sample_id=nearest_baseline(),
        )
