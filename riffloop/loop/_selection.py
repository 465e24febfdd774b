"""Genetic selection of generations into (input, target) training pairs, and the purge cycle."""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np

from riffloop.core import ValidationError
from riffloop.loop._confidence import TrackScored
from riffloop.loop._provenance import TrackKind, TrackProvenance


@dataclass(frozen=True, slots=True)
class TrainingPair:
    """Fine-tune toward ``target_track_id`` when given ``input_song_ids``, with loss weight ω."""

    input_key: str
    input_song_ids: tuple[str, ...]
    target_track_id: str
    weight: float  # ω of the target (1 for the random control)
    score: float  # R of the target
    margin: float  # R − R_baseline(input) when selected
    iteration: int
    model_version: str
    embedding: tuple[float, ...]  # of the target audio, for the diversity guard
    # Preference pairs: a generation for the same input that listeners liked less than the
    # target ("" in a plain set; the trainer then fine-tunes toward the target alone)
    loser_track_id: str = ""
    # Whether the target beat its input's baseline, so the next version's baseline index may
    # take it as the input's champion (the genetic step). A weighted set trains its losers too
    # (False), and a control arm's pairs never win (False, or R = NaN for a random draw).
    beat_baseline: bool = True

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def manifest_json(pairs: Sequence[TrainingPair], trainset_id: str) -> str:
    """The trainset manifest (``trainsets/<id>.json``) as the trainer reads it."""
    return json.dumps({"trainset_id": trainset_id, "pairs": [p.to_dict() for p in pairs]})


def cosine_distance(a: np.ndarray, b: np.ndarray) -> float:
    den = float(np.linalg.norm(a) * np.linalg.norm(b)) or 1.0
    return 1.0 - float(np.dot(a, b)) / den


def auto_near_duplicate(embeddings: Sequence[np.ndarray], share: float = 0.1) -> float:
    """δ = ``share`` × the median pairwise cosine distance: ten times closer than typical."""
    e = np.asarray(embeddings, dtype=float)
    if len(e) < 2:
        return 0.0
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    d = 1.0 - e @ e.T
    return share * float(np.median(d[np.triu_indices(len(e), 1)]))


def diversity_guard(
    pairs: Sequence[TrainingPair],
    near_duplicate: float,
    cap_per_input: int,
    by_weight: bool = False,
) -> tuple[list[TrainingPair], Counter[str]]:
    """Greedy, best first (by ω·margin, or by ω alone with ``by_weight``): keep a pair unless
    its input already has ``cap_per_input`` pairs or its target lies within δ =
    ``near_duplicate`` of a kept target."""
    dropped: Counter[str] = Counter()
    kept: list[TrainingPair] = []
    per_input: Counter[str] = Counter()

    def rank(p: TrainingPair) -> tuple[float, str]:
        return (-p.weight if by_weight else -p.weight * p.margin, p.target_track_id)

    for p in sorted(pairs, key=rank):
        if per_input[p.input_key] >= cap_per_input:
            dropped["cap_per_input"] += 1
            continue
        e = np.asarray(p.embedding)
        if any(cosine_distance(e, np.asarray(q.embedding)) < near_duplicate for q in kept):
            dropped["near_duplicate"] += 1
            continue
        kept.append(p)
        per_input[p.input_key] += 1
    return kept, dropped


@dataclass(frozen=True, slots=True)
class SelectionResult:
    pairs: list[TrainingPair]
    survivors: int  # generations that beat their baseline, before the diversity guard
    candidates: int  # rated generations considered
    dropped: dict[str, int]
    baseline_score: dict[str, float]  # R_b per input key


