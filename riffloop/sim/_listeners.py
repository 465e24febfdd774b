"""Simulated listeners, a plug-in: ``--listeners package.module:factory``.

``factory(n, spam_share, seed) -> list[Listener]``. A listener sees only what a real client
gets — a track id and decoded audio (mono float32, its sample rate) — and answers with a
``ListenOutcome``: a rating 1–5 or None, the seconds it claims to have listened, and the
wall-clock seconds it actually took (a human needs at least the listening time; a bot does not).
See docs/LISTENERS.md.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from riffloop.core import ValidationError


@dataclass(frozen=True, slots=True)
class ListenOutcome:
    rating: int | None
    seconds_listened: float
    elapsed_seconds: float


@runtime_checkable
class Listener(Protocol):
    listener_id: str

    def listen(self, track_id: str, audio: np.ndarray, sample_rate: int) -> ListenOutcome: ...


ListenerFactory = Callable[[int, float, int], list[Listener]]


# 1. Features computed from the audio itself ---------------------------------------------------
FEATURES = ("brightness", "onset_rate", "loudness", "pitch")


@dataclass(frozen=True, slots=True)
class AudioFeatures:
    brightness: float  # log2 of the energy-weighted spectral centroid (Hz)
    onset_rate: float  # relative spectral-flux peaks per second
    loudness: float  # RMS level, dBFS
    pitch: float  # log2 of the median dominant frequency in 50–2,000 Hz

    def vector(self) -> np.ndarray:
        return np.array([self.brightness, self.onset_rate, self.loudness, self.pitch])


def audio_features(audio: np.ndarray, sample_rate: int) -> AudioFeatures:
    """STFT (1,024-point Hann, hop 256) features; silence-safe."""
    x = np.asarray(audio, dtype=np.float64).reshape(-1)
    n_fft, hop = 1024, 256
    if x.size < n_fft:
        x = np.pad(x, (0, n_fft - x.size))
    frames = np.lib.stride_tricks.sliding_window_view(x, n_fft)[::hop] * np.hanning(n_fft)
    mag = np.abs(np.fft.rfft(frames, axis=1))
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    energy = mag.sum(axis=1) + 1e-12
    centroid = float(((mag * freqs).sum(axis=1) / energy * energy).sum() / energy.sum())
    # relative spectral flux: the share of a frame's magnitude spectrum that is new, so a
    # steady tone (any level) has none and an onset from silence has ~1; onsets are its local
    # maxima above 0.1 (a tenth of the spectrum renewed)
    flux = np.maximum(np.diff(mag, axis=0), 0.0).sum(axis=1)
    rel = flux / (mag[1:].sum(axis=1) + 1e-9)
    peaks = 0
    if rel.size >= 3:
        mid = rel[1:-1]
        peaks = int(((mid > rel[:-2]) & (mid >= rel[2:]) & (mid > 0.1)).sum())
    seconds = max(x.size / sample_rate, 1e-3)
    rms = math.sqrt(float(np.mean(x**2)) + 1e-12)
    band = (freqs >= 50) & (freqs <= 2000)
    dominant = freqs[band][np.argmax(mag[:, band], axis=1)]
    return AudioFeatures(
        brightness=math.log2(max(centroid, 20.0)),
        onset_rate=peaks / seconds,
        loudness=20 * math.log10(rms),
        pitch=math.log2(float(np.median(dominant)) if dominant.size else 50.0),
    )


# 2. Honest listeners with hidden tastes -------------------------------------------------------
# Prior scale of each feature (mean, sd) before a listener has heard anything: a listener
# anchors on the first ``calibration_clips`` it hears (running mean/variance with this prior
# as two pseudo-clips), then keeps that scale, so ratings stay comparable across iterations.
_PRIOR_MEAN = np.array([math.log2(1500.0), 3.0, -25.0, math.log2(300.0)])
_PRIOR_SD = np.array([1.0, 2.0, 6.0, 1.0])

TASTE_FAMILIES: dict[str, np.ndarray] = {
    # weights over standardised (brightness, onset_rate, loudness, pitch)
    "bright_dense": np.array([1.0, 0.8, 0.2, 0.3]),
    "dark_sparse": np.array([-1.0, -0.8, -0.2, -0.3]),
}


class TasteListener:
    """u = w·f̃/‖w‖ over standardised features f̃; stars = round(3 + gain·u + bias + ε), ε ~ N(0,
    noise²); the listened fraction is sigmoid(1.5·u + 1 + η): liked clips are heard out, disliked
    ones skipped (a skip below 35 % leaves no rating 30 % of the time)."""

    kind = "honest"

    def __init__(
        self,
        listener_id: str,
        weights: np.ndarray,
        rng: np.random.Generator,
        noise: float = 0.6,
        gain: float = 1.2,
        bias: float = 0.0,
        calibration_clips: int = 16,
    ) -> None:
        self.listener_id = listener_id
        self.weights = np.asarray(weights, dtype=float)
        self.rng = rng
        self.noise = noise
        self.gain = gain
        self.bias = bias
        self.calibration_clips = calibration_clips
        self._n = 2.0
        self._mean = _PRIOR_MEAN.copy()
        self._m2 = 2.0 * _PRIOR_SD**2
        self._heard = 0

    def utility(self, audio: np.ndarray, sample_rate: int, learn: bool = False) -> float:
        """The hidden liking u of a clip (``learn``: let it move the listener's anchor)."""
        return self.liking(audio_features(audio, sample_rate), learn=learn)

    def liking(self, features: AudioFeatures, learn: bool = False) -> float:
        """u from precomputed features (the demo's evaluation uses it; the loop never does)."""
        f = features.vector()
        if learn and self._heard < self.calibration_clips:
            self._heard += 1
            self._n += 1
            delta = f - self._mean
            self._mean += delta / self._n
            self._m2 += delta * (f - self._mean)
        sd = np.sqrt(self._m2 / self._n)
        z = (f - self._mean) / np.maximum(sd, 1e-6)
        return float(self.weights @ z / np.linalg.norm(self.weights))

    def listen(self, track_id: str, audio: np.ndarray, sample_rate: int) -> ListenOutcome:
        u = self.utility(audio, sample_rate, learn=True)
        return honest_answer(
            u, audio.size / sample_rate, self.rng, self.gain, self.bias, self.noise
        )


def honest_answer(
    u: float, clip_seconds: float, rng: np.random.Generator, gain: float, bias: float, noise: float
) -> ListenOutcome:
    """An honest listener's answer to a clip it likes by u (standardised, ≈ N(0, 1) over what it
    hears): listened fraction sigmoid(1.5·u + 1 + η), η ~ N(0, 0.5²); 1–4 s to judge and click;
    stars = round(3 + gain·u + bias + ε), ε ~ N(0, noise²), clipped to 1–5; a skip below 35 %
    leaves no rating 30 % of the time."""
    frac = 1.0 / (1.0 + math.exp(-(1.5 * u + 1.0 + rng.normal(0, 0.5))))
    seconds = clip_seconds * frac
    think = float(rng.uniform(1.0, 4.0))
    stars = int(np.clip(np.rint(3 + gain * u + bias + rng.normal(0, noise)), 1, 5))
    # drawn on every call, skipped or not, so a listener consumes the same random numbers
    # whatever it heard: two arms replaying one listener stay paired draw for draw
    unrated = rng.random() < 0.3
    rating: int | None = None if frac < 0.35 and unrated else stars
    return ListenOutcome(rating, seconds, seconds + think)


# 3. Spammers and bots -------------------------------------------------------------------------
class _Bot:
    kind = "bot"

    def __init__(self, listener_id: str, rng: np.random.Generator) -> None:
        self.listener_id = listener_id
        self.rng = rng


class ConstantBot(_Bot):
    """Always the same star, listening a plausible while."""

    kind = "constant"

    def __init__(self, listener_id: str, rng: np.random.Generator) -> None:
        super().__init__(listener_id, rng)
        self.stars = int(rng.integers(3, 6))

    def listen(self, track_id: str, audio: np.ndarray, sample_rate: int) -> ListenOutcome:
        s = audio.size / sample_rate * float(self.rng.uniform(0.5, 1.0))
        return ListenOutcome(self.stars, s, s + float(self.rng.uniform(1.0, 3.0)))


class RandomBot(_Bot):
    """Uniform stars, plausible listening: only agreement with others can expose it."""

    kind = "random"

    def listen(self, track_id: str, audio: np.ndarray, sample_rate: int) -> ListenOutcome:
        s = audio.size / sample_rate * float(self.rng.uniform(0.4, 1.0))
        return ListenOutcome(int(self.rng.integers(1, 6)), s, s + float(self.rng.uniform(1.0, 3.0)))


class ZeroListenBot(_Bot):
    """Rates without playing (generous stars, 0 s listened)."""

    kind = "zero_listen"

    def listen(self, track_id: str, audio: np.ndarray, sample_rate: int) -> ListenOutcome:
        return ListenOutcome(int(self.rng.integers(3, 6)), 0.0, float(self.rng.uniform(0.5, 2.0)))


class BurstBot(_Bot):
    """Claims to hear every clip out but submits every 50 ms."""

    kind = "burst"

    def listen(self, track_id: str, audio: np.ndarray, sample_rate: int) -> ListenOutcome:
        return ListenOutcome(int(self.rng.integers(1, 6)), audio.size / sample_rate, 0.05)


_BOTS = (ConstantBot, RandomBot, ZeroListenBot, BurstBot)


def taste_population(family: str, n: int, spam_share: float, seed: int) -> list[Listener]:
    """``n`` listeners: round(n·spam_share) bots (the four kinds in turn), the rest honest with
    the family's taste, each jittered (sd 0.25 per weight), a personal leniency (sd 0.4) and
    noise sd drawn in [0.4, 0.8]."""
    if family not in TASTE_FAMILIES:
        raise ValidationError(f"unknown taste family {family!r}: {sorted(TASTE_FAMILIES)}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7_311]))

    def honest(listener_id: str, child: np.random.Generator) -> Listener:
        w = TASTE_FAMILIES[family] + child.normal(0, 0.25, size=len(FEATURES))
        return TasteListener(
            listener_id,
            w,
            child,
            noise=float(child.uniform(0.4, 0.8)),
            bias=float(child.normal(0, 0.4)),
        )

    return mixed_population(family, n, spam_share, rng, honest)


def mixed_population(
    prefix: str,
    n: int,
    spam_share: float,
    rng: np.random.Generator,
    honest: Callable[[str, np.random.Generator], Listener],
) -> list[Listener]:
    """``n`` listeners ``<prefix>-L000…``, each with a generator of its own drawn from ``rng``:
    the first round(n·spam_share) are bots (the four kinds in turn), the rest ``honest(id,
    generator)``; the list is then shuffled by ``rng`` so that bots are not the first ids."""
    if not 0.0 <= spam_share < 1.0 or n < 1:
        raise ValidationError("need n ≥ 1 and 0 ≤ spam_share < 1")
    n_spam = round(n * spam_share)
    out: list[Listener] = []
    for i in range(n):
        child = np.random.default_rng(rng.integers(0, 2**63))
        listener_id = f"{prefix}-L{i:03d}"
        out.append(
            _BOTS[i % len(_BOTS)](listener_id, child) if i < n_spam else honest(listener_id, child)
        )
    order = rng.permutation(n)
    return [out[i] for i in order]


def bright_dense_listeners(n: int, spam_share: float, seed: int) -> list[Listener]:
    """Listeners who like bright, busy clips."""
    return taste_population("bright_dense", n, spam_share, seed)


def dark_sparse_listeners(n: int, spam_share: float, seed: int) -> list[Listener]:
    """Listeners who like dark, sparse clips (the opposite taste)."""
    return taste_population("dark_sparse", n, spam_share, seed)


def make_population(
    factory: ListenerFactory, n: int, spam_share: float, seed: int
) -> list[Listener]:
    """Call a listener factory and check what it returned: ``n`` listeners with distinct ids.

    The factory is a plug-in (``--listeners``), so its failures are a ``ValidationError`` naming
    it, not a traceback from inside the demo."""
    name = getattr(factory, "__qualname__", repr(factory))
    try:
        listeners = list(factory(n, spam_share, seed))
    except Exception as exc:
        raise ValidationError(
            f"listener factory {name}(n={n}, spam_share={spam_share}, seed={seed}) failed: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if len(listeners) != n:
        raise ValidationError(
            f"listener factory {name} returned {len(listeners)} listeners, not {n}"
        )
    ids = []
    for x in listeners:
        lid = getattr(x, "listener_id", None)
        if not isinstance(lid, str) or not lid or not callable(getattr(x, "listen", None)):
            raise ValidationError(
                f"listener factory {name} returned {x!r}: a listener needs a non-empty str "
                "listener_id and a listen(track_id, audio, sample_rate) method (docs/LISTENERS.md)"
            )
        ids.append(lid)
    if len(set(ids)) != len(ids):
        raise ValidationError(f"listener factory {name} returned duplicate listener ids")
    return listeners


def checked_answer(out: object, clip_seconds: float) -> tuple[int | None, float, float]:
    """One listener's answer as (stars or None, seconds listened ≤ the clip, elapsed seconds).

    Raises ``ValidationError`` for what the gateway would refuse from a client: stars that are
    not a whole number 1–5, and times that are not finite or are negative. Seconds listened
    beyond the clip are clipped to it (a client's timer overshoots; the gateway tolerates it).
    """
    fields = ("rating", "seconds_listened", "elapsed_seconds")
    if not all(hasattr(out, f) for f in fields):  # ours, or any object with the three fields
        raise ValidationError(f"answer {out!r} lacks {', '.join(fields)} (a ListenOutcome)")
    stars = out.rating  # type: ignore[attr-defined]
    if stars is not None:
        if isinstance(stars, bool) or not isinstance(stars, int | float | np.number):
            raise ValidationError(f"rating {stars!r} is not a number")
        if not (math.isfinite(stars) and float(stars).is_integer() and 1 <= stars <= 5):
            raise ValidationError(f"rating {stars!r} is not a whole number of stars 1–5")
        stars = int(stars)
    times = {f: getattr(out, f) for f in fields[1:]}
    for field_name, value in times.items():
        if isinstance(value, bool) or not isinstance(value, int | float | np.number):
            raise ValidationError(f"{field_name} {value!r} is not a number")
        if not (math.isfinite(value) and value >= 0):
            raise ValidationError(f"{field_name} {value!r} is not a finite number ≥ 0")
    return (
        stars,
        min(float(times["seconds_listened"]), clip_seconds),
        float(times["elapsed_seconds"]),
    )


def load_listener_factory(spec: str) -> ListenerFactory:
    """``package.module:factory`` → the callable; a bad spec is a ``ValidationError``."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValidationError(f"listener factory must be 'package.module:factory', got {spec!r}")
    if module_name == "riffloop.loop" or module_name.startswith("riffloop.loop."):
        # the domain package holds the loop's rules only; populations are simulation
        raise ValidationError(
            f"{spec!r}: listener populations live in riffloop.sim, not riffloop.loop "
            f"(use 'riffloop.sim:{attr}')"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValidationError(f"cannot import listener module {module_name!r}: {exc}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValidationError(f"{spec!r} is not a callable factory")
    return factory  # type: ignore[no-any-return]
