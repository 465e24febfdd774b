from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from riffloop.loop import ConfidenceWeight, SpamFilter, SpamReason, TrackKind
from tests.loop.crowd import build_crowd

pytestmark = pytest.mark.unit

SPAM = {"constant": 3, "random": 3, "zero_listen": 3, "burst": 3, "inconsistent": 0}


def test_each_spammer_kind_is_caught_for_its_reason() -> None:
    crowd = build_crowd(seed=1, spam=SPAM)
    report = SpamFilter().inspect(crowd.ledger.observations())
    expected = {
        "constant": SpamReason.CONSTANT,
        "random": SpamReason.RANDOM,
        "zero_listen": SpamReason.NO_LISTENING,
        "burst": SpamReason.BURST,
    }
    for rater, kind in crowd.spammers.items():
        assert rater in report.caught, (rater, report.details.get(rater))
        assert expected[kind] in report.caught[rater]
        assert report.reliability[rater] == 0.0
    honest_caught = [r for r in report.caught if r not in crowd.spammers]
    # α = 0.01 per test, five tests, 40 honest raters: a false alarm or two at most
    assert len(honest_caught) <= 2
    assert report.counts_by_reason()["burst"] >= 3
    assert "caught" in report.summary()


def test_inconsistent_raters_on_repeated_baselines_are_caught() -> None:
    crowd = build_crowd(seed=2, spam={"inconsistent": 3}, repeats=10)
    report = SpamFilter().inspect(crowd.ledger.observations())
    caught = [r for r in crowd.spammers if SpamReason.INCONSISTENT in report.caught.get(r, ())]
    assert len(caught) >= 2


def test_disabled_filter_trusts_everyone() -> None:
    crowd = build_crowd(seed=1, spam=SPAM)
    report = SpamFilter(enabled=False).inspect(crowd.ledger.observations())
    assert not report.caught
    assert set(report.reliability.values()) == {1.0}


def test_honest_reliability_is_high_and_shrinks_toward_one() -> None:
    crowd = build_crowd(seed=3)
    report = SpamFilter().inspect(crowd.ledger.observations())
    rel = [report.reliability[r] for r in report.reliability if r not in report.caught]
    assert np.median(rel) > 0.8
    assert all(0.0 < x <= 1.0 for x in rel)


def _track_quality_correlation(seed: int, spam_filter: SpamFilter, cw: ConfidenceWeight) -> float:
    crowd = build_crowd(seed=seed, spam={"constant": 4, "random": 4, "zero_listen": 4})
    obs = crowd.ledger.observations()
    scores = cw.score(obs, spam_filter.inspect(obs))
    ids = [t for t in scores if "probe" not in t]
    return float(
        stats.spearmanr([scores[t].score for t in ids], [crowd.quality[t] for t in ids])[0]
    )


def test_scores_track_hidden_quality_better_with_spam_control() -> None:
    on = [_track_quality_correlation(s, SpamFilter(), ConfidenceWeight()) for s in range(3)]
    off = [
        _track_quality_correlation(s, SpamFilter(enabled=False), ConfidenceWeight())
        for s in range(3)
    ]
    assert np.mean(on) > 0.7
    assert np.mean(on) > np.mean(off)


def test_omega_grows_with_ratings_listening_and_reliability() -> None:
    crowd = build_crowd(seed=4)
    obs = crowd.ledger.observations()
    report = SpamFilter().inspect(obs)
    cw = ConfidenceWeight()
    scores = cw.score(obs, report)
    assert 0.5 <= cw.kappa <= 20.0
    for s in scores.values():
        assert 0.0 <= s.omega < 1.0
        assert s.omega == pytest.approx(s.effective_n / (s.effective_n + cw.kappa))
    # more effective ratings → larger ω (ω is monotone in m_j)
    ordered = sorted(scores.values(), key=lambda s: s.effective_n)
    assert ordered[0].omega <= ordered[-1].omega
    # an unreliable rater's ratings carry nothing
    first = next(o for o in obs if report.reliability[o.rater_id] > 0 and o.seconds_listened > 0)
    report.reliability[first.rater_id] = 0.0
    again = cw.score(obs, report)
    tid = first.track_id
    assert again[tid].effective_n < scores[tid].effective_n


def test_unheard_ratings_get_zero_weight_and_uniform_ablation_gives_one() -> None:
    crowd = build_crowd(seed=5, spam={"zero_listen": 2})
    obs = crowd.ledger.observations()
    report = SpamFilter(enabled=False).inspect(obs)
    cw = ConfidenceWeight()
    assert all(cw.heard_weight(o) == 0.0 for o in obs if o.rater_id.startswith("zero"))
    uniform = ConfidenceWeight(uniform=True).score(obs, report)
    assert {s.omega for s in uniform.values()} == {1.0}
    assert {s.kind for s in uniform.values()} == {TrackKind.BASELINE, TrackKind.GENERATED}


def test_confidence_matches_its_formula_track_by_track() -> None:
    """The vectorised ω and R against a plain per-track sum of the docstring's formulas."""
    from riffloop.loop import RaterNormaliser

    crowd = build_crowd(seed=3, spam=SPAM)
    obs = crowd.ledger.observations()
    report = SpamFilter().inspect(obs)
    cw = ConfidenceWeight()
    scores = cw.score(obs, report)
    normaliser = RaterNormaliser().fit(obs, weights=report.reliability)
    for track_id in sorted(scores)[:40]:
        rows = [o for o in obs if o.track_id == track_id]
        a = [report.reliability.get(o.rater_id, 1.0) * cw.heard_weight(o) for o in rows]
        x = [normaliser.normalise(o.rater_id, o.stars) for o in rows]
        m = sum(a)
        expected = (
            sum(ai * xi for ai, xi in zip(a, x, strict=True)) + cw.kappa * normaliser.mu
        ) / (m + cw.kappa)
        got = scores[track_id]
        assert got.score == pytest.approx(expected, abs=1e-12)
        assert got.omega == pytest.approx(m / (m + cw.kappa), abs=1e-12)
        assert got.n_ratings == len(rows)
    assert list(scores) == list(dict.fromkeys(o.track_id for o in obs))  # first-seen order


def test_the_inconsistency_tail_is_the_exact_n_fold_convolution() -> None:
    """sum_tail (Fourier power) equals the loop of n convolutions it replaced, to 1e-12, and
    handles a rater with thousands of repeated baseline samples (the loop's O(n²) case)."""
    from riffloop.loop._spam import sum_tail

    rng = np.random.default_rng(7)
    for _ in range(50):
        pmf = rng.dirichlet(np.ones(5))
        n = int(rng.integers(3, 40))
        dist = np.array([1.0])
        for _ in range(n):
            dist = np.convolve(dist, pmf)
        for k in (0, 1, n, 2 * n, 4 * n, 4 * n + 1):
            assert sum_tail(pmf, n, k) == pytest.approx(float(dist[k:].sum()), abs=1e-12)
    # mean 2 per draw, sd √2: 12,000 is 20 sd above the mean 10,000 of the sum
    assert 0.0 <= sum_tail(np.full(5, 0.2), 5_000, 12_000) < 1e-6
    assert sum_tail(np.full(5, 0.2), 5_000, 10_000) == pytest.approx(0.5, abs=0.01)