class GeneticSelector:
    """A generation survives if R > R_b(input) (+ ``min_margin``), R_b the ω-weighted mean R of
    the baseline tracks served for the same input merge (the pooled baseline mean when an input
    got none); with ``top_quartile`` it must also reach its input's upper quartile of R.
    Survivors become training pairs weighted by ω, then pass the diversity guard.

    With ``preference``, each survivor is paired with a loser: the lowest-rated generation of
    the same input that fell below R_b (ω > 0), so the trainer learns what the listeners
    preferred over what, not only what they liked; a survivor whose input has no loser is
    dropped (``no_loser``)."""

    def __init__(
        self,
        min_margin: float = 0.0,
        top_quartile: bool = False,
        near_duplicate: float | None = None,
        cap_per_input: int = 3,
        preference: bool = False,
    ) -> None:
        self.min_margin = min_margin
        self.top_quartile = top_quartile
        self.near_duplicate = near_duplicate  # None: auto_near_duplicate of the candidates
        self.cap_per_input = cap_per_input
        self.preference = preference

    def select(
        self,
        scores: Mapping[str, TrackScored],
        provenances: Mapping[str, TrackProvenance],
        embeddings: Mapping[str, np.ndarray],
        iteration: int,
    ) -> SelectionResult:
        baseline = baseline_scores(scores)
        pooled = _weighted_mean([s for s in scores.values() if s.kind is TrackKind.BASELINE])
        generated = [s for s in scores.values() if s.kind is TrackKind.GENERATED]
        quartile: dict[str, float] = {}
        if self.top_quartile:
            by_input: dict[str, list[float]] = defaultdict(list)
            for s in generated:
                by_input[s.input_key].append(s.score)
            quartile = {k: float(np.quantile(v, 0.75)) for k, v in by_input.items()}

        survivors: list[TrainingPair] = []
        for s in generated:
            r_b = baseline.get(s.input_key, pooled)
            margin = s.score - r_b
            if margin <= self.min_margin or s.omega <= 0:
                continue
            if self.top_quartile and s.score < quartile[s.input_key]:
                continue
            prov = provenances[s.track_id]
            survivors.append(
                TrainingPair(
                    input_key=s.input_key,
                    input_song_ids=prov.input_song_ids,
                    target_track_id=s.track_id,
                    weight=s.omega,
                    score=s.score,
                    margin=margin,
                    iteration=iteration,
                    model_version=prov.model_version,
                    embedding=tuple(float(v) for v in embeddings[s.track_id]),
                )
            )
        no_loser = 0
        if self.preference:
            worst: dict[str, TrackScored] = {}  # per input, its lowest-rated losing generation
            for s in generated:
                if s.omega > 0 and s.score < baseline.get(s.input_key, pooled):
                    known = worst.get(s.input_key)
                    if known is None or (s.score, s.track_id) < (known.score, known.track_id):
                        worst[s.input_key] = s
            paired = [
                replace(p, loser_track_id=worst[p.input_key].track_id)
                for p in survivors
                if p.input_key in worst
            ]
            no_loser = len(survivors) - len(paired)
            survivors_kept = paired
        else:
            survivors_kept = survivors
        delta = self.near_duplicate
        if delta is None:
            delta = auto_near_duplicate([embeddings[s.track_id] for s in generated])
        kept, dropped = diversity_guard(survivors_kept, delta, self.cap_per_input)
        if no_loser:
            dropped["no_loser"] = no_loser
        return SelectionResult(kept, len(survivors), len(generated), dict(dropped), baseline)


class RandomSelector:
    """The control arm: ``count`` generations drawn uniformly at random, ω = 1, no ratings used.
    With ``preference``: ``count`` pairs of two generations of the same input, drawn uniformly
    among all such pairs, each in a random order (a coin says which one is the "winner")."""

    def __init__(self, seed: int, preference: bool = False) -> None:
        self.rng = np.random.default_rng(seed)
        self.preference = preference

    def select(
        self,
        provenances: Sequence[TrackProvenance],
        embeddings: Mapping[str, np.ndarray],
        count: int,
        iteration: int,
    ) -> list[TrainingPair]:
        gens = sorted(
            (p for p in provenances if p.kind is TrackKind.GENERATED), key=lambda p: p.track_id
        )
        if self.preference:
            return self._pairs(gens, embeddings, count, iteration)
        idx = self.rng.choice(len(gens), size=min(count, len(gens)), replace=False)
        return [_unrated_pair(gens[i], embeddings, iteration) for i in sorted(idx)]

    def _pairs(
        self,
        gens: Sequence[TrackProvenance],
        embeddings: Mapping[str, np.ndarray],
        count: int,
        iteration: int,
    ) -> list[TrainingPair]:
        candidates = [
            (a, b)
            for a, b in itertools.combinations(range(len(gens)), 2)
            if gens[a].input_key == gens[b].input_key
        ]
        picks = self.rng.choice(len(candidates), size=min(count, len(candidates)), replace=False)
        flips = self.rng.random(len(picks)) < 0.5
        pairs = []
        for pick, flip in zip(sorted(picks), flips, strict=True):
            a, b = candidates[pick]
            winner, loser = (gens[b], gens[a]) if flip else (gens[a], gens[b])
            pairs.append(
                replace(_unrated_pair(winner, embeddings, iteration), loser_track_id=loser.track_id)
            )
        return pairs


