"""Quality control of raters: catch spammers and bots, and give every rater a reliability ρ_r.

Each test is a one-sided hypothesis test at level α (default 0.01) against a null built from
the population itself (spammers are assumed a minority, so medians describe honest raters), or a
physical constraint (nobody listens faster than real time). No threshold is fitted to a simulator.

- CONSTANT — null: rates i.i.d. from the population's star shares p_k; flagged when
  P(all n equal) = Σ_k p_k^n < α.
- RANDOM — null: agrees with the leave-one-out consensus like the median rater (r_med); flagged
  when r_r is below r_med (Fisher z, α) and not significantly above 0 (α).
- NO_LISTENING — null: rates unheard tracks (φ < 0.1) at the median rater's rate p0 (≥ 5 %);
  flagged when the Binomial(n, p0) tail P(X ≥ k) < α.
- BURST — physical: a submission cannot follow the previous one sooner than the listening it
  claims (nor within 0.5 s); flagged at ≥ 2 impossible gaps (one clock glitch forgiven).
- INCONSISTENT — null: a rater's |Δstars| between repeats of one baseline sample are drawn from
  the pooled repeats of everyone; flagged when the exact tail P(Σ|Δ| ≥ observed) < α.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
from scipy import stats

from riffloop.loop._feedback import Observation
from riffloop.loop._provenance import TrackKind


class SpamReason(StrEnum):
    CONSTANT = "constant"
    RANDOM = "random"
    NO_LISTENING = "no_listening"
    BURST = "burst"
    INCONSISTENT = "inconsistent"


@dataclass(frozen=True, slots=True)
class SpamReport:
    """Who was caught and why, plus the reliability ρ_r ∈ [0, 1] of every rater (0 = excluded)."""

    caught: dict[str, tuple[SpamReason, ...]]
    reliability: dict[str, float]
    agreement: dict[str, float]  # r_r, Pearson with the leave-one-out consensus (nan if undefined)
    median_agreement: float
    alpha: float
    details: dict[str, dict[str, float]] = field(default_factory=dict)

    def counts_by_reason(self) -> dict[str, int]:
        counts = Counter(reason.value for reasons in self.caught.values() for reason in reasons)
        return dict(sorted(counts.items()))

    @property
    def n_raters(self) -> int:
        return len(self.reliability)

    def summary(self) -> str:
        parts = ", ".join(f"{k} {v}" for k, v in self.counts_by_reason().items()) or "none"
        return f"{len(self.caught)}/{self.n_raters} raters caught ({parts})"


class SpamFilter:
    """Runs the five tests of the module docstring; ``enabled=False`` trusts everyone (ablation)."""

    def __init__(
        self,
        alpha: float = 0.01,
        unheard_fraction: float = 0.1,
        clock_tolerance_s: float = 0.5,
        human_floor_s: float = 0.5,
        reliability_prior: float = 5.0,
        enabled: bool = True,
    ) -> None:
        self.alpha = alpha
        self.unheard_fraction = unheard_fraction
        self.clock_tolerance_s = clock_tolerance_s
        self.human_floor_s = human_floor_s  # no UI round trip (play, judge, click) is faster
        self.reliability_prior = reliability_prior
        self.enabled = enabled

    def inspect(self, observations: Sequence[Observation]) -> SpamReport:
        by_rater: dict[str, list[Observation]] = defaultdict(list)
        for o in observations:
            by_rater[o.rater_id].append(o)
        raters = sorted(by_rater)
        if not self.enabled:
            return SpamReport({}, dict.fromkeys(raters, 1.0), {}, math.nan, self.alpha)

        caught: dict[str, set[SpamReason]] = defaultdict(set)
        details: dict[str, dict[str, float]] = defaultdict(dict)
        z_crit = float(stats.norm.ppf(1 - self.alpha))

        # 1. CONSTANT: chance that an honest rater drawing from p_k gives n equal stars.
        shares = np.bincount([o.stars for o in observations], minlength=6)[1:].astype(float)
        shares /= max(shares.sum(), 1.0)
        for r in raters:
            stars = {o.stars for o in by_rater[r]}
            n = len(by_rater[r])
            if len(stars) == 1:
                p_same = float(np.sum(shares**n))
                details[r]["p_constant"] = p_same
                if p_same < self.alpha:
                    caught[r].add(SpamReason.CONSTANT)

        # 2. NO_LISTENING: binomial tail against the median rater's unheard rate (floor 5 %).
        unheard = {
            r: sum(o.listened_fraction < self.unheard_fraction for o in by_rater[r]) for r in raters
        }
        p0 = max(0.05, float(np.median([unheard[r] / len(by_rater[r]) for r in raters])))
        for r in raters:
            n, k = len(by_rater[r]), unheard[r]
            if k:
                p = float(stats.binom.sf(k - 1, n, p0))
                details[r]["p_no_listening"] = p
                if p < self.alpha:
                    caught[r].add(SpamReason.NO_LISTENING)

        # 3. BURST: a submission sooner after the previous one than the listening it claims.
        for r in raters:
            seq = sorted(by_rater[r], key=lambda o: o.submitted_at)
            impossible = 0
            for prev, cur in itertools.pairwise(seq):
                gap = cur.submitted_at - prev.submitted_at
                needed = max(self.human_floor_s, cur.seconds_listened - self.clock_tolerance_s)
                impossible += gap < needed
            details[r]["impossible_gaps"] = float(impossible)
            if impossible >= 2:
                caught[r].add(SpamReason.BURST)

        # 4. INCONSISTENT: repeated baseline samples, mean |Δstars| against the median rater.
        pair_diffs: dict[str, list[int]] = {}
        for r in raters:
            groups: dict[str, list[int]] = defaultdict(list)
            for o in by_rater[r]:
                if o.kind is TrackKind.BASELINE and o.baseline_sample_id is not None:
                    groups[o.baseline_sample_id].append(o.stars)
            repeat_diffs = [
                abs(a - b) for g in groups.values() for i, a in enumerate(g) for b in g[i + 1 :]
            ]
            if repeat_diffs:
                pair_diffs[r] = repeat_diffs
        if len(pair_diffs) >= 3:
            # null pmf of one |Δ| ∈ {0..4}: the pooled repeats of all raters (mostly honest)
            pooled = np.bincount([d for v in pair_diffs.values() for d in v], minlength=5)
            pmf = pooled[:5] / pooled.sum()
            for r, repeats in pair_diffs.items():
                if len(repeats) >= 3:
                    p = sum_tail(pmf, len(repeats), int(sum(repeats)))
                    details[r]["p_inconsistent"] = p
                    if p < self.alpha:
                        caught[r].add(SpamReason.INCONSISTENT)

        # 5. RANDOM: agreement with the leave-one-out consensus of the raters still trusted.
        #    Two rounds: the consensus is recomputed without those caught in round one.
        agreement: dict[str, float] = {}
        n_shared: dict[str, int] = {}
        r_med = math.nan
        for _round in range(2):
            trusted = {r for r in raters if not caught.get(r)}
            agreement, n_shared = _loo_agreement(by_rater, observations, trusted)
            good = [
                agreement[r] for r in trusted if n_shared[r] >= 8 and math.isfinite(agreement[r])
            ]
            if len(good) < 3:
                break
            r_med = float(np.median(good))
            for r in raters:
                n, a = n_shared[r], agreement[r]
                if n < 8 or not math.isfinite(a) or SpamReason.CONSTANT in caught.get(r, ()):
                    continue
                se = 1.0 / math.sqrt(n - 3)
                z_a = math.atanh(max(min(a, 0.999), -0.999))
                below_typical = (math.atanh(min(r_med, 0.999)) - z_a) / se > z_crit
                not_positive = z_a / se < z_crit
                details[r]["agreement"] = a
                if below_typical and not_positive:
                    caught[r].add(SpamReason.RANDOM)

        # 6. Reliability: 0 if caught; else relative agreement q_r = r_r/r_med ∈ [0, 1], shrunk
        #    toward 1 with ``reliability_prior`` pseudo-ratings (few ratings → presumed honest).
        reliability: dict[str, float] = {}
        prior = self.reliability_prior
        for r in raters:
            if caught.get(r):
                reliability[r] = 0.0
                continue
            a = agreement.get(r, math.nan)
            q = 1.0
            if math.isfinite(a) and math.isfinite(r_med) and r_med > 0:
                q = min(max(a / r_med, 0.0), 1.0)
            n_r = n_shared.get(r, 0)
            reliability[r] = (n_r * q + prior) / (n_r + prior)
        return SpamReport(
            caught={r: tuple(sorted(v)) for r, v in caught.items() if v},
            reliability=reliability,
            agreement=agreement,
            median_agreement=r_med,
            alpha=self.alpha,
            details=dict(details),
        )


def sum_tail(pmf: np.ndarray, n: int, k: int) -> float:
    """P(X_1 + … + X_n ≥ k) for n iid draws from ``pmf`` over {0, 1, …}: the exact n-fold
    convolution pmf^{*n}, taken as the n-th power of its discrete Fourier transform (length
    ≥ the support of the sum, so nothing wraps around). A loop of n convolutions was O(n²)
    and took seconds for a rater who had been served the same baseline samples a few hundred
    times; the transform's rounding (≈ 1e-16 per term) is far below any test level α."""
    support = (len(pmf) - 1) * n + 1
    if k >= support:
        return 0.0
    size = 1 << (support - 1).bit_length()
    dist = np.fft.irfft(np.fft.rfft(pmf, size) ** n, size)[:support]
    return float(min(1.0, np.clip(dist[max(k, 0) :], 0.0, None).sum()))


