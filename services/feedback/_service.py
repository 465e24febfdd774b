"""The feedback service: ratings and listens in, per-track scores (R, ω, n) out.

Domain logic is riffloop.loop's: ``FeedbackLedger`` validates and records, ``SpamFilter`` finds
spammers and rater reliability ρ, ``ConfidenceWeight`` gives R and ω. This shell only moves events:

1. tracks.ready.v1 → register the track's provenance and mark it served to its user.
2. feedback.received.v1 (one FeedbackReceived, or a FeedbackBatch of one user's items) →
   ``ledger.rate`` / ``ledger.listen``; a duplicate (ConflictError) is
   the same rating delivered again and is ignored, so every accepted rating counts exactly once.
   Each accepted input is also written to the key-value store as an upsert keyed by
   (track, rater), from which a restarted process rebuilds the ledger (kill -9 safe: the
   rebuilt ledger plus Kafka's redelivery of uncommitted records gives the same state).
3. Every ``score_interval_s`` the scorer re-scores (ω depends on all raters) and publishes
   tracks.scored.v1 for the tracks whose feedback changed, in TrackScoredBatch chunks.
4. The same pass writes the mean rating of every model version (generated and baseline tracks
   apart) to ``fb:model-ratings`` and the ``riffloop_mean_rating`` gauge: the read model the
   gateway's ListModels serves, so no other service has to replay tracks.scored.v1 to know it.

Key-value layout: ``fb:tracks`` hash track → JSON {provenance, clip_seconds, served_to};
``fb:ratings:<track>`` hash rater → JSON rating; ``fb:listens:<track>`` hash rater → JSON listen;
``fb:model-ratings`` hash version → JSON :class:`ModelRatings` (read by the gateway).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from typing import Any

from riffloop.core import (
    ConfigurationError,
    ConflictError,
    NotFoundError,
    ValidationError,
)
from riffloop.loop import (
    ConfidenceWeight,
    FeedbackLedger,
    ListenEvent,
    Rating,
    SpamFilter,
    SpamReport,
    TrackKind,
    TrackProvenance,
    TrackScored,
)
from riffloop.runtime import (
    MODEL_RATINGS_KEY,
    TRACK_SCORES_KEY,
    ServiceSettings,
    metrics,
    provenance_from_proto,
    track_scored_to_proto,
)
from riffloop.v1 import events_pb2
from riffloop.v1 import feedback_service_pb2 as pb
from riffloop.v1 import feedback_service_pb2_grpc as pb_grpc

_log = logging.getLogger("riffloop.feedback")

# Scores per TrackScoredBatch record: ≈ 150 bytes each, so a record stays near 75 kB, far under
# Kafka's 1 MB default message limit, and a consumer's retry of one record redoes little.
SCORES_PER_RECORD = 500


@dataclasses.dataclass(frozen=True)
class ModelRatings:
    """What listeners think of one model version: Σ_j R_j·n_j / Σ_j n_j over its tracks j
    (R_j the track's score, n_j its accepted ratings), generated and baseline tracks apart —
    the baseline z0 is served under the version that was current, so the pair compares the
    model with its own training data on the same requests."""

    generated_mean: float = 0.0
    generated_count: int = 0
    baseline_mean: float = 0.0
    baseline_count: int = 0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def model_ratings(
    scores: dict[str, TrackScored], provenance: dict[str, TrackProvenance]
) -> dict[str, ModelRatings]:
    """Per-version aggregates of the latest scores (tracks without a version are skipped)."""
    sums: dict[tuple[str, TrackKind], tuple[float, int]] = {}  # → (Σ R_j n_j, Σ n_j)
    for track_id, score in scores.items():
        prov = provenance.get(track_id)
        if prov is None or not prov.model_version or score.n_ratings <= 0:
            continue
        total, count = sums.get((prov.model_version, prov.kind), (0.0, 0))
        sums[(prov.model_version, prov.kind)] = (
            total + score.score * score.n_ratings,
            count + score.n_ratings,
        )

    def mean(version: str, kind: TrackKind) -> tuple[float, int]:
        total, count = sums.get((version, kind), (0.0, 0))
        return (total / count if count else 0.0), count

    return {
        version: ModelRatings(
            *mean(version, TrackKind.GENERATED), *mean(version, TrackKind.BASELINE)
        )
        for version in {version for version, _ in sums}
    }


@dataclasses.dataclass(frozen=True, repr=False)
class FeedbackSettings(ServiceSettings):
    service_name: str = "feedback"
    grpc_port: int = 50054
    metrics_port: int = 9104
    # How often changed tracks are re-scored and tracks.scored.v1 published.
    score_interval_s: float = 2.0
    # The most of its time the scorer may spend scoring: a pass re-scores every rating (ω pools
    # all raters), so it grows with the ledger; after a pass of T seconds the next waits at least
    # T·(1 − d)/d. Scores then arrive less often on a large ledger instead of the pass taking a
    # whole core from the consumer and from whatever shares the node.
    score_max_duty: float = 0.25
    # The process's sys.setswitchinterval. The scorer is pure Python CPU under the interpreter
    # lock; with the default 5 ms, the consumer thread waited up to 5 ms for the lock after each
    # of its Redis and Kafka calls during a pass (the convoy effect) and fell behind: 5,204
    # ratings/s end to end at 6,000/s offered, against 5,965/s with 1 ms (bench/README.md).
    gil_switch_interval_s: float = 0.001

    def _validate(self) -> None:
        super()._validate()
        if not 1e-5 <= self.gil_switch_interval_s <= 0.1:
            raise ConfigurationError("RIFFLOOP_GIL_SWITCH_INTERVAL_S must lie in [1e-5, 0.1] s")
        if self.score_interval_s <= 0:
            raise ConfigurationError("RIFFLOOP_SCORE_INTERVAL_S must be positive")
        if not 0 < self.score_max_duty <= 1:
            raise ConfigurationError("RIFFLOOP_SCORE_MAX_DUTY must be in (0, 1]")

    def score_wait_s(self, last_pass_s: float) -> float:
        """Seconds until the next scoring pass, given how long the last one took."""
        d = self.score_max_duty
        return max(self.score_interval_s, last_pass_s * (1 - d) / d)


class FeedbackState:
    """The ledger, its key-value mirror and the latest scores; one lock guards them."""

    def __init__(
        self,
        ports: Any,
        *,
        spam: SpamFilter | None = None,
        confidence: ConfidenceWeight | None = None,
    ) -> None:
        self.ports = ports
        self.lock = threading.Lock()
        self.ledger = FeedbackLedger()
        self.spam = spam or SpamFilter()
        self.confidence = confidence or ConfidenceWeight()
        self.scores: dict[str, TrackScored] = {}
        self.report: SpamReport | None = None
        self.dirty: set[str] = set()
        self.model_ratings: dict[str, ModelRatings] = {}
        self._model_ratings_written: dict[str, str] = {}
        self._caught_seen: set[tuple[str, str]] = set()

    # -- rebuild ------------------------------------------------------------------------------

    def rebuild(self) -> int:
        """Reload every track, rating and listen from the key-value store; return ratings."""
        kv = self.ports.kv
        ratings = 0
        with self.lock:
            self.ledger = FeedbackLedger()
            for raw in kv.hgetall("fb:tracks").values():
                self._register(json.loads(raw))
            for track_id in list(self._track_ids()):
                for raw in kv.hgetall(f"fb:ratings:{track_id}").values():
                    self._apply_rating(Rating(**json.loads(raw)))
                    ratings += 1
                for raw in kv.hgetall(f"fb:listens:{track_id}").values():
                    self._apply_listen(ListenEvent(**json.loads(raw)))
                self.dirty.add(track_id)
        return ratings

    def _track_ids(self) -> list[str]:
        return [p.track_id for p in self.ledger.provenances()]

    def _register(self, record: dict[str, Any]) -> None:
        prov = TrackProvenance.from_json(record["provenance"])
        self.ledger.register_track(prov, float(record["clip_seconds"]))
        for user, served_at in record["served_to"].items():
            self.ledger.mark_served(prov.track_id, user, float(served_at))

    def _apply_rating(self, rating: Rating) -> bool:
        try:
            self.ledger.rate(rating)
        except ConflictError:
            return False
        return True

    def _apply_listen(self, event: ListenEvent) -> bool:
        try:
            self.ledger.listen(event)
        except ConflictError:
            return False
        return True

    # -- events -------------------------------------------------------------------------------

    def on_track_ready(self, envelope: events_pb2.Envelope) -> None:
        ready = envelope.track_ready
        prov = provenance_from_proto(ready.track_id, ready.provenance)
        served_at = envelope.occurred_at.ToNanoseconds() / 1e9
        record = {
            "provenance": prov.to_json(),
            "clip_seconds": ready.duration_seconds,
            "served_to": {ready.user_id: served_at} if ready.user_id else {},
        }
        with self.lock:
            self._register(record)
        self.ports.kv.hset("fb:tracks", {ready.track_id: json.dumps(record)})

    def on_feedback(self, envelope: events_pb2.Envelope) -> None:
        """One FeedbackReceived, or a FeedbackBatch (one user's items from one SubmitFeedback
        call) applied item by item. All of a batch's tracks must be known before any item is
        applied, so a batch retried after NotFoundError is applied whole, once."""
        submitted_at = envelope.occurred_at.ToNanoseconds() / 1e9
        batched = envelope.WhichOneof("payload") == "feedback_batch"
        events = list(envelope.feedback_batch.items) if batched else [envelope.feedback_received]
        writes: dict[str, dict[str, str]] = {}
        recorded = {"rating": 0, "listen": 0}
        with self.lock:
            # A rating can overtake its tracks.ready (other topic, other partition): the track
            # is unknown yet, NotFoundError is retried by the consumer with back-off.
            for event in events:
                self.ledger.provenance(event.track_id)
            for event in events:
                try:
                    kind, table, value, fresh = self._record(event, submitted_at)
                except ValidationError as exc:
                    if not batched:
                        raise  # a poison event: the consumer dead-letters it
                    # one bad item must not sink the user's other items (the gateway checked
                    # them all, so this is a bug or a replay of old data: log it, count it)
                    _log.warning(
                        "feedback item refused",
                        extra={"event_id": envelope.event_id, "reason": exc.reason},
                    )
                    metrics.FEEDBACK_RECORDED.labels(
                        event.WhichOneof("feedback") or "none", "refused"
                    ).inc()
                    continue
                self.dirty.add(event.track_id)
                if fresh:
                    recorded[kind] += 1
                    writes.setdefault(f"fb:{table}:{event.track_id}", {})[event.user_id] = (
                        json.dumps(_row(value))
                    )
        if writes:
            # Upserts keyed by (track, rater): writing them again after a crash changes nothing.
            self.ports.kv.hset_many(writes)
        for kind, n in recorded.items():
            if n:
                metrics.FEEDBACK_RECORDED.labels(kind, "recorded").inc(n)

    def _record(
        self, event: events_pb2.FeedbackReceived, submitted_at: float
    ) -> tuple[str, str, Rating | ListenEvent, bool]:
        """Apply one item to the ledger: (kind, key-value table, the item, fresh?)."""
        which = event.WhichOneof("feedback")
        if which == "rating":
            rating = Rating(event.track_id, event.user_id, int(event.rating.stars), submitted_at)
            return "rating", "ratings", rating, self._apply_rating(rating)
        if which == "listen":
            listen = ListenEvent(
                track_id=event.track_id,
                rater_id=event.user_id,
                seconds_listened=float(event.listen.seconds_listened),
                clip_seconds=float(event.listen.clip_seconds),
                completed=bool(event.listen.completed),
                skipped=not event.listen.completed,
                submitted_at=submitted_at,
            )
            return "listen", "listens", listen, self._apply_listen(listen)
        raise ValidationError(f"feedback for track {event.track_id} carries no rating or listen")

    # -- scoring ------------------------------------------------------------------------------

    def score_changed(self) -> list[events_pb2.TrackScored]:
        """Re-score everything (ω pools all raters); return the payloads of changed tracks."""
        with self.lock:
            if not self.dirty:
                return []
            changed, self.dirty = self.dirty, set()
            observations = self.ledger.observations()
            provenance = {p.track_id: p for p in self.ledger.provenances()}
        if not observations:
            return []
        # The O(N) statistics run outside the lock, so the consumer keeps recording meanwhile.
        report = self.spam.inspect(observations)
        scores = self.confidence.score(observations, report)
        ratings = model_ratings(scores, provenance)
        with self.lock:
            self.scores, self.report, self.model_ratings = scores, report, ratings
        publish = changed & scores.keys()
        listened: dict[str, list[float]] = {}
        for o in observations:
            if o.track_id in publish:
                listened.setdefault(o.track_id, []).append(o.listened_fraction)
        out = []
        for track_id in sorted(publish):
            fractions = listened.get(track_id, [0.0])
            out.append(
                track_scored_to_proto(
                    scores[track_id], provenance[track_id], sum(fractions) / len(fractions)
                )
            )
        for rater, reasons in report.caught.items():
            for reason in reasons:
                if (rater, str(reason)) not in self._caught_seen:
                    self._caught_seen.add((rater, str(reason)))
                    metrics.SPAM_CAUGHT.labels(str(reason)).inc()
        return out

    def write_model_ratings(self) -> None:
        """Write the per-version aggregates that changed to ``fb:model-ratings`` and set the
        ``riffloop_mean_rating`` gauge (the feedback service owns the scores, so it owns this)."""
        with self.lock:
            ratings = dict(self.model_ratings)
        fresh = {v: r.to_json() for v, r in ratings.items()}
        changed = {v: raw for v, raw in fresh.items() if self._model_ratings_written.get(v) != raw}
        if changed:
            self.ports.kv.hset_many({MODEL_RATINGS_KEY: changed})
            self._model_ratings_written.update(changed)
        for version, r in ratings.items():
            if r.generated_count:
                metrics.MEAN_RATING.labels(version).set(r.generated_mean)

    def publish_scores(self) -> int:
        """One scoring pass: publish the changed tracks' scores as TrackScoredBatch chunks of
        ``SCORES_PER_RECORD``, all keyed ``TRACK_SCORES_KEY`` (one partition, so consumers read
        the passes in order), then refresh the per-version read model.

        One record per track, each waiting for its ack, took ≈ 1 ms of broker round trip and
        ≈ 0.1 ms of Python per score: 10,000 changed tracks (2 s of ratings at 5,000/s) kept the
        pass busy for longer than its interval and competed with the gateway for the CPU."""
        payloads = self.score_changed()
        for start in range(0, len(payloads), SCORES_PER_RECORD):
            chunk = payloads[start : start + SCORES_PER_RECORD]
            try:
                self.ports.publish(
                    "tracks.scored.v1",
                    TRACK_SCORES_KEY,
                    events_pb2.TrackScoredBatch(items=chunk),
                )
            except BaseException:
                with self.lock:  # not published: score them again on the next pass
                    self.dirty |= {p.track_id for p in payloads[start:]}
                raise
        self.write_model_ratings()  # every pass: cheap when nothing changed, retries a failure
        return len(payloads)


def _row(item: Rating | ListenEvent) -> dict[str, Any]:
    """The key-value row of a rating or listen (``dataclasses.asdict`` without its deep copy,
    a third of the consumer's time per item)."""
    return {f.name: getattr(item, f.name) for f in dataclasses.fields(item)}


class FeedbackServicer(pb_grpc.FeedbackServiceServicer):
    def __init__(self, state: FeedbackState) -> None:
        self.state = state

    def TrackScore(self, request: pb.TrackScoreRequest, context: Any) -> pb.TrackScoreResponse:
        if not request.track_id:
            raise ValidationError("track_id is required")
        state = self.state
        with state.lock:
            try:
                prov = state.ledger.provenance(request.track_id)
            except NotFoundError:
                raise NotFoundError(f"track {request.track_id} is unknown to feedback") from None
            score = state.scores.get(request.track_id)
            ratings = sum(1 for o in state.ledger.observations() if o.track_id == prov.track_id)
        if score is None:
            message = events_pb2.TrackScored(track_id=request.track_id, rating_count=ratings)
        else:
            message = track_scored_to_proto(score, prov)
            # Ratings accepted since the last scoring pass count too.
            message.rating_count = ratings
        return pb.TrackScoreResponse(score=message)

    def RaterReport(self, request: pb.RaterReportRequest, context: Any) -> Any:
        if not request.user_id:
            raise ValidationError("user_id is required")
        state = self.state
        with state.lock:
            mine = [o for o in state.ledger.observations() if o.rater_id == request.user_id]
            report = state.report
        if not mine:
            raise NotFoundError(f"rater {request.user_id} has no accepted ratings")
        stars = [o.stars for o in mine]
        mean = sum(stars) / len(stars)
        std = (sum((x - mean) ** 2 for x in stars) / len(stars)) ** 0.5
        reasons = [str(r) for r in (report.caught.get(request.user_id, ()) if report else ())]
        reliability = report.reliability.get(request.user_id, 1.0) if report else 1.0
        return pb.RaterReportResponse(
            user_id=request.user_id,
            accepted_ratings=len(mine),
            rejected_ratings=0,
            reliability=reliability,
            flagged=bool(reasons),
            reasons=reasons,
            mean_stars=mean,
            stddev_stars=std,
        )