class WeightedSelector:
    """Every rated generation trains, weighted by how listeners rated it against the other
    generations of the same input (reward-weighted regression within an input):

        d_j = R_j − R̄_k(j)        R̄_k the ω-weighted mean R of input k's generations
        σ² = Σ_j ω_j d_j² / Σ_j ω_j    (pooled over the inputs, so z is in the session's units)
        z_j = d_j / σ,   weight_j = ω_j · exp((z_j − max z) / τ)

    so a generation rated above its siblings pulls the fine-tune harder than one rated below,
    while every input's generations train alike: what the model decided (the window, the noise,
    its own rendering) is rewarded, not which songs were uploaded (scripts/taste_ceiling.py
    ``--within-merge`` measures this against the top-k picks). An input needs two generations
    with ω > 0 to be compared; one with fewer is left out (``single``). The scale of the
    weights is free: the trainer uses ω relative to the set's mean.

    With ``permute_seed`` this is the control arm (ratings-randomised): the same tracks, the
    same z values, shuffled among the generations of each input, so the arm trains on the same
    data with weights no rating set.

    No cap per input, and by default no near-duplicate guard (``near_duplicate`` δ > 0 drops
    the lighter of two targets closer than δ): every input's generations weigh alike, so no
    input can take over the set, while the generations of one input lie near each other on the
    quality embedding by nature (the same songs, the same instruments), so the genetic step's
    auto δ (a tenth of the candidates' median distance) would drop the very comparisons the
    weights are made of. The trainer's gate still refuses a candidate whose diversity falls."""

    def __init__(
        self,
        temperature: float = 1.0,
        near_duplicate: float = 0.0,
        permute_seed: int | None = None,
    ) -> None:
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValidationError(f"the temperature τ must be a positive number, got {temperature}")
        self.temperature = temperature
        self.near_duplicate = near_duplicate
        self.rng = np.random.default_rng(permute_seed) if permute_seed is not None else None

    def select(
        self,
        scores: Mapping[str, TrackScored],
        provenances: Mapping[str, TrackProvenance],
        embeddings: Mapping[str, np.ndarray],
        iteration: int,
    ) -> SelectionResult:
        generated = sorted(
            (s for s in scores.values() if s.kind is TrackKind.GENERATED),
            key=lambda s: s.track_id,
        )
        by_input: dict[str, list[TrackScored]] = defaultdict(list)
        for s in generated:
            if s.omega > 0:
                by_input[s.input_key].append(s)
        dropped: Counter[str] = Counter()
        groups = {}
        for key, rows in sorted(by_input.items()):
            if len(rows) < 2:
                dropped["single"] += len(rows)
            else:
                groups[key] = rows
        mean = {k: _weighted_mean(rows) for k, rows in groups.items()}
        rows = [s for k in groups for s in groups[k]]
        d = np.array([s.score - mean[s.input_key] for s in rows])
        omega = np.array([s.omega for s in rows])
        sigma = math.sqrt(float(np.dot(omega, d**2) / omega.sum())) if rows else 0.0
        z = d / sigma if sigma > 0 else np.zeros(len(rows))
        if self.rng is not None:  # the control: z shuffled within each input
            at = 0
            for k in groups:
                n = len(groups[k])
                z[at : at + n] = z[at : at + n][self.rng.permutation(n)]
                at += n
        weight = omega * np.exp((z - z.max()) / self.temperature) if rows else z
        baseline = baseline_scores(scores)
        pooled = _weighted_mean([s for s in scores.values() if s.kind is TrackKind.BASELINE])
        pairs = [
            TrainingPair(
                input_key=s.input_key,
                input_song_ids=provenances[s.track_id].input_song_ids,
                target_track_id=s.track_id,
                weight=float(w),
                score=s.score,
                margin=float(dj),
                iteration=iteration,
                model_version=provenances[s.track_id].model_version,
                embedding=tuple(float(v) for v in embeddings[s.track_id]),
                # the control's ratings deal nothing, champions included
                beat_baseline=(self.rng is None and s.score > baseline.get(s.input_key, pooled)),
            )
            for s, w, dj in zip(rows, weight, d, strict=True)
        ]
        kept, guard = diversity_guard(
            pairs, self.near_duplicate, max(len(pairs), 1), by_weight=True
        )
        dropped.update(guard)
        survivors = int((d > 0).sum())
        return SelectionResult(kept, survivors, len(generated), dict(dropped), baseline)