def _loo_agreement(
    by_rater: dict[str, list[Observation]],
    observations: Sequence[Observation],
    trusted: set[str],
) -> tuple[dict[str, float], dict[str, int]]:
    """Pearson r between a rater's stars and the mean of the *other* trusted raters' stars on
    the same tracks (each rater's stars centred on their own mean first, removing leniency)."""
    centre = {r: float(np.mean([o.stars for o in obs])) for r, obs in by_rater.items()}
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for o in observations:
        if o.rater_id in trusted:
            sums[o.track_id] += o.stars - centre[o.rater_id]
            counts[o.track_id] += 1
    agreement: dict[str, float] = {}
    n_shared: dict[str, int] = {}
    for r, obs in by_rater.items():
        xs, cs = [], []
        for o in obs:
            own = (o.stars - centre[r]) if r in trusted else 0.0
            n_other = counts[o.track_id] - (1 if r in trusted else 0)
            if n_other >= 1:
                xs.append(o.stars)
                cs.append((sums[o.track_id] - own) / n_other)
        n_shared[r] = len(xs)
        if len(xs) >= 3 and np.std(xs) > 0 and np.std(cs) > 0:
            agreement[r] = float(np.corrcoef(xs, cs)[0, 1])
        else:
            agreement[r] = math.nan
    return agreement, n_shared
