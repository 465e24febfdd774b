from __future__ import annotations

import numpy as np
import pytest

from riffloop.core import ConflictError, MemoryObjectStore, NotFoundError, PermanentError
from riffloop.loop import (
    Canary,
    CanaryDecision,
    ModelRecord,
    ModelRegistry,
    OfflineGate,
    VersionStatus,
    welch_ci,
)

pytestmark = pytest.mark.unit


def _fd(a: np.ndarray, b: np.ndarray) -> float:
    # a stand-in metric with FD's shape: squared mean distance + trace term on the diagonal
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + ((a.std(0) - b.std(0)) ** 2).sum())


def _div(e: np.ndarray) -> float:
    return float(np.mean(np.linalg.norm(e[:, None] - e[None], axis=-1)))


def test_gate_rejects_drift_and_collapse_and_passes_a_similar_model() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(64, 8))
    parent = rng.normal(size=(64, 8)) + 0.1
    gate = OfflineGate(frechet=_fd, diversity=_div)
    ok = gate.evaluate(ref, parent, rng.normal(size=(64, 8)) + 0.1)
    assert ok.passed and not ok.reasons
    drifted = gate.evaluate(ref, parent, rng.normal(size=(64, 8)) + 2.0)
    assert not drifted.passed and "frechet_distance" in drifted.reasons
    collapsed = gate.evaluate(ref, parent, 0.2 * rng.normal(size=(64, 8)) + 0.1)
    assert not collapsed.passed and "diversity" in collapsed.reasons


def test_gate_against_the_base_model_stops_drift_that_compounds_over_iterations() -> None:
    """Each step keeps 88 % of its parent's spread (within the 15 % tolerance), two steps keep
    77 % of the base model's: only the comparison with the base rejects the second."""
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(256, 8))
    base = rng.normal(size=(256, 8))
    step1 = 0.88 * rng.normal(size=(256, 8))
    step2 = 0.88**2 * rng.normal(size=(256, 8))

    def centre_distance(a: np.ndarray, b: np.ndarray) -> float:  # blind to spread: only div tests
        return float(((a.mean(0) - b.mean(0)) ** 2).sum())

    gate = OfflineGate(frechet=centre_distance, diversity=_div)
    assert gate.evaluate(ref, base, step1).passed
    assert gate.evaluate(ref, step1, step2).passed  # the parent-only rule lets it through
    report = gate.evaluate(ref, step1, step2, base=base)
    assert not report.passed and report.reasons == ("diversity_vs_base",)
    assert report.diversity_candidate < 0.85 * report.diversity_base
    assert report.p_diversity_base < 0.025  # α/2: two comparisons
    # the event's summary names the comparison that decided, with its own figures
    assert report.headline() == (
        "diversity_vs_base",
        report.diversity_base,
        report.diversity_candidate,
        report.p_diversity_base,
    )
    unchanged = gate.evaluate(ref, step1, rng.normal(size=(256, 8)), base=base)
    assert unchanged.passed and not unchanged.reasons
    metric, before, _, p = unchanged.headline()
    assert (metric, before) == ("frechet_distance", unchanged.fd_parent) and 0 < p <= 1


def test_gate_tolerates_sampling_noise_that_a_bare_threshold_rejects() -> None:
    """Parent and candidate drawn from ONE distribution (a model equal to its parent), 16 clips
    each: FD's noise often exceeds +25 %, the permutation test keeps false rejections near α."""
    rng = np.random.default_rng(5)
    ref = rng.normal(size=(64, 8))
    gate = OfflineGate(frechet=_fd, diversity=_div, permutations=99)
    bare, rejected = 0, 0
    for _ in range(40):
        parent = rng.normal(size=(16, 8)) + 0.3
        candidate = rng.normal(size=(16, 8)) + 0.3
        report = gate.evaluate(ref, parent, candidate)
        bare += report.fd_candidate > 1.25 * report.fd_parent
        rejected += not report.passed
    assert bare >= 8  # the old rule alone would have rejected these equal models
    assert rejected <= 5  # ≈ α·40 = 2 expected (FD and diversity tested: ≤ 2α)


def test_canary_rolls_back_a_worse_model_and_promotes_a_better_one() -> None:
    rng = np.random.default_rng(1)
    worse = Canary("v1", "v2", share=0.2, min_ratings=20)
    routed = [worse.route(f"r{i}") for i in range(2000)]
    assert abs(routed.count("v2") / 2000 - 0.2) < 0.04
    assert routed == [worse.route(f"r{i}") for i in range(2000)]
    assert worse.decide().decision is CanaryDecision.CONTINUE
    for _ in range(40):
        worse.record("v1", float(np.clip(np.rint(rng.normal(3.5, 1)), 1, 5)))
        worse.record("v2", float(np.clip(np.rint(rng.normal(2.5, 1)), 1, 5)))
    v = worse.decide()
    assert v.decision is CanaryDecision.ROLLBACK and v.p_worse < 0.05

    better = Canary("v1", "v2", min_ratings=20)
    for _ in range(40):
        better.record("v1", float(np.clip(np.rint(rng.normal(3.0, 1)), 1, 5)))
        better.record("v2", float(np.clip(np.rint(rng.normal(4.0, 1)), 1, 5)))
    assert better.decide().decision is CanaryDecision.PROMOTE
    with pytest.raises(NotFoundError):
        better.record("v9", 3.0)