def _unrated_pair(
    prov: TrackProvenance, embeddings: Mapping[str, np.ndarray], iteration: int
) -> TrainingPair:
    """A control arm's pair toward ``prov``'s track: ω = 1, no score, no margin, never a
    champion."""
    return TrainingPair(
        input_key=prov.input_key,
        input_song_ids=prov.input_song_ids,
        target_track_id=prov.track_id,
        weight=1.0,
        score=float("nan"),
        margin=0.0,
        iteration=iteration,
        model_version=prov.model_version,
        embedding=tuple(float(v) for v in embeddings[prov.track_id]),
        beat_baseline=False,
    )


def baseline_scores(scores: Mapping[str, TrackScored]) -> dict[str, float]:
    """R_b per input key: the ω-weighted mean R of its baseline tracks."""
    by_input: dict[str, list[TrackScored]] = defaultdict(list)
    for s in scores.values():
        if s.kind is TrackKind.BASELINE:
            by_input[s.input_key].append(s)
    return {k: _weighted_mean(v) for k, v in by_input.items()}


def _weighted_mean(rows: Sequence[TrackScored]) -> float:
    w = np.array([r.omega for r in rows], dtype=float)
    if not rows or w.sum() <= 0:
        return float(np.mean([r.score for r in rows])) if rows else 3.0
    return float(np.dot(w, [r.score for r in rows]) / w.sum())


@dataclass(frozen=True, slots=True)
class PurgeResult:
    kept: list[TrainingPair]
    dropped: dict[str, int]


class PurgeCycle:
    """At each iteration boundary, in this order:

    1. stale: a pair selected ``max_age`` or more iterations ago is dropped (the model it beat
       is gone);
    2. outdone: a pair whose R no longer beats the current model's mean R on the same input is
       dropped (it would pull the model backwards);
    3. near-duplicates and the per-input cap: the diversity guard over old and new pairs
       together, best ω·margin first, so no mode can fill the set.
    """

    def __init__(self, max_age: int = 2, near_duplicate: float = 0.0, cap_per_input: int = 3):
        self.max_age = max_age
        self.near_duplicate = near_duplicate
        self.cap_per_input = cap_per_input

    def apply(
        self,
        pairs: Sequence[TrainingPair],
        iteration: int,
        current_model_score: Mapping[str, float],
    ) -> PurgeResult:
        dropped: Counter[str] = Counter()
        fresh: list[TrainingPair] = []
        for p in pairs:
            if iteration - p.iteration >= self.max_age:
                dropped["stale"] += 1
            elif p.input_key in current_model_score and p.score <= current_model_score[p.input_key]:
                dropped["outdone"] += 1
            else:
                fresh.append(p)
        kept, guard = diversity_guard(fresh, self.near_duplicate, self.cap_per_input)
        dropped.update(guard)
        return PurgeResult(kept, dict(dropped))


def model_score_by_input(
    scores: Mapping[str, TrackScored],
    model_version: str,
    provenances: Mapping[str, TrackProvenance],
) -> dict[str, float]:
    """Mean R of ``model_version``'s generations per input key (what a pair must still beat)."""
    rows: dict[str, list[TrackScored]] = defaultdict(list)
    for s in scores.values():
        if s.kind is TrackKind.GENERATED and provenances[s.track_id].model_version == model_version:
            rows[s.input_key].append(s)
    return {k: _weighted_mean(v) for k, v in rows.items()}
