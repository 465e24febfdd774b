"""Releasing a fine-tuned model: offline gate, canary with a significance test, version registry."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any

import numpy as np
import torch
from scipy import stats

from riffloop.core import (
    ConflictError,
    NotFoundError,
    ObjectStore,
    PermanentError,
    ValidationError,
)

EmbeddingMetric = Callable[..., float]


# 1. Offline gate ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class GateReport:
    """Why a candidate may (or may not) go to canary; stored with the model version."""

    passed: bool
    fd_parent: float  # FD(reference, parent samples)
    fd_candidate: float  # FD(reference, candidate samples)
    diversity_parent: float
    diversity_candidate: float
    max_fd_increase: float
    max_diversity_drop: float
    reasons: tuple[str, ...] = ()
    # Permutation p-values of the FD rise and the diversity drop (NaN: not tested, because the
    # change stayed within its tolerance).
    p_fd: float = math.nan
    p_diversity: float = math.nan
    # The same against the base model (the lineage's root), when the parent is not it: NaN when
    # not compared.
    fd_base: float = math.nan
    diversity_base: float = math.nan
    p_fd_base: float = math.nan
    p_diversity_base: float = math.nan
    # The embedding the samples were compared in (riffloop.loop.QualityEmbedding's name).
    embedding: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def headline(self) -> tuple[str, float, float, float]:
        """(metric, value before, candidate's value, p) of the comparison that decided: the
        first reason of a rejection, else the FD against the parent. p is 1.0 when that
        comparison stayed within its tolerance and so was not tested."""
        metric = self.reasons[0] if self.reasons else "frechet_distance"
        before, candidate, p = {
            "frechet_distance": (self.fd_parent, self.fd_candidate, self.p_fd),
            "diversity": (self.diversity_parent, self.diversity_candidate, self.p_diversity),
            "frechet_distance_vs_base": (self.fd_base, self.fd_candidate, self.p_fd_base),
            "diversity_vs_base": (
                self.diversity_base,
                self.diversity_candidate,
                self.p_diversity_base,
            ),
        }[metric]
        return metric, before, candidate, p if p == p else 1.0  # NaN: not tested


class OfflineGate:
    """Rejects a candidate whose samples moved away from the reference corpus or collapsed:

        FD_cand > (1 + max_fd_increase)·FD_parent  and  p_FD < α          → "frechet_distance"
        div_cand < (1 − max_diversity_drop)·div_parent  and  p_div < α    → "diversity"

    and the same two against the base model's samples, when given (→ "…_vs_base"), so drift
    cannot accumulate over iterations beyond one step's tolerance.

    Tolerances are relative because FD's scale depends on the embedding. A tolerance alone is
    not enough: at the sample sizes a loop iteration has (tens of clips) FD's own sampling noise
    is ±35 % at one σ (base-training floor, 32 clips), so a 25 % rule rejected healthy candidates
    at random (the first evidence run rejected all 4 fine-tunes of a seed, both arms). So a change
    beyond the tolerance must also be significant: p is a permutation test that pools parent and
    candidate samples, relabels them ``permutations`` times (seeded) and counts how often the
    relabelled rise (FD_B − FD_A, or the drop div_A − div_B) reaches the observed one.
    ``frechet`` defaults to the ML core's ``frechet_distance``; ``diversity`` to the ML core's
    definition (mean pairwise Euclidean distance) on the given embeddings.
    """

    def __init__(
        self,
        max_fd_increase: float = 0.25,
        max_diversity_drop: float = 0.15,
        frechet: EmbeddingMetric | None = None,
        diversity: EmbeddingMetric | None = None,
        *,
        alpha: float = 0.05,
        permutations: int = 99,
        seed: int = 0,
    ) -> None:
        if not 0 < alpha < 1 or permutations < 1:
            raise ValidationError("the gate needs 0 < alpha < 1 and at least one permutation")
        self.max_fd_increase = max_fd_increase
        self.max_diversity_drop = max_diversity_drop
        self.alpha = alpha
        self.permutations = permutations
        self.seed = seed
        if frechet is None:
            from riffloop.music import frechet_distance

            def frechet(a: np.ndarray, b: np.ndarray) -> float:
                return float(frechet_distance(torch.as_tensor(a), torch.as_tensor(b)))

        if diversity is None:

            def diversity(e: np.ndarray) -> float:
                # riffloop.music.diversity's definition, on embeddings already computed
                return float(torch.pdist(torch.as_tensor(e, dtype=torch.float64)).mean())

        self._frechet = frechet
        self._diversity = diversity

    def evaluate(
        self,
        reference: np.ndarray,
        parent: np.ndarray,
        candidate: np.ndarray,
        base: np.ndarray | None = None,
    ) -> GateReport:
        """All are embedding matrices [N, D] (reference = held-out corpus clips).

        ``base``: samples of the lineage's root (the base model), when the parent is not the root.
        The same two tests then run against it too ("…_vs_base"): each step within tolerance of
        its parent could otherwise compound, e.g. two diversity drops of 15 % leave 0.85² ≈ 72 %
        of the base model's diversity without a rejection. Two comparisons split α (α/2 each,
        Bonferroni), so an unchanged model is not rejected twice as often."""
        fd_c = float(self._frechet(reference, candidate))
        div_c = float(self._diversity(candidate))
        alpha = self.alpha if base is None else self.alpha / 2
        fd_p, div_p, p_fd, p_div, reasons = self._against(
            reference, parent, candidate, fd_c, div_c, alpha
        )
        fd_b = div_b = p_fd_b = p_div_b = math.nan
        if base is not None:
            fd_b, div_b, p_fd_b, p_div_b, from_base = self._against(
                reference, base, candidate, fd_c, div_c, alpha
            )
            reasons += [f"{r}_vs_base" for r in from_base]
        return GateReport(
            passed=not reasons,
            fd_parent=fd_p,
            fd_candidate=fd_c,
            diversity_parent=div_p,
            diversity_candidate=div_c,
            max_fd_increase=self.max_fd_increase,
            max_diversity_drop=self.max_diversity_drop,
            reasons=tuple(reasons),
            p_fd=p_fd,
            p_diversity=p_div,
            fd_base=fd_b,
            diversity_base=div_b,
            p_fd_base=p_fd_b,
            p_diversity_base=p_div_b,
        )

    def _against(
        self,
        reference: np.ndarray,
        before: np.ndarray,
        candidate: np.ndarray,
        fd_c: float,
        div_c: float,
        alpha: float,
    ) -> tuple[float, float, float, float, list[str]]:
        """(FD_before, div_before, p_FD, p_div, reasons) of ``candidate`` against ``before``."""
        fd_b = float(self._frechet(reference, before))
        div_b = float(self._diversity(before))
        reasons = []
        p_fd = p_div = math.nan
        if fd_c > (1 + self.max_fd_increase) * fd_b:
            p_fd = self._permutation_p(
                before,
                candidate,
                fd_c - fd_b,
                lambda a, b: self._frechet(reference, b) - self._frechet(reference, a),
            )
            if p_fd < alpha:
                reasons.append("frechet_distance")
        if div_c < (1 - self.max_diversity_drop) * div_b:
            p_div = self._permutation_p(
                before,
                candidate,
                div_b - div_c,
                lambda a, b: self._diversity(a) - self._diversity(b),
            )
            if p_div < alpha:
                reasons.append("diversity")
        return fd_b, div_b, p_fd, p_div, reasons

    def _permutation_p(
        self,
        parent: np.ndarray,
        candidate: np.ndarray,
        observed: float,
        statistic: Callable[[np.ndarray, np.ndarray], float],
    ) -> float:
        """P(statistic(A', B') ≥ observed) over random relabellings of parent ∪ candidate."""
        pooled = np.concatenate([np.asarray(parent), np.asarray(candidate)])
        n_a = len(parent)
        rng = np.random.default_rng(self.seed)
        hits = 0
        for _ in range(self.permutations):
            order = rng.permutation(len(pooled))
            if float(statistic(pooled[order[:n_a]], pooled[order[n_a:]])) >= observed:
                hits += 1
        return (1 + hits) / (1 + self.permutations)


# 2. Canary ------------------------------------------------------------------------------------
class CanaryDecision(StrEnum):
    CONTINUE = "continue"
    PROMOTE = "promote"
    ROLLBACK = "rollback"


@dataclass(frozen=True, slots=True)
class CanaryVerdict:
    decision: CanaryDecision
    p_worse: float  # one-sided Mann-Whitney, H1: candidate ratings stochastically smaller
    p_better: float  # one-sided, H1: candidate ratings stochastically larger
    n_candidate: int
    n_current: int
    mean_candidate: float
    mean_current: float


class Canary:
    """Serves ``candidate`` to a ``share`` of requests and compares its ratings with ``current``.

    Decision, once both sides have ``min_ratings``:
    1. p_worse < α → ROLLBACK (the candidate is significantly worse);
    2. p_better < α → PROMOTE;
    3. the candidate reached ``max_ratings`` without being worse → PROMOTE (do no harm: a
       difference small enough to stay undetected at that size is accepted);
    4. otherwise CONTINUE.
    Mann-Whitney is used because stars are ordinal, with ties; routing is a hash of the request
    id so replicas agree and a replay routes identically.
    """

    def __init__(
        self,
        current: str,
        candidate: str,
        share: float = 0.1,
        alpha: float = 0.05,
        min_ratings: int = 20,
        max_ratings: int = 200,
    ) -> None:
        if not 0.0 < share < 1.0:
            raise ValidationError("canary share must lie in (0, 1)")
        self.current = current
        self.candidate = candidate
        self.share = share
        self.alpha = alpha
        self.min_ratings = min_ratings
        self.max_ratings = max_ratings
        self._scores: dict[str, list[float]] = {current: [], candidate: []}

    @staticmethod
    def looks(min_ratings: int, max_ratings: int) -> list[int]:
        """Sample sizes (ratings per side) at which a canary watched as ratings stream in is
        tested: min_ratings, doubling, then max_ratings. Testing at every new rating would inflate
        the error rate (each look is another chance of a false verdict); testing only at these K
        looks, each at α / K (Bonferroni), keeps the overall rate ≤ α."""
        sizes, n = [], max(1, min_ratings)
        while n < max_ratings:
            sizes.append(n)
            n *= 2
        return [*sizes, max(max_ratings, min_ratings)]

    def route(self, request_id: str) -> str:
        digest = hashlib.sha256(f"canary\x1f{self.candidate}\x1f{request_id}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        return self.candidate if u < self.share else self.current

    def record(self, version: str, score: float) -> None:
        if version not in self._scores:
            raise NotFoundError(f"version {version} is not part of this canary")
        if not math.isfinite(score):
            raise ValidationError("a canary score must be finite")
        self._scores[version].append(float(score))

    def decide(self) -> CanaryVerdict:
        cand = np.asarray(self._scores[self.candidate])
        cur = np.asarray(self._scores[self.current])
        p_worse = p_better = math.nan
        decision = CanaryDecision.CONTINUE
        if min(cand.size, cur.size) >= self.min_ratings:
            p_worse = float(stats.mannwhitneyu(cand, cur, alternative="less").pvalue)
            p_better = float(stats.mannwhitneyu(cand, cur, alternative="greater").pvalue)
            if p_worse < self.alpha:
                decision = CanaryDecision.ROLLBACK
            elif p_better < self.alpha or cand.size >= self.max_ratings:
                decision = CanaryDecision.PROMOTE
        return CanaryVerdict(
            decision,
            p_worse,
            p_better,
            int(cand.size),
            int(cur.size),
            float(cand.mean()) if cand.size else math.nan,
            float(cur.mean()) if cur.size else math.nan,
        )


# 3. Registry ----------------------------------------------------------------------------------
class VersionStatus(StrEnum):
    CANDIDATE = "candidate"  # trained, not yet gated
    REJECTED = "rejected"  # failed the offline gate
    CANARY = "canary"  # passed the gate, serving a share
    SERVING = "serving"  # the current model
    RETIRED = "retired"  # was serving, replaced by a child
    ROLLED_BACK = "rolled_back"  # lost its canary


@dataclass(frozen=True, slots=True)
class ModelRecord:
    version: str
    parent: str | None
    trainset_id: str | None
    status: VersionStatus
    checkpoint_key: str | None = None
    # sha256 of the checkpoint's pointer as the trainer wrote it (riffloop.runtime.ModelStore:
    # every load is checked against it); None in records from before it was kept
    checkpoint_sha256: str | None = None
    gate_report: dict[str, Any] | None = None
    canary: dict[str, Any] | None = None
    created_at: float = field(default_factory=time.time)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ModelRecord:
        raw = json.loads(data)
        raw["status"] = VersionStatus(raw["status"])
        return cls(**raw)


_ALLOWED: dict[VersionStatus, set[VersionStatus]] = {
    VersionStatus.CANDIDATE: {VersionStatus.REJECTED, VersionStatus.CANARY, VersionStatus.SERVING},
    VersionStatus.CANARY: {VersionStatus.SERVING, VersionStatus.ROLLED_BACK},
    VersionStatus.SERVING: {VersionStatus.RETIRED, VersionStatus.ROLLED_BACK},
    VersionStatus.RETIRED: {VersionStatus.SERVING},  # a rollback re-serves the parent
    VersionStatus.REJECTED: set(),
    VersionStatus.ROLLED_BACK: set(),
}


class ModelRegistry:
    """Model versions with parent, training set, gate report and status, one JSON object per
    version in the object store (``models/registry/<version>.json``) so any process can read the
    lineage; the serving pointer ``models/registry/SERVING`` is written after the records."""

    PREFIX = "registry/"

    def __init__(self, store: ObjectStore, bucket: str = "models") -> None:
        self.store = store
        self.bucket = bucket
        store.ensure_bucket(bucket)

    def _key(self, version: str) -> str:
        return f"{self.PREFIX}{version}.json"

    def register(self, record: ModelRecord) -> ModelRecord:
        if record.version in self.versions():
            raise ConflictError(f"model version {record.version} already registered")
        if record.parent is not None and record.parent not in self.versions():
            raise NotFoundError(f"parent version {record.parent} is not registered")
        self.store.put(self.bucket, self._key(record.version), record.to_json())
        if record.status is VersionStatus.SERVING:
            self._point(record.version)
        return record

    def get(self, version: str) -> ModelRecord:
        if version not in self.versions():
            raise NotFoundError(f"unknown model version {version}")
        return ModelRecord.from_json(self.store.get(self.bucket, self._key(version)))

    def versions(self) -> list[str]:
        keys = self.store.list(self.bucket, self.PREFIX)
        return sorted(k[len(self.PREFIX) : -5] for k in keys if k.endswith(".json"))

    def serving(self) -> str | None:
        try:
            return self.store.get(self.bucket, f"{self.PREFIX}SERVING").decode() or None
        except NotFoundError:
            return None

    def lineage(self, version: str) -> list[str]:
        """version, parent, grandparent, … back to the base model."""
        out = [version]
        while (parent := self.get(out[-1]).parent) is not None:
            out.append(parent)
        return out

    def _point(self, version: str) -> None:
        self.store.put(self.bucket, f"{self.PREFIX}SERVING", version.encode())

    def _move(self, version: str, status: VersionStatus, **changes: Any) -> ModelRecord:
        record = self.get(version)
        if status not in _ALLOWED[record.status]:
            raise PermanentError(f"model {version} cannot go from {record.status} to {status}")
        record = replace(record, status=status, **changes)
        self.store.put(self.bucket, self._key(version), record.to_json())
        return record

    def record_checkpoint(self, version: str, key: str, sha256: str) -> ModelRecord:
        """The version's checkpoint was published again (a redelivered set trained anew):
        the record names the new content hash, whatever the status."""
        record = replace(self.get(version), checkpoint_key=key, checkpoint_sha256=sha256)
        self.store.put(self.bucket, self._key(version), record.to_json())
        return record

    def gate(self, version: str, report: GateReport) -> ModelRecord:
        status = VersionStatus.CANARY if report.passed else VersionStatus.REJECTED
        return self._move(version, status, gate_report=report.to_dict())

    def promote(self, version: str, canary: CanaryVerdict | None = None) -> ModelRecord:
        previous = self.serving()
        record = self._move(
            version, VersionStatus.SERVING, canary=asdict(canary) if canary else None
        )
        if previous is not None and previous != version:
            self._move(previous, VersionStatus.RETIRED)
        self._point(version)
        return record

    def roll_back(self, version: str, canary: CanaryVerdict | None = None) -> ModelRecord:
        """The canary lost: mark it and keep (or restore) its parent as the serving version."""
        record = self.get(version)
        if record.status is VersionStatus.SERVING:
            # rollback after promotion: restore the parent
            if record.parent is None:
                raise PermanentError("the base model has no parent to roll back to")
            rolled = self._move(version, VersionStatus.ROLLED_BACK)
            self._move(record.parent, VersionStatus.SERVING)
            self._point(record.parent)
            return rolled
        return self._move(
            version, VersionStatus.ROLLED_BACK, canary=asdict(canary) if canary else None
        )


def welch_ci(
    a: Sequence[float], b: Sequence[float], level: float = 0.95
) -> tuple[float, float, float]:
    """Δ = mean(a) − mean(b) with its Welch t confidence interval (unequal variances)."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.size < 2 or y.size < 2:
        return float(x.mean() - y.mean()) if x.size and y.size else math.nan, math.nan, math.nan
    vx, vy = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    delta = float(x.mean() - y.mean())
    se = math.sqrt(vx + vy)
    if se == 0:
        return delta, delta, delta
    dof = (vx + vy) ** 2 / (vx**2 / (x.size - 1) + vy**2 / (y.size - 1))
    t = float(stats.t.ppf(0.5 + level / 2, dof))
    return delta, delta - t * se, delta + t * se
