from __future__ import annotations

import numpy as np
import pytest

from riffloop.core import ValidationError
from riffloop.loop import (
    GeneticSelector,
    PurgeCycle,
    RandomSelector,
    TrackKind,
    TrackProvenance,
    TrackScored,
    TrainingPair,
    WeightedSelector,
    cosine_distance,
    diversity_guard,
    manifest_json,
)

pytestmark = pytest.mark.unit


def _scored(tid: str, kind: TrackKind, key: str, r: float, omega: float = 0.8) -> TrackScored:
    return TrackScored(tid, kind, key, r, omega, 5, 4.0, r)


def _world(rng: np.random.Generator, n_inputs: int = 6, gens: int = 6):
    scores, provs, embs = {}, {}, {}
    for i in range(n_inputs):
        key = f"s{i}"
        for g in range(gens + 1):
            kind = TrackKind.BASELINE if g == 0 else TrackKind.GENERATED
            tid = f"{key}-{g}"
            provs[tid] = TrackProvenance(tid, kind, "v0", (key,), g, 0.5, 20, 10, f"tr{i}")
            scores[tid] = _scored(tid, kind, key, 3.0 if g == 0 else float(rng.normal(3, 1)))
            embs[tid] = rng.normal(size=16)
    return scores, provs, embs


def test_survivors_beat_their_own_inputs_baseline() -> None:
    scores, provs, embs = _world(np.random.default_rng(0))
    scores["s0-0"] = _scored("s0-0", TrackKind.BASELINE, "s0", 4.5)  # a strong baseline
    res = GeneticSelector(cap_per_input=10, near_duplicate=0.0).select(scores, provs, embs, 1)
    assert res.pairs
    for p in res.pairs:
        assert p.score > res.baseline_score[p.input_key]
        assert p.margin == pytest.approx(p.score - res.baseline_score[p.input_key])
        assert p.weight == scores[p.target_track_id].omega
    expected = sum(
        s.kind is TrackKind.GENERATED and s.score > res.baseline_score[s.input_key]
        for s in scores.values()
    )
    assert res.survivors == expected == len(res.pairs)
    assert '"pairs"' in manifest_json(res.pairs, "ts1")


def test_top_quartile_is_stricter() -> None:
    scores, provs, embs = _world(np.random.default_rng(1))
    loose = GeneticSelector(cap_per_input=10, near_duplicate=0.0).select(scores, provs, embs, 1)
    strict = GeneticSelector(top_quartile=True, cap_per_input=10, near_duplicate=0.0).select(
        scores, provs, embs, 1
    )
    assert {p.target_track_id for p in strict.pairs} <= {p.target_track_id for p in loose.pairs}
    assert len(strict.pairs) < len(loose.pairs)


def test_diversity_guard_removes_near_duplicates_and_caps_inputs() -> None:
    rng = np.random.default_rng(2)
    base = rng.normal(size=8)
    pairs = [
        TrainingPair(
            "a",
            ("a",),
            f"dup{i}",
            0.9,
            4.0,
            1.0 - i * 0.01,
            1,
            "v0",
            tuple(base + 1e-3 * rng.normal(size=8)),
        )
        for i in range(5)
    ] + [
        TrainingPair("b", ("b",), f"b{i}", 0.9, 4.0, 0.5, 1, "v0", tuple(rng.normal(size=8)))
        for i in range(5)
    ]
    kept, dropped = diversity_guard(pairs, near_duplicate=0.05, cap_per_input=3)
    assert [p.target_track_id for p in kept if p.input_key == "a"] == ["dup0"]  # best one stays
    assert sum(p.input_key == "b" for p in kept) == 3
    assert dropped["near_duplicate"] == 4 and dropped["cap_per_input"] == 2
    for i, p in enumerate(kept):
        for q in kept[i + 1 :]:
            assert cosine_distance(np.array(p.embedding), np.array(q.embedding)) >= 0.05


def _mean_pairwise(pairs: list[TrainingPair]) -> float:
    e = np.array([p.embedding for p in pairs])
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    d = 1 - e @ e.T
    return float(d[np.triu_indices(len(e), 1)].mean())


