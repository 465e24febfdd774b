"""Shared fixtures for the loop tests: a synthetic crowd with known track qualities."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from riffloop.loop import (
    FeedbackLedger,
    ListenEvent,
    Rating,
    TrackKind,
    TrackProvenance,
)

torch.set_num_threads(1)

CLIP = 1.5


@dataclass
class Crowd:
    """Tracks with hidden quality θ_j, honest raters (bias + noise) and typed spammers."""

    ledger: FeedbackLedger
    quality: dict[str, float]
    provenance: dict[str, TrackProvenance]
    spammers: dict[str, str] = field(default_factory=dict)  # rater → kind


def build_crowd(
    seed: int = 0,
    n_inputs: int = 12,
    gens_per_input: int = 5,
    n_honest: int = 40,
    spam: dict[str, int] | None = None,
    ratings_per_rater: int = 24,
    noise: float = 0.7,
    repeats: int = 3,
    spam_ratings: int | None = None,
    noise_spread: float = 0.0,
) -> Crowd:
    """Each input gets ``gens_per_input`` generations and one baseline; each rater rates a random
    subset and, as a consistency probe, ``repeats`` re-served copies of baselines. Bots rate
    ``spam_ratings`` tracks each (default: as many as an honest rater; bots are often prolific).
    ``noise_spread`` > 0 gives honest raters unequal care: noise × lognormal(0, noise_spread)."""
    rng = np.random.default_rng(seed)
    spam = spam or {}
    ledger = FeedbackLedger()
    quality: dict[str, float] = {}
    prov: dict[str, TrackProvenance] = {}
    baselines: list[str] = []
    for i in range(n_inputs):
        songs = (f"song{i}",)
        for g in range(gens_per_input + 1):
            kind = TrackKind.BASELINE if g == 0 else TrackKind.GENERATED
            p = TrackProvenance(
                track_id=f"t{i}-{g}",
                kind=kind,
                model_version="v0",
                input_song_ids=songs,
                seed=g,
                similarity=0.5,
                quality=20,
                start_step=None if kind is TrackKind.BASELINE else 10,
                baseline_sample_id=f"train{i}",
            )
            ledger.register_track(p, CLIP)
            prov[p.track_id] = p
            quality[p.track_id] = float(rng.normal(0, 1))
            if kind is TrackKind.BASELINE:
                baselines.append(p.track_id)
    tracks = sorted(quality)
    raters = [(f"h{k}", "honest") for k in range(n_honest)]
    for kind, count in spam.items():
        raters += [(f"{kind}{k}", kind) for k in range(count)]
    spammers = {r: kind for r, kind in raters if kind != "honest"}
    for r, kind in raters:
        bias = rng.normal(0, 0.4)
        care = float(np.exp(rng.normal(0, noise_spread))) if noise_spread > 0 else 1.0
        count = ratings_per_rater if kind == "honest" else (spam_ratings or ratings_per_rater)
        chosen = list(rng.choice(tracks, size=count, replace=False))
        # consistency probes: copies of baselines re-served under new track ids
        for b in rng.choice(baselines, size=repeats, replace=False):
            for c in range(2):
                probe = TrackProvenance(
                    track_id=f"{b}-probe-{r}-{c}",
                    kind=TrackKind.BASELINE,
                    model_version="v0",
                    input_song_ids=prov[b].input_song_ids,
                    seed=0,
                    similarity=0.5,
                    quality=20,
                    baseline_sample_id=prov[b].baseline_sample_id,
                )
                ledger.register_track(probe, CLIP)
                prov[probe.track_id] = probe
                quality[probe.track_id] = quality[b]
                chosen.append(probe.track_id)
        t = float(rng.uniform(0, 100))
        for tid in chosen:
            ledger.mark_served(tid, r, t)
            q = quality[tid]
            listened = CLIP * float(np.clip(0.6 + 0.3 * q + rng.normal(0, 0.1), 0.3, 1.0))
            stars = int(np.clip(np.rint(3 + 1.0 * q + bias + rng.normal(0, noise * care)), 1, 5))
            gap = listened + rng.uniform(1.0, 4.0)
            if kind == "constant":
                stars = 4
            elif kind == "random":
                stars = int(rng.integers(1, 6))
            elif kind == "zero_listen":
                stars, listened = int(rng.integers(3, 6)), 0.0
            elif kind == "burst":
                stars, listened, gap = int(rng.integers(1, 6)), CLIP, 0.05
            elif kind == "inconsistent":
                stars = int(rng.integers(1, 6)) if "probe" in tid else stars
            t += gap
            ledger.listen(ListenEvent(tid, r, listened, CLIP, listened >= CLIP, listened < CLIP, t))
            ledger.rate(Rating(tid, r, stars, t))
    return Crowd(ledger, quality, prov, spammers)
