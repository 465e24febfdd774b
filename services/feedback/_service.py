"""The feedback service: ratings and listens in, per-track scores (R, ω, n) out.

The rules are riffloop.loop's: ``FeedbackIntake`` applies tracks.ready and feedback.received
to the ``FeedbackLedger`` exactly once, mirrors them to the key-value store, parks feedback that
overtook its track and rebuilds all of it after a restart; ``SpamFilter`` finds spammers and
rater reliability ρ, ``ConfidenceWeight`` gives R and ω, ``model_ratings`` sums each model
version up. This shell moves events and counts metrics:

1. tracks.ready.v1 → ``intake.on_track_ready`` (the track's provenance, served to its user).
2. feedback.received.v1 (one FeedbackReceived, or a FeedbackBatch of one user's items) →
   ``intake.on_feedback``; a refused item raises what the consumer dead-letters.
3. Every ``score_interval_s`` the scorer re-scores (ω depends on all raters) and publishes
   tracks.scored.v1 for the tracks whose feedback changed, in TrackScoredBatch chunks. The
   pass runs in a child process fed the accepted inputs (``services.feedback._scorer``), so
   its O(N) computation never holds this process's interpreter lock.
4. The same pass writes the mean rating of every model version (generated and baseline tracks
   apart) to ``fb:model-ratings`` and the ``riffloop_mean_rating`` gauge: the read model the
   gateway's ListModels serves, so no other service has to replay tracks.scored.v1 to know it.

Key-value layout: ``riffloop.loop.FeedbackIntake``'s (``fb:tracks``, ``fb:ratings:<track>``,
``fb:listens:<track>``, ``fb:parked``, ``fb:refused``), and ``fb:model-ratings`` hash version →
JSON :class:`ModelRatings` (read by the gateway).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from riffloop.core import ConfigurationError, NotFoundError, ValidationError
from riffloop.loop import (
    ConfidenceWeight,
    FeedbackHooks,
    FeedbackIntake,
    FeedbackLedger,
    ModelRatings,
    ModelRatingsView,
    ParkedFeedback,
    SpamFilter,
    SpamReport,
)
from riffloop.runtime import (
    MODEL_RATINGS_KEY,
    TRACK_SCORES_KEY,
    OperatorGuarded,
    feedback_track_record,
    metrics,
)
from riffloop.v1 import events_pb2
from riffloop.v1 import feedback_service_pb2 as pb
from riffloop.v1 import feedback_service_pb2_grpc as pb_grpc
from services.feedback._scorer import InlineScorer, ProcessScorer

#: Hash of the feedback events waiting for their tracks.ready: event id → base64 envelope.
PARKED_KEY = ParkedFeedback.KEY


@dataclasses.dataclass(frozen=True, repr=False)
class FeedbackSettings(OperatorGuarded):
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
    # Where the pass runs: "process" (a child process, the default for the service) or
    # "inline" (the scoring thread itself: tests and the one-process embedded stack).
    scorer: str = "process"
    # The child's nice increment: scoring is background work; the consumer, the gateway and
    # the brokers on the same node come first.
    scorer_niceness: int = 5
    # A pass that has not answered within this is a hung child: it is killed and replaced.
    score_timeout_s: float = 300.0
    # Feedback parked for a track whose tracks.ready has not come after this long will not get
    # one (the track failed, or the event was lost): it goes to the DLQ with the reason.
    park_max_age_s: float = 24 * 3600.0

    def _validate(self) -> None:
        super()._validate()
        if self.scorer not in ("process", "inline"):
            raise ConfigurationError('RIFFLOOP_SCORER must be "process" or "inline"')
        if not 0 <= self.scorer_niceness <= 19:
            raise ConfigurationError("RIFFLOOP_SCORER_NICENESS must lie in [0, 19]")
        if not 60 <= self.park_max_age_s <= 30 * 24 * 3600:
            raise ConfigurationError("RIFFLOOP_PARK_MAX_AGE_S must lie in 60 s – 30 days")
        if self.score_timeout_s <= 0:
            raise ConfigurationError("RIFFLOOP_SCORE_TIMEOUT_S must be positive")
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
    """The feedback domain (:class:`FeedbackIntake`) on this process's ports, with its metrics;
    the scorer; and what the last passes published (read by the servicer under ``lock``)."""

    def __init__(
        self,
        ports: Any,
        *,
        spam: SpamFilter | None = None,
        confidence: ConfidenceWeight | None = None,
        scorer: InlineScorer | ProcessScorer | None = None,
    ) -> None:
        self.ports = ports
        self.intake = FeedbackIntake(
            ports.kv,
            ports.bus,
            producer=ports.producer,
            hooks=FeedbackHooks(
                on_recorded=lambda kind, outcome, n: metrics.FEEDBACK_RECORDED.labels(
                    kind, outcome
                ).inc(n),
                on_parked=metrics.FEEDBACK_PARKED.set,
                on_dead_letter=lambda topic: metrics.DLQ_MESSAGES.labels(
                    ports.producer, topic
                ).inc(),
            ),
        )
        self.scorer = scorer or InlineScorer(spam or SpamFilter(), confidence or ConfidenceWeight())
        # The last published score of each track (what tracks.scored.v1 consumers last saw).
        self.scores: dict[str, events_pb2.TrackScored] = {}
        self.report: SpamReport | None = None
        self.model_ratings: dict[str, ModelRatings] = {}
        self._model_ratings_view = ModelRatingsView(ports.kv, MODEL_RATINGS_KEY)
        self._caught_seen: set[tuple[str, str]] = set()

    @property
    def lock(self) -> Any:
        return self.intake.lock

    @property
    def ledger(self) -> FeedbackLedger:
        return self.intake.ledger

    @property
    def dirty(self) -> set[str]:
        """The tracks to score on the next pass."""
        return self.intake.dirty

    # -- events (the consumer's handlers) and start-up ------------------------------------------

    def on_track_ready(self, envelope: events_pb2.Envelope) -> None:
        self.intake.on_track_ready(feedback_track_record(envelope))

    def on_feedback(self, envelope: events_pb2.Envelope) -> None:
        self.intake.on_feedback(envelope)

    def rebuild(self) -> int:
        """Reload the ledger and the parked feedback from the key-value store; return ratings."""
        return self.intake.rebuild()

    def on_store_rebuilt(self, report: Any) -> None:
        """The key-value store was emptied and rebuilt from the log: write every version's
        ratings again on the next pass."""
        self._model_ratings_view.forget()

    def release_parked(self, track_id: str | None = None) -> int:
        return self.intake.release_parked(track_id)

    def expire_parked(self, max_age_s: float, now_s: float | None = None) -> int:
        return self.intake.expire_parked(max_age_s, now_s)

    # -- scoring ------------------------------------------------------------------------------

    def score_changed(self) -> list[events_pb2.TrackScoredBatch]:
        """One pass of the scorer over everything (ω pools all raters): the changed tracks'
        scores in chunks of at most ``_scorer.SCORES_PER_RECORD``. On failure the tracks stay
        dirty and the scorer's replica starts again from a snapshot of the ledger."""
        handed = self.intake.hand_over(self.scorer.needs_reset)
        if handed is None:
            return []
        ops, changed = handed
        try:
            result = self.scorer.run(ops, changed)
        except BaseException:
            self.intake.pass_failed(changed)
            raise
        if changed:  # a tick that only handed inputs over is not a pass
            metrics.SCORING_PASS_SECONDS.observe(result.seconds)
        batches = [events_pb2.TrackScoredBatch.FromString(chunk) for chunk in result.chunks]
        with self.lock:
            for batch in batches:
                for item in batch.items:
                    self.scores[item.track_id] = item
            if result.report is not None:
                self.report, self.model_ratings = result.report, result.model_ratings
        if result.report is not None:
            for rater, reasons in result.report.caught.items():
                for reason in reasons:
                    if (rater, str(reason)) not in self._caught_seen:
                        self._caught_seen.add((rater, str(reason)))
                        metrics.SPAM_CAUGHT.labels(str(reason)).inc()
        return batches

    def write_model_ratings(self) -> None:
        """Write the per-version aggregates that changed to ``fb:model-ratings`` and set the
        ``riffloop_mean_rating`` gauge (the feedback service owns the scores, so it owns this)."""
        with self.lock:
            ratings = dict(self.model_ratings)
        self._model_ratings_view.write(ratings)
        for version, r in ratings.items():
            if r.generated.normalised_rating_count:
                metrics.MEAN_RATING.labels(version).set(r.generated.mean_normalised_score)

    def publish_scores(self) -> int:
        """One scoring pass: publish the changed tracks' scores as TrackScoredBatch chunks of
        ``_scorer.SCORES_PER_RECORD``, all keyed ``TRACK_SCORES_KEY`` (one partition, so
        consumers read the passes in order), then refresh the per-version read model.

        One record per track, each waiting for its ack, took ≈ 1 ms of broker round trip and
        ≈ 0.1 ms of Python per score: 10,000 changed tracks (2 s of ratings at 5,000/s) kept the
        pass busy for longer than its interval and competed with the gateway for the CPU."""
        batches = self.score_changed()
        for i, batch in enumerate(batches):
            try:
                self.ports.publish("tracks.scored.v1", TRACK_SCORES_KEY, batch)
            except BaseException:  # not published: score them again on the next pass
                self.intake.unpublished(item.track_id for b in batches[i:] for item in b.items)
                raise
        self.write_model_ratings()  # every pass: cheap when nothing changed, retries a failure
        return sum(len(batch.items) for batch in batches)

    def close(self) -> None:
        """Stop the scorer (its child process, if any)."""
        self.scorer.close()


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
            ratings = state.ledger.rating_count(prov.track_id)
        message = events_pb2.TrackScored(track_id=request.track_id, rating_count=ratings)
        if score is not None:  # the score last published for it
            message.CopyFrom(score)
            # Ratings accepted since the last scoring pass count too.
            message.rating_count = ratings
        return pb.TrackScoreResponse(score=message)

    def RaterReport(self, request: pb.RaterReportRequest, context: Any) -> Any:
        if not request.user_id:
            raise ValidationError("user_id is required")
        state = self.state
        with state.lock:  # O(this rater's ratings), not O(ledger): the consumer waits on it
            stars = state.ledger.rater_stars(request.user_id)
            report = state.report
        if not stars:
            raise NotFoundError(f"rater {request.user_id} has no accepted ratings")
        mean = sum(stars) / len(stars)
        std = (sum((x - mean) ** 2 for x in stars) / len(stars)) ** 0.5
        reasons = [str(r) for r in (report.caught.get(request.user_id, ()) if report else ())]
        reliability = report.reliability.get(request.user_id, 1.0) if report else 1.0
        return pb.RaterReportResponse(
            user_id=request.user_id,
            accepted_ratings=len(stars),
            rejected_ratings=state.intake.mirror.refused_ratings(request.user_id),
            reliability=reliability,
            flagged=bool(reasons),
            reasons=reasons,
            mean_stars=mean,
            stddev_stars=std,
        )
