from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from riffloop.core import (
    ConflictError,
    NotFoundError,
    PermissionDeniedError,
    ValidationError,
)
from riffloop.loop import (
    Dispatcher,
    FeedbackLedger,
    ListenEvent,
    RaterNormaliser,
    Rating,
    TrackKind,
    TrackProvenance,
)

pytestmark = pytest.mark.unit


def _prov(track_id: str = "t1", kind: TrackKind = TrackKind.GENERATED) -> TrackProvenance:
    return TrackProvenance(track_id, kind, "v0", ("a", "b"), 3, 0.5, 20, 10, "train-1")


def test_dispatch_share_is_bernoulli_p_and_reproducible() -> None:
    d = Dispatcher(baseline_share=0.25, key=1)
    kinds = [d.kind_for(f"req{i}") for i in range(4000)]
    share = sum(k is TrackKind.BASELINE for k in kinds) / len(kinds)
    # binomial sd at n=4000 is 0.0068: 4σ band
    assert abs(share - 0.25) < 0.028
    assert kinds == [Dispatcher(0.25, key=1).kind_for(f"req{i}") for i in range(4000)]
    other = [Dispatcher(0.25, key=2).kind_for(f"req{i}") for i in range(4000)]
    assert other != kinds


def test_dispatch_provenance_records_everything_and_hides_the_kind() -> None:
    d = Dispatcher(baseline_share=0.5, key=3)
    calls: list[int] = []

    def nearest() -> str:
        calls.append(1)
        return "train-9"

    provs = [d.dispatch(f"r{i}", ["x", "y"], 0.6, 30, "v2", 12, nearest) for i in range(50)]
    assert len(calls) == 50
    for p in provs:
        assert p.baseline_sample_id == "train-9" and p.model_version == "v2"
        assert p.start_step == (12 if p.kind is TrackKind.GENERATED else None)
        assert "baseline" not in p.track_id and "generated" not in p.track_id
        assert TrackProvenance.from_json(p.to_json()) == p
    assert len({p.track_id for p in provs}) == 50
    assert {p.kind for p in provs} == {TrackKind.BASELINE, TrackKind.GENERATED}


def test_provenance_validation() -> None:
    with pytest.raises(ValidationError):
        TrackProvenance("t", TrackKind.GENERATED, "v0", ("a",), 1, 1.0, 20, 10, None)
    with pytest.raises(ValidationError):
        TrackProvenance("t", TrackKind.GENERATED, "v0", (), 1, 0.5, 20, 10, None)
    with pytest.raises(ValidationError):
        TrackProvenance("t", TrackKind.BASELINE, "v0", ("a",), 1, 0.5, 20, None, None)
    with pytest.raises(ValidationError):
        Dispatcher(baseline_share=1.5, key=0)


@pytest.fixture
def ledger() -> FeedbackLedger:
    led = FeedbackLedger(tolerance_s=0.5)
    led.register_track(_prov("t1"), 1.5)
    led.register_track(_prov("t2"), 1.5)
    led.mark_served("t1", "alice", 0.0)
    led.mark_served("t2", "alice", 0.0)
    return led


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda: Rating("nope", "alice", 3, 1.0), NotFoundError),
        (lambda: Rating("t1", "alice", 0, 1.0), ValidationError),
        (lambda: Rating("t1", "alice", 6, 1.0), ValidationError),
        (lambda: Rating("t1", "alice", 3.5, 1.0), ValidationError),
        (lambda: Rating("t1", "alice", True, 1.0), ValidationError),
        (lambda: Rating("t1", "alice", 3, float("nan")), ValidationError),
        (lambda: Rating("t1", "bob", 3, 1.0), PermissionDeniedError),
    ],
)
def test_bad_ratings_raise_typed_errors_and_change_nothing(
    ledger: FeedbackLedger, make, error
) -> None:
    ledger.rate(Rating("t2", "alice", 4, 0.5))
    before = ledger.snapshot()
    with pytest.raises(error):
        ledger.rate(make())
    assert ledger.snapshot() == before


@pytest.mark.parametrize(
    ("event", "error"),
    [
        (ListenEvent("t1", "alice", 2.5, 1.5, True, False, 1.0), ValidationError),  # > clip + tol
        (ListenEvent("t1", "alice", -1.0, 1.5, False, True, 1.0), ValidationError),
        (ListenEvent("t1", "alice", 1.0, 9.0, False, True, 1.0), ValidationError),  # wrong clip
        (ListenEvent("t1", "bob", 1.0, 1.5, False, True, 1.0), PermissionDeniedError),
        (ListenEvent("zz", "alice", 1.0, 1.5, False, True, 1.0), NotFoundError),
    ],
)
def test_bad_listens_raise_and_change_nothing(ledger: FeedbackLedger, event, error) -> None:
    before = ledger.snapshot()
    with pytest.raises(error):
        ledger.listen(event)
    assert ledger.snapshot() == before