def test_purge_drops_stale_and_outdone_and_keeps_diversity() -> None:
    rng = np.random.default_rng(3)
    mode = rng.normal(size=8)
    old = [
        TrainingPair(
            f"in{i}", (f"in{i}",), f"old{i}", 0.8, 3.5, 0.5, 0, "v0", tuple(rng.normal(size=8))
        )
        for i in range(6)
    ]
    # a collapsing iteration: many new targets all near one mode
    new = [
        TrainingPair(
            f"in{i % 6}",
            (f"in{i % 6}",),
            f"new{i}",
            0.9,
            4.2,
            1.0,
            2,
            "v1",
            tuple(mode + 0.01 * rng.normal(size=8)),
        )
        for i in range(12)
    ]
    purge = PurgeCycle(max_age=2, near_duplicate=0.05, cap_per_input=3)
    res = purge.apply(old + new, iteration=2, current_model_score={"in0": 4.5})
    assert res.dropped["stale"] == 6  # iteration 0 pairs at boundary 2
    assert res.dropped["outdone"] == 2  # in0 targets score 4.2 ≤ current model's 4.5
    assert all(p.input_key != "in0" for p in res.kept)
    assert len(res.kept) == 1  # one representative of the collapsed mode

    # over several boundaries with a collapsing generator, purge keeps the set more diverse
    pool_on: list[TrainingPair] = []
    pool_off: list[TrainingPair] = []
    for it in range(1, 5):
        spread = 1.0 / it  # the generator's outputs collapse as iterations go on
        fresh = [
            TrainingPair(
                f"in{i}",
                (f"in{i}",),
                f"g{it}-{i}",
                0.9,
                4.0,
                0.5,
                it,
                "v",
                tuple(mode + spread * rng.normal(size=8)),
            )
            for i in range(6)
        ]
        pool_on = purge.apply(pool_on + fresh, it, {}).kept
        pool_off = pool_off + fresh

    def near_dups(pairs: list[TrainingPair]) -> int:
        e = [np.array(p.embedding) for p in pairs]
        return sum(cosine_distance(a, b) < 0.05 for i, a in enumerate(e) for b in e[i + 1 :])

    assert near_dups(pool_on) == 0 < near_dups(pool_off)
    # against the recency-only alternative of the same size, purge keeps a wider spread
    assert _mean_pairwise(pool_on) > _mean_pairwise(pool_off[-len(pool_on) :])


def test_random_selector_ignores_scores_and_is_seeded() -> None:
    _scores, provs, embs = _world(np.random.default_rng(4))
    a = RandomSelector(seed=5).select(list(provs.values()), embs, 8, 1)
    b = RandomSelector(seed=5).select(list(provs.values()), embs, 8, 1)
    assert [p.target_track_id for p in a] == [p.target_track_id for p in b]
    assert len(a) == 8 and all(p.weight == 1.0 for p in a)
    assert all(provs[p.target_track_id].kind is TrackKind.GENERATED for p in a)


def test_preference_pairs_name_the_inputs_lowest_losing_generation() -> None:
    scores, provs, embs = _world(np.random.default_rng(6))
    # s1: no generation below its baseline, so its survivors have no loser and are dropped
    scores["s1-0"] = _scored("s1-0", TrackKind.BASELINE, "s1", -10.0)
    plain = GeneticSelector(cap_per_input=10, near_duplicate=0.0).select(scores, provs, embs, 1)
    res = GeneticSelector(cap_per_input=10, near_duplicate=0.0, preference=True).select(
        scores, provs, embs, 1
    )
    assert res.survivors == plain.survivors and all(not p.loser_track_id for p in plain.pairs)
    assert res.dropped["no_loser"] == sum(p.input_key == "s1" for p in plain.pairs) > 0
    assert {p.target_track_id for p in res.pairs} == {
        p.target_track_id for p in plain.pairs if p.input_key != "s1"
    }
    for p in res.pairs:
        loser = scores[p.loser_track_id]
        assert loser.kind is TrackKind.GENERATED and loser.input_key == p.input_key
        assert loser.score < res.baseline_score[p.input_key] < p.score
        same_input = [
            s.score
            for s in scores.values()
            if s.kind is TrackKind.GENERATED and s.input_key == p.input_key
        ]
        assert loser.score == min(same_input)
    assert '"loser_track_id"' in manifest_json(res.pairs, "ts1")


def test_a_random_arms_preference_pairs_are_two_generations_of_one_input_in_random_order() -> None:
    _scores, provs, embs = _world(np.random.default_rng(7), n_inputs=4, gens=5)
    pairs = RandomSelector(seed=3, preference=True).select(list(provs.values()), embs, 30, 1)
    again = RandomSelector(seed=3, preference=True).select(list(provs.values()), embs, 30, 1)
    assert [(p.target_track_id, p.loser_track_id) for p in pairs] == [
        (p.target_track_id, p.loser_track_id) for p in again
    ]
    assert len(pairs) == 30 and all(p.weight == 1.0 for p in pairs)
    unordered = {frozenset((p.target_track_id, p.loser_track_id)) for p in pairs}
    assert len(unordered) == 30  # drawn without replacement out of 4 × C(5, 2) = 40
    for p in pairs:
        winner, loser = provs[p.target_track_id], provs[p.loser_track_id]
        assert winner.kind is loser.kind is TrackKind.GENERATED
        assert winner.input_key == loser.input_key and winner.track_id != loser.track_id
    # the coin: generation ids are ordered within an input, the order of a pair is not
    first_is_lower = [p.target_track_id < p.loser_track_id for p in pairs]
    assert 5 <= sum(first_is_lower) <= 25


