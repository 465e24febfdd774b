"""A population built to resist tuning: each seed draws its own random taste direction over an
audio embedding (``--listeners riffloop.sim:random_taste_listeners``, docs/LISTENERS.md).

The bright/dense and dark/sparse families like one fixed direction over four named features, so
a loop, a selector or a person could fit that direction once and please every seed. Here the
direction is drawn per seed in a whitened embedding space of ``rank`` dimensions: two seeds'
likings of a clip correlate by the cosine of their directions, ≈ N(0, 1/rank) — with rank 16,
what pleases one seed tells little about another.

1. Clip vector e (what the population hears in a clip). With the trained ``AudioEmbedding``
   (assets/quality-embedding), the mean of its features over the clip's mel windows of the
   embedding's image size (64 × 64: 22,050 Hz, hop 512, ≈ 1.49 s per window). Without it, the
   mel statistics of design.md §7 over the same windows: per mel band, the mean and the standard
   deviation over time of the image in [−1, 1] (2 × 64 numbers). A clip at another rate is
   resampled to 22,050 Hz; one shorter than a window is padded with silence.
2. Whitened space. The population anchors on the first ``calibration_clips`` distinct clips any
   of its listeners hears (shared, as a crowd shares what it has heard): with their mean μ and
   principal axes v_k (sd s_k), the coordinates are w_k = v_kᵀ(e − μ) / s_k for the top
   ``rank`` axes (fewer while fewer clips are in: at most one less than the clips, and only
   axes with s_k ≥ 1 % of s_1). Then frozen, so ratings stay comparable across iterations.
3. Taste. The seed's unit direction d ~ uniform on the sphere in ``rank`` dimensions; listener l
   likes by a_l = d + N(0, (jitter²/rank)·I) (‖a_l − d‖ ≈ jitter). Liking u_l = a_l·w / ‖a_l‖
   over the axes known so far: sd ≈ 1 over the calibration clips.
4. Answer: ``honest_answer`` — stars = round(3 + 1.2·u + leniency + ε), listening time
   following u — exactly as a ``TasteListener``; bots as in every population.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
import torchaudio

from riffloop.core import NotFoundError, ValidationError
from riffloop.music import AudioEmbedding, MelCodec, MelConfig
from riffloop.sim._listeners import (
    Listener,
    ListenOutcome,
    honest_answer,
    mixed_population,
)

RANK = 16  # taste dimensions: two seeds' likings correlate ≈ N(0, 1/16), sd 0.25
CALIBRATION_CLIPS = 48  # distinct clips that fix μ and the axes (≥ 3 × RANK)
JITTER = 0.4  # ‖a_l − d‖: cos(a_l, d) ≈ 0.93, listeners of one seed agree
_MIN_AXIS_SD = 0.01  # axes with s_k < 1 % of s_1 carry no audible difference: not whitened
_SAMPLE_RATE = MelConfig().sample_rate  # 22,050 Hz, the embedding's and the base model's
_CACHE_CLIPS = 4096  # clip vectors kept per process (a clip is heard by many listeners)


class ClipVector:
    """Audio → e, the clip vector of step 1. Immutable and shared: it is not copied with the
    listeners (``copy.deepcopy`` returns it), so two arms do not hold two embedding networks."""

    def __init__(self, embedding: AudioEmbedding | None) -> None:
        self.embedding = embedding
        if embedding is None:
            mel = MelConfig()  # 64 × 64, the base model's image
            self.name = "mel statistics (per-band mean and sd, 64 × 64 windows)"
        else:
            height, width = embedding.image_size
            mel = MelConfig(n_mels=height, x_res=width)
            self.name = f"AudioEmbedding ({embedding.dim}-d, {height} × {width} windows)"
        self.codec = MelCodec(mel)
        self._cache: OrderedDict[bytes, np.ndarray] = OrderedDict()

    def __deepcopy__(self, memo: dict[int, Any]) -> ClipVector:
        return self

    @property
    def dim(self) -> int:
        if self.embedding is not None:
            return self.embedding.dim
        return 2 * self.codec.config.n_mels

    def __call__(self, audio: np.ndarray, sample_rate: int) -> tuple[bytes, np.ndarray]:
        """(the clip's digest, e): the digest tells a clip heard again from a new one."""
        x = np.ascontiguousarray(np.asarray(audio, dtype=np.float32).reshape(-1))
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate < 1:
            raise ValidationError(f"sample_rate must be a positive integer, got {sample_rate!r}")
        if not np.all(np.isfinite(x)):
            raise ValidationError("audio contains NaN or infinity")
        key = hashlib.blake2b(x.tobytes(), digest_size=16, person=b"riffloop-taste").digest()
        key += sample_rate.to_bytes(4, "little")
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return key, cached
        samples = torch.from_numpy(x)
        if sample_rate != _SAMPLE_RATE:
            samples = torchaudio.functional.resample(samples, sample_rate, _SAMPLE_RATE)
        window = self.codec.config.slice_samples
        if samples.numel() < window:
            samples = torch.nn.functional.pad(samples, (0, window - samples.numel()))
        images = self.codec.audio_to_images(samples)  # [N, 1, H, W] in [−1, 1]
        if self.embedding is not None:
            e = self.embedding.embed(images).numpy().mean(axis=0)
        else:
            x_img = images[:, 0].to(torch.float64)  # [N, mels, time]
            e = torch.cat([x_img.mean(dim=2), x_img.std(dim=2)], dim=1).numpy().mean(axis=0)
        e = np.asarray(e, dtype=np.float64)
        self._cache[key] = e
        if len(self._cache) > _CACHE_CLIPS:
            self._cache.popitem(last=False)
        return key, e


@functools.cache
def default_clip_vector() -> ClipVector:
    """The trained embedding when assets/quality-embedding holds one, else mel statistics."""
    try:
        return ClipVector(AudioEmbedding.load())
    except NotFoundError:
        return ClipVector(None)


class TasteSpace:
    """One population's whitened clip space (step 2) and its seed's direction d (step 3)."""

    def __init__(
        self,
        direction: np.ndarray,
        clip_vector: ClipVector,
        calibration_clips: int = CALIBRATION_CLIPS,
    ) -> None:
        d = np.asarray(direction, dtype=np.float64).reshape(-1)
        if d.size < 1 or not np.all(np.isfinite(d)) or np.linalg.norm(d) == 0:
            raise ValidationError("a taste direction needs finite, not all zero components")
        if calibration_clips < 3:
            raise ValidationError("calibration_clips must be ≥ 3")
        self.direction = d / np.linalg.norm(d)
        self.clip_vector = clip_vector
        self.calibration_clips = calibration_clips
        self._seen: set[bytes] = set()
        self._clips: list[np.ndarray] = []
        self._mean = np.zeros(clip_vector.dim)
        self._axes = np.zeros((clip_vector.dim, 0))  # v_k / s_k as columns

    @property
    def rank(self) -> int:
        return int(self.direction.size)

    @property
    def calibrated(self) -> bool:
        return len(self._clips) >= self.calibration_clips

    def coordinates(self, audio: np.ndarray, sample_rate: int, learn: bool = False) -> np.ndarray:
        """w of a clip over the axes known so far (``learn``: a new clip joins the anchor until
        it holds ``calibration_clips``)."""
        key, e = self.clip_vector(audio, sample_rate)
        if learn and not self.calibrated and key not in self._seen:
            self._seen.add(key)
            self._clips.append(e)
            self._fit()
        return np.asarray((e - self._mean) @ self._axes)

    def liking(
        self,
        audio: np.ndarray,
        sample_rate: int,
        direction: np.ndarray | None = None,
        learn: bool = False,
    ) -> float:
        """u = a·w / ‖a‖ over the known axes (a: a listener's direction; default the seed's d).
        0 before the anchor has an axis."""
        a = self.direction if direction is None else np.asarray(direction, dtype=np.float64)
        w = self.coordinates(audio, sample_rate, learn=learn)
        head = a[: w.size]
        norm = float(np.linalg.norm(head))
        return float(head @ w / norm) if w.size and norm > 0 else 0.0

    def _fit(self) -> None:
        x = np.stack(self._clips)
        self._mean = x.mean(axis=0)
        if len(x) < 2:
            return
        _, s, vt = np.linalg.svd(x - self._mean, full_matrices=False)
        sd = s / math.sqrt(len(x) - 1)
        keep = min(self.rank, len(x) - 1, int((sd >= _MIN_AXIS_SD * sd[0]).sum()))
        if sd[0] <= 0:
            keep = 0
        v = vt[:keep].T  # [dim, keep]
        # an axis's sign is arbitrary in the SVD: fix it (largest loading positive) so that the
        # seed's d means one taste whatever the solver
        signs = np.sign(v[np.abs(v).argmax(axis=0), np.arange(keep)])
        self._axes = v * np.where(signs == 0, 1.0, signs) / sd[:keep]


class RandomTasteListener:
    """An honest listener of a random-taste population: liking u over the population's
    ``TasteSpace`` along its own direction a_l, answered as a ``TasteListener`` answers."""

    kind = "honest"

    def __init__(
        self,
        listener_id: str,
        space: TasteSpace,
        direction: np.ndarray,
        rng: np.random.Generator,
        noise: float = 0.6,
        gain: float = 1.2,
        bias: float = 0.0,
    ) -> None:
        self.listener_id = listener_id
        self.space = space
        self.direction = np.asarray(direction, dtype=np.float64)
        if self.direction.shape != (space.rank,):
            raise ValidationError(f"a listener's direction needs {space.rank} components")
        self.rng = rng
        self.noise = noise
        self.gain = gain
        self.bias = bias

    def utility(self, audio: np.ndarray, sample_rate: int, learn: bool = False) -> float:
        return self.space.liking(audio, sample_rate, self.direction, learn=learn)

    def listen(self, track_id: str, audio: np.ndarray, sample_rate: int) -> ListenOutcome:
        u = self.utility(audio, sample_rate, learn=True)
        return honest_answer(
            u, audio.size / sample_rate, self.rng, self.gain, self.bias, self.noise
        )


def random_taste_listeners(n: int, spam_share: float, seed: int) -> list[Listener]:
    """``n`` listeners who share one taste drawn from ``seed`` (step 3), each jittered, with a
    leniency ~ N(0, 0.4²) and a noise sd drawn in [0.4, 0.8]; round(n·spam_share) bots."""
    return random_taste_population(n, spam_share, seed)


def random_taste_population(
    n: int,
    spam_share: float,
    seed: int,
    clip_vector: ClipVector | None = None,
    rank: int = RANK,
    calibration_clips: int = CALIBRATION_CLIPS,
) -> list[Listener]:
    """``random_taste_listeners`` with its space spelled out (``clip_vector``: default the
    trained embedding, else mel statistics)."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValidationError(f"seed must be an integer ≥ 0, got {seed!r}")
    if rank < 1:
        raise ValidationError("rank must be ≥ 1")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 9_241]))
    d = rng.normal(size=rank)  # isotropic: d / ‖d‖ is uniform on the sphere
    space = TasteSpace(d, clip_vector or default_clip_vector(), calibration_clips)

    def honest(listener_id: str, child: np.random.Generator) -> Listener:
        a = space.direction + child.normal(0, JITTER / math.sqrt(rank), size=rank)
        return RandomTasteListener(
            listener_id,
            space,
            a,
            child,
            noise=float(child.uniform(0.4, 0.8)),
            bias=float(child.normal(0, 0.4)),
        )

    return mixed_population(f"random_taste{seed}", n, spam_share, rng, honest)
