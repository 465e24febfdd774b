"""Per-track score R and confidence ω from the ratings that survived quality control."""

from __future__ import annotations

import math
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


@dataclass(frozen=True)
class TrackScores:
    """R, ω and the counts of every rated track as arrays, j in order of first rating:
    for callers that need a few tracks' :class:`TrackScored` or sums over all (one object per
    track of a 100,000-track ledger took a second)."""

    first: list[Observation]  # the first observation of track j (its id, kind, input)
    index: dict[str, int]  # track → j
    score: np.ndarray  # R_j
    omega: np.ndarray  # ω_j
    n_ratings: np.ndarray  # n_j
    effective_n: np.ndarray  # m_j
    mean_stars: np.ndarray  # raw mean of trusted raters' stars (NaN without one)
    n_trusted: np.ndarray  # the trusted raters' ratings behind mean_stars
    sum_sq_stars: np.ndarray  # Σ stars² over them (with mean_stars: their variance, pooled)

    def scored(self, j: int) -> TrackScored:
        o = self.first[j]
        return TrackScored(
            track_id=o.track_id,
            kind=o.kind,
            input_key=o.input_key,
            score=float(self.score[j]),
            omega=float(self.omega[j]),
            n_ratings=int(self.n_ratings[j]),
            effective_n=float(self.effective_n[j]),
            mean_stars=float(self.mean_stars[j]),
        )


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
        """R_j and ω_j of every rated track."""
        if not observations:
            self.kappa = self.default_kappa
            return {}
        scores = self.score_arrays(observations, report)
        return {o.track_id: scores.scored(j) for j, o in enumerate(scores.first)}

    def score_arrays(self, observations: Sequence[Observation], report: SpamReport) -> TrackScores:
        """:meth:`score` as arrays. Vectorised over the observations (one np.bincount per sum
        over a track's ratings, in the observations' order): the feedback service runs this
        over its whole ledger on every scoring pass. ``observations`` must not be empty."""
        rho = report.reliability
        normaliser = RaterNormaliser().fit(observations, weights=rho)
        x = normaliser.normalise_all(observations)  # x̂_i
        mu = normaliser.mu

        index: dict[str, int] = {}  # track → j, in order of first appearance
        first: list[Observation] = []  # the first observation of track j (its kind, input)
        codes = np.empty(len(observations), dtype=np.int64)
        for i, o in enumerate(observations):
            j = index.get(o.track_id)
            if j is None:
                j = index[o.track_id] = len(first)
                first.append(o)
            codes[i] = j
        k = len(first)
        rho_i = np.fromiter((rho.get(o.rater_id, 1.0) for o in observations), dtype=float)
        stars = np.fromiter((o.stars for o in observations), dtype=float)
        need = self.judge_share * np.fromiter((o.clip_seconds for o in observations), dtype=float)
        heard = np.fromiter((o.seconds_listened for o in observations), dtype=float)
        phi = np.divide(heard, need, out=np.zeros_like(need), where=need > 0)
        a = rho_i * np.minimum(1.0, phi)  # a_i = ρ_r · φ_i
        trusted = (rho_i > 0).astype(float)

        def per_track(weights: np.ndarray) -> np.ndarray:
            return np.bincount(codes, weights=weights, minlength=k)

        n_ratings = np.bincount(codes, minlength=k)
        n_trusted = per_track(trusted)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_stars = np.where(n_trusted > 0, per_track(stars * trusted) / n_trusted, math.nan)
        sum_sq_stars = per_track(stars * stars * trusted)
        self.kappa = self._estimate_kappa(codes, a, x, k)
        if self.uniform:
            m = n_trusted
            with np.errstate(invalid="ignore", divide="ignore"):
                r = np.where(n_trusted > 0, per_track(x * trusted) / n_trusted, mu)
            omega = np.ones(k)
        else:
            m = per_track(a)  # m_j = Σ_i a_i
            r = (per_track(a * x) + self.kappa * mu) / (m + self.kappa)  # R_j
            omega = m / (m + self.kappa)  # ω_j
        return TrackScores(
            first, index, r, omega, n_ratings, m, mean_stars, n_trusted, sum_sq_stars
        )

    def _estimate_kappa(self, codes: np.ndarray, a: np.ndarray, x: np.ndarray, k: int) -> float:
        """κ = σ²_e/τ² by the method of moments on tracks with ≥ 2 trusted, heard ratings."""
        heard = a > 0.5
        size = np.bincount(codes[heard], minlength=k)
        keep = heard & (size[codes] >= 2)  # the ratings of the tracks that enter the estimate
        groups = size >= 2
        if int(groups.sum()) < 5:
            return self.default_kappa
        g_codes, g_x = codes[keep], x[keep]
        g_size = size[groups].astype(float)
        g_mean = np.bincount(g_codes, weights=g_x, minlength=k)[groups] / g_size
        n_tot = float(g_size.sum())
        n_groups = len(g_size)
        grand = float(g_x.mean())
        mean_of = np.zeros(k)
        mean_of[groups] = g_mean
        ss_w = float(((g_x - mean_of[g_codes]) ** 2).sum())
        ss_b = float((g_size * (g_mean - grand) ** 2).sum())
        ms_w = ss_w / (n_tot - n_groups)
        ms_b = ss_b / (n_groups - 1)
        n0 = (n_tot - float((g_size**2).sum()) / n_tot) / (n_groups - 1)
        tau2 = (ms_b - ms_w) / n0
        if tau2 <= 0:
            return 20.0  # no detectable difference between tracks: trust the prior strongly
        return float(min(max(ms_w / tau2, 0.5), 20.0))