def test_weighted_selection_trains_every_compared_generation_by_its_rating_within_its_input() -> (
    None
):
    scores, provs, embs = _world(np.random.default_rng(4))
    # an input whose generations all rate high: its tracks weigh no more than another input's
    for g in range(1, 7):
        tid = f"s1-{g}"
        scores[tid] = _scored(tid, TrackKind.GENERATED, "s1", scores[tid].score + 1.5)
    # an input with one generation has nothing to be compared with
    provs["lone-1"] = TrackProvenance("lone-1", TrackKind.GENERATED, "v0", ("x",), 1, 0.5, 20, 10)
    scores["lone-1"] = _scored("lone-1", TrackKind.GENERATED, "lone", 5.0)
    embs["lone-1"] = np.random.default_rng(9).normal(size=16)
    res = WeightedSelector(near_duplicate=0.0).select(scores, provs, embs, 2)
    assert len(res.pairs) == 36 and res.dropped == {"single": 1}
    by_input: dict[str, list[TrainingPair]] = {}
    for p in res.pairs:
        by_input.setdefault(p.input_key, []).append(p)
    for key, pairs in by_input.items():
        ratings = np.array([p.score for p in pairs])
        assert [p.margin for p in pairs] == pytest.approx(ratings - ratings.mean())  # ω alike
        ranked = sorted(pairs, key=lambda p: p.score)
        assert [p.weight for p in ranked] == sorted(p.weight for p in pairs), key
    # the same shift of every rating of an input leaves its weights as they were
    s1 = sum(p.weight for p in by_input["s1"]) / 6
    others = np.mean([sum(p.weight for p in v) / 6 for k, v in by_input.items() if k != "s1"])
    assert 0.3 < s1 / others < 3
    assert res.survivors == sum(p.margin > 0 for p in res.pairs)
    # every compared generation trains; only those that beat their baseline may be champions
    for p in res.pairs:
        assert p.beat_baseline == (p.score > res.baseline_score[p.input_key])
    assert any(p.beat_baseline for p in res.pairs) and not all(p.beat_baseline for p in res.pairs)


def test_a_weighted_arms_control_shuffles_the_weights_within_each_input() -> None:
    scores, provs, embs = _world(np.random.default_rng(5))
    selected = WeightedSelector(near_duplicate=0.0).select(scores, provs, embs, 1)
    control = WeightedSelector(near_duplicate=0.0, permute_seed=7).select(scores, provs, embs, 1)
    again = WeightedSelector(near_duplicate=0.0, permute_seed=7).select(scores, provs, embs, 1)
    assert [p.weight for p in control.pairs] == [p.weight for p in again.pairs]  # seeded
    weights = {p.target_track_id: p.weight for p in selected.pairs}
    shuffled = {p.target_track_id: p.weight for p in control.pairs}
    assert weights.keys() == shuffled.keys()  # the same tracks train
    for key in {p.input_key for p in selected.pairs}:
        mine = sorted(w for t, w in weights.items() if t.startswith(f"{key}-"))
        theirs = sorted(w for t, w in shuffled.items() if t.startswith(f"{key}-"))
        assert mine == pytest.approx(theirs)  # ω = 0.8 alike: only who gets which moves
    assert weights != pytest.approx(shuffled)
    assert not any(p.beat_baseline for p in control.pairs)  # no rating crowns a champion
    # the selected arm's weights follow the ratings; the control's do not
    r = np.array([scores[t].score for t in weights])
    assert np.corrcoef(r, list(weights.values()))[0, 1] > 0.5
    assert abs(np.corrcoef(r, [shuffled[t] for t in weights])[0, 1]) < 0.5


def test_weighted_selection_drops_near_duplicates_only_when_asked() -> None:
    scores, provs, embs = _world(np.random.default_rng(6))
    embs["s0-2"] = embs["s0-1"] + 1e-6  # a collapsed pair
    # by default siblings train however near they lie (the weights are made of them)
    assert len(WeightedSelector().select(scores, provs, embs, 1).pairs) == 36
    res = WeightedSelector(near_duplicate=0.01).select(scores, provs, embs, 1)
    assert res.dropped == {"near_duplicate": 1} and len(res.pairs) == 35
    kept = {p.target_track_id for p in res.pairs} & {"s0-1", "s0-2"}
    heavier = max(("s0-1", "s0-2"), key=lambda t: scores[t].score)
    assert kept == {heavier}
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValidationError, match="temperature"):
            WeightedSelector(temperature=bad)