def test_duplicates_conflict_and_keep_the_first(ledger: FeedbackLedger) -> None:
    ledger.rate(Rating("t1", "alice", 5, 1.0))
    ledger.listen(ListenEvent("t1", "alice", 1.6, 1.5, True, False, 1.0))  # within tolerance
    with pytest.raises(ConflictError):
        ledger.rate(Rating("t1", "alice", 1, 2.0))
    with pytest.raises(ConflictError):
        ledger.listen(ListenEvent("t1", "alice", 0.2, 1.5, False, True, 2.0))
    (obs,) = ledger.observations()
    assert obs.stars == 5 and obs.seconds_listened == pytest.approx(1.5)
    assert obs.listened_fraction == 1.0
    assert ledger.rater_stars("alice") == [5] and ledger.rater_stars("bob") == []


def test_observations_read_before_a_listen_arrives_pick_it_up_afterwards(
    ledger: FeedbackLedger,
) -> None:
    """The ledger keeps each observation between reads; a later listen must replace it."""
    ledger.rate(Rating("t1", "alice", 4, 1.0))
    (unheard,) = ledger.observations()
    assert unheard.seconds_listened == 0.0
    ledger.listen(ListenEvent("t1", "alice", 0.9, 1.5, False, True, 2.0))
    ledger.rate(Rating("t2", "alice", 2, 0.5))
    heard, first = ledger.observations()[::-1]
    assert (first.track_id, first.stars) == ("t2", 2)  # time order, not insertion order
    assert heard.track_id == "t1" and heard.seconds_listened == pytest.approx(0.9)


def test_snapshot_round_trip(ledger: FeedbackLedger) -> None:
    ledger.rate(Rating("t1", "alice", 2, 1.0))
    ledger.listen(ListenEvent("t1", "alice", 0.7, 1.5, False, True, 1.0))
    again = FeedbackLedger.restore(ledger.snapshot())
    assert again.observations() == ledger.observations()
    assert again.snapshot() == ledger.snapshot()
    assert again.rater_stars("alice") == [2]


def test_ledger_round_trips_through_the_key_value_port(ledger: FeedbackLedger) -> None:
    from riffloop.core import MemoryKeyValueStore

    kv = MemoryKeyValueStore()
    assert FeedbackLedger.load(kv).observations() == []
    ledger.rate(Rating("t1", "alice", 4, 1.0))
    ledger.save(kv)
    again = FeedbackLedger.load(kv)
    assert again.observations() == ledger.observations()
    with pytest.raises(ConflictError):  # the restored ledger still rejects the duplicate
        again.rate(Rating("t1", "alice", 1, 2.0))


def test_register_track_is_idempotent_but_rejects_a_different_provenance() -> None:
    led = FeedbackLedger()
    led.register_track(_prov("t1"), 1.5)
    led.register_track(_prov("t1"), 1.5)
    with pytest.raises(ConflictError):
        led.register_track(_prov("t1", TrackKind.BASELINE), 1.5)


def test_normaliser_removes_rater_bias_and_shrinks_small_raters() -> None:
    from riffloop.loop import Observation

    def obs(r: str, t: str, s: int) -> Observation:
        return Observation(t, r, s, 0.0, 1.5, 1.5, TrackKind.GENERATED, "a", None)

    rows = [obs("harsh", f"t{i}", s) for i, s in enumerate([1, 2, 1, 2, 1, 2, 3, 2])]
    rows += [obs("kind", f"t{i}", s) for i, s in enumerate([4, 5, 4, 5, 4, 5, 5, 4])]
    rows += [obs("new", "t0", 5)]
    norm = RaterNormaliser(prior_strength=3).fit(rows)
    raw_gap = np.mean([4, 5, 4, 5, 4, 5, 5, 4]) - np.mean([1, 2, 1, 2, 1, 2, 3, 2])
    harsh = np.mean([norm.normalise(o.rater_id, o.stars) for o in rows if o.rater_id == "harsh"])
    kind = np.mean([norm.normalise(o.rater_id, o.stars) for o in rows if o.rater_id == "kind"])
    # leniency removed up to the shrinkage k/(n+k) = 3/11 of the gap
    assert abs(kind - harsh) < 0.5 * raw_gap
    # one rating: m̃ is mostly the prior, so a 5 stays above the mean but is not erased
    assert norm.scales["new"].mean == pytest.approx((5 + 3 * norm.mu) / 4)
    assert norm.normalise("new", 5) > norm.mu


@given(st.lists(st.integers(1, 5), min_size=2, max_size=30))
def test_normalised_values_are_finite_and_order_preserving(stars: list[int]) -> None:
    from riffloop.loop import Observation

    rows = [
        Observation(f"t{i}", "r", s, 0.0, 1.0, 1.0, TrackKind.GENERATED, "a", None)
        for i, s in enumerate(stars)
    ]
    norm = RaterNormaliser().fit(rows)
    vals = norm.normalise_all(rows)
    assert np.all(np.isfinite(vals))
    order = np.argsort(stars, kind="stable")
    assert np.all(np.diff(vals[order]) >= -1e-9)