def test_canary_false_rollback_rate_is_near_alpha() -> None:
    rng = np.random.default_rng(2)
    rollbacks = 0
    for _ in range(200):
        c = Canary("a", "b", alpha=0.05, min_ratings=30)
        for _ in range(30):
            c.record("a", float(rng.integers(1, 6)))
            c.record("b", float(rng.integers(1, 6)))
        rollbacks += c.decide().decision is CanaryDecision.ROLLBACK
    assert rollbacks / 200 < 0.1  # α = 0.05, binomial sd 0.015


def _registry() -> ModelRegistry:
    return ModelRegistry(MemoryObjectStore())


def test_registry_lineage_gate_promote_and_rollback() -> None:
    reg = _registry()
    reg.register(ModelRecord("v0", None, None, VersionStatus.SERVING))
    reg.register(ModelRecord("v1", "v0", "ts1", VersionStatus.CANDIDATE))
    with pytest.raises(ConflictError):
        reg.register(ModelRecord("v1", "v0", "ts1", VersionStatus.CANDIDATE))
    with pytest.raises(NotFoundError):
        reg.register(ModelRecord("v2", "nope", "ts", VersionStatus.CANDIDATE))
    assert reg.serving() == "v0" and reg.lineage("v1") == ["v1", "v0"]

    from riffloop.loop import GateReport

    good = GateReport(True, 1.0, 1.1, 1.0, 1.0, 0.25, 0.15)
    assert reg.gate("v1", good).status is VersionStatus.CANARY
    reg.promote("v1")
    assert reg.serving() == "v1" and reg.get("v0").status is VersionStatus.RETIRED
    reg.roll_back("v1")
    assert reg.serving() == "v0" and reg.get("v1").status is VersionStatus.ROLLED_BACK

    reg.register(ModelRecord("v2", "v0", "ts2", VersionStatus.CANDIDATE))
    bad = GateReport(False, 1.0, 2.0, 1.0, 1.0, 0.25, 0.15, ("frechet_distance",))
    assert reg.gate("v2", bad).status is VersionStatus.REJECTED
    with pytest.raises(PermanentError):
        reg.promote("v2")
    assert reg.get("v2").gate_report["reasons"] == ["frechet_distance"]


def test_welch_ci_covers_the_true_difference() -> None:
    rng = np.random.default_rng(3)
    hits = 0
    for _ in range(200):
        d, lo, hi = welch_ci(rng.normal(1.0, 1, 30), rng.normal(0.5, 2, 20))
        hits += lo <= 0.5 <= hi
        assert lo <= d <= hi
    assert hits / 200 > 0.9


@pytest.mark.slow  # 5,000 Mann-Whitney tests: ≈ 13 s
def test_planned_looks_keep_a_watched_canarys_false_rollbacks_within_alpha() -> None:
    """A canary as good as its parent, watched as ratings stream in: testing at every new
    rating at α rolls it back far more often than α; testing only at ``Canary.looks``, each at
    α / K, stays within α (Bonferroni over the planned looks)."""
    assert Canary.looks(20, 200) == [20, 40, 80, 160, 200]
    assert Canary.looks(8, 12) == [8, 12] and Canary.looks(5, 5) == [5]
    rng = np.random.default_rng(0)
    alpha, low, high, trials = 0.05, 10, 60, 100
    looks = Canary.looks(low, high)
    every = planned = 0
    for _ in range(trials):
        stars = rng.integers(1, 6, size=(2, high)).astype(float)  # the same taste for both

        def rolled_back(n: int, level: float, stars: np.ndarray = stars) -> bool:
            canary = Canary("p", "c", alpha=level, min_ratings=low, max_ratings=high)
            for a, b in zip(stars[0, :n], stars[1, :n], strict=True):
                canary.record("p", float(a))
                canary.record("c", float(b))
            return canary.decide().decision is CanaryDecision.ROLLBACK

        every += any(rolled_back(n, alpha) for n in range(low, high + 1))
        planned += any(rolled_back(n, alpha / len(looks)) for n in looks)
    assert every / trials > 2 * alpha  # 0.12 with this seed
    assert planned / trials <= alpha  # 0.02 with this seed
