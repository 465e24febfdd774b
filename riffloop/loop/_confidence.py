"""Per-track score R and confidence ω from the ratings that survived quality control."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from riffloop.loop._feedback import Observation, RaterNormaliser
from riffloop.loop._provenance import TrackKind
from riffloop.loop._spam import SpamReport


@dataclass(frozen=True, slots=True)
class TrackScored:
    """The feedback service's verdict on one track (payload of ``tracks.scored.v1``)."""

    track_id: str
    kind: TrackKind
    input_key: str
    score: float  # R_j, shrunk posterior mean on the star scale
    omega: float  # ω_j ∈ [0, 1)
    n_ratings: int  # accepted ratings, trusted or not
    effective_n: float  # m_j = Σ a_i
    mean_stars: float  # raw mean of trusted raters' stars, for the paper's table

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class ConfidenceWeight:
    """ω per track, with R, from normalised ratings, listening, counts and rater reliability.

        a_i = ρ_r · φ_i                      weight of rating i by rater r
            ρ_r ∈ [0, 1]: reliability from quality control (0 = spammer) — trust earned by agreeing
            φ_i = min(1, seconds heard / (½·clip)) — a rating of an unheard track carries nothing;
                  half the clip is enough to judge, so an early skip (a verdict) still counts
        m_j = Σ_i a_i                        effective number of ratings of track j
        x̂_i = μ + σ·(x_i − m̃_r)/s̃_r          the rater-normalised stars (RaterNormaliser)
        R_j = (Σ_i a_i·x̂_i + κ·μ) / (m_j + κ) posterior mean: few ratings → pulled toward μ
        ω_j = m_j / (m_j + κ)                the share of R_j that is data, not prior
        κ   = σ²_e / τ²                      within-track noise over between-track variance
                                             (one-way random-effects ANOVA, clipped to [0.5, 20])

    ``uniform=True`` is the ablation: R_j = plain mean of x̂ over trusted raters, ω_j = 1.
    """

    def __init__(
        self,
        judge_share: float = 0.5,
        default_kappa: float = 3.0,
        uniform: bool = False,
    ) -> None:
        self.judge_share = judge_share
        self.default_kappa = default_kappa
        self.uniform = uniform
        self.kappa = default_kappa

    def heard_weight(self, o: Observation) -> float:
        """φ_i."""
        need = self.judge_share * o.clip_seconds
        return min(1.0, o.seconds_listened / need) if need > 0 else 0.0

    def score(
        self, observations: Sequence[Observation], report: SpamReport
    ) -> dict[str, TrackScored]:
        rho = report.reliability
        normaliser = RaterNormaliser().fit(observations, weights=rho)
        x_hat = normaliser.normalise_all(observations)
        mu = normaliser.mu

        by_track: dict[str, list[tuple[Observation, float, float]]] = defaultdict(list)
        for o, x in zip(observations, x_hat, strict=True):
            a = rho.get(o.rater_id, 1.0) * self.heard_weight(o)
            by_track[o.track_id].append((o, a, float(x)))

        self.kappa = self._estimate_kappa(by_track)
        out: dict[str, TrackScored] = {}
        for track_id, rows in by_track.items():
            first = rows[0][0]
            trusted = [(o, a, x) for o, a, x in rows if rho.get(o.rater_id, 1.0) > 0]
            mean_stars = float(np.mean([o.stars for o, _, _ in trusted])) if trusted else math.nan
            if self.uniform:
                r_j = float(np.mean([x for _, _, x in trusted])) if trusted else mu
                omega, m = 1.0, float(len(trusted))
            else:
                m = sum(a for _, a, _ in rows)
                r_j = (sum(a * x for _, a, x in rows) + self.kappa * mu) / (m + self.kappa)
                omega = m / (m + self.kappa)
            out[track_id] = TrackScored(
                track_id=track_id,
                kind=first.kind,
                input_key=first.input_key,
                score=r_j,
                omega=omega,
                n_ratings=len(rows),
                effective_n=m,
                mean_stars=mean_stars,
            )
        return out

    def _estimate_kappa(self, by_track: dict[str, list[tuple[Observation, float, float]]]) -> float:
        """κ = σ²_e/τ² by the method of moments on tracks with ≥ 2 trusted, heard ratings."""
        groups = [np.array([x for _, a, x in rows if a > 0.5]) for rows in by_track.values()]
        groups = [g for g in groups if g.size >= 2]
        if len(groups) < 5:
            return self.default_kappa
        n_tot = sum(g.size for g in groups)
        k = len(groups)
        grand = np.concatenate(groups).mean()
        ss_w = sum(float(((g - g.mean()) ** 2).sum()) for g in groups)
        ss_b = sum(g.size * float((g.mean() - grand) ** 2) for g in groups)
        ms_w = ss_w / (n_tot - k)
        ms_b = ss_b / (k - 1)
        n0 = (n_tot - sum(g.size**2 for g in groups) / n_tot) / (k - 1)
        tau2 = (ms_b - ms_w) / n0
        if tau2 <= 0:
            return 20.0  # no detectable difference between tracks: trust the prior strongly
        return float(min(max(ms_w / tau2, 0.5), 20.0))
