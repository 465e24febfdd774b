"""Blind dispatch: per request, Bernoulli(p) → the baseline z0, else a fresh generation ẑ.

The draw is a pure function of (key, request id), not of arrival order, so any number of
generator replicas agree on it and a replay of the request log reproduces every track.

The key is a secret (RIFFLOOP_DISPATCH_KEY in the services): every derived value is
HMAC-SHA256(key, …), so a client that knows its request id, its track id and this code still
cannot tell whether its track is the baseline. With a guessable key (the old integer seed 0)
it could, and the paper's comparison would no longer be blind.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import random
import threading
from collections.abc import Callable, Sequence

import numpy as np

from riffloop.core import ValidationError
from riffloop.loop._provenance import TrackKind, TrackProvenance


def _key_bytes(key: str | bytes | int) -> bytes:
    return key if isinstance(key, bytes) else str(key).encode()


def _mac(key: bytes, *parts: str) -> bytes:
    return hmac.new(key, "\x1f".join(parts).encode(), hashlib.sha256).digest()


def _stream(key: bytes, *parts: str) -> np.random.Generator:
    """An independent random stream keyed by (key, parts): HMAC → SeedSequence entropy."""
    digest = _mac(key, *parts)
    return np.random.default_rng(np.random.SeedSequence(int.from_bytes(digest[:16], "big")))


class Dispatcher:
    """Decides, blind to the listener, whether a request is answered by z0 or by a generation.

    ``baseline_share`` is the Bernoulli p (the paper serves the baseline 25 % of the time so that
    every input has a reference rated by the same people under the same conditions).
    """

    def __init__(self, baseline_share: float = 0.25, *, key: str | bytes | int) -> None:
        """``key``: the secret every draw is derived from. Services pass the dispatch key
        (``effective_dispatch_key()`` of their settings); simulations and tests may pass any
        value, an int seed included, since their listeners never see the code or the ids.
        There is no default: a fixed key would let a client compute the kind."""
        if not 0.0 <= baseline_share <= 1.0:
            raise ValidationError("baseline_share must be a probability")
        self.baseline_share = baseline_share
        self._key = _key_bytes(key)

    def kind_for(self, request_id: str) -> TrackKind:
        u = _stream(self._key, "dispatch", request_id).random()
        return TrackKind.BASELINE if u < self.baseline_share else TrackKind.GENERATED

    def request_id_for(self, user_id: str, client_key: str) -> str:
        """The request id of a client's idempotency key: 32 hex under the key, so a retry
        (or a paired deployment sharing the key) meets the same request, draw and seed."""
        return _mac(self._key, "request", user_id, client_key).hex()[:32]

    def track_id_for(self, request_id: str) -> str:
        """Opaque id: reveals neither the kind nor the request (the listener stays blind)."""
        return self.opaque_id("track", request_id)

    def opaque_id(self, *parts: str) -> str:
        """A 20-hex id derived from ``parts`` under the key: every id a client receives (a
        track's, a consistency probe's) has this one form, so no id tells one kind of track
        from another."""
        return _mac(self._key, *parts).hex()[:20]

    def generation_seed_for(self, request_id: str) -> int:
        return int(_stream(self._key, "generation-seed", request_id).integers(0, 2**31 - 1))

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


class ReadyDelay:
    """Baselines become ready after the same delay distribution as generations.

    A baseline z0 is a stored window: it needs no denoising, so served as soon as it is made it
    would be ready seconds before a generation of the same request, and a client timing its
    tracks could tell the kinds apart. The generator records how long each generation took
    (per cost key: the denoising steps run and the windows made) and holds a baseline until a
    duration drawn from the recent generations of the same cost has passed. With no generation
    of that cost recorded yet, ``draw`` returns None and the generator runs the generation
    anyway (and discards it), which also records the first duration. Draws come from the
    operating system's random source, unseen by clients.
    """

    def __init__(self, window: int = 64) -> None:
        if window < 1:
            raise ValidationError("window must be ≥ 1")
        self.window = window
        self._seconds: dict[tuple[int, ...], list[float]] = {}
        self._lock = threading.Lock()
        self._draws = random.SystemRandom()

    def record(self, cost: tuple[int, ...], seconds: float) -> None:
        """Note how long a generation of this cost took (its recent ``window`` are kept)."""
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValidationError("a generation's duration must be a finite number ≥ 0")
        with self._lock:
            recent = self._seconds.setdefault(cost, [])
            recent.append(seconds)
            del recent[: -self.window]

    def draw(self, cost: tuple[int, ...]) -> float | None:
        """A duration from the recent generations of this cost, or None if none is known."""
        with self._lock:
            recent = self._seconds.get(cost)
            return self._draws.choice(recent) if recent else None
