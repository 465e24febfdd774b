"""The feedback service: ratings and listens in, per-track scores (R, ω, n) out.

Domain logic is riffloop.loop's: ``FeedbackLedger`` validates and records, ``SpamFilter`` finds
spammers and rater reliability ρ, ``ConfidenceWeight`` gives R and ω. This shell only moves events:

1. tracks.ready.v1 → register the track's provenance and mark it served to its user.
2. feedback.received.v1 (one FeedbackReceived, or a FeedbackBatch of one user's items) →
   ``ledger.rate`` / ``ledger.listen``, at the item's own client time; an item carrying
   ``served_at`` (the gateway's listening queue served the track to this user) first marks the
   track served to them, so any listener the queue served may rate it; a duplicate
   (ConflictError) is the same rating delivered again and is ignored, so every accepted rating
   counts exactly once.
   Each accepted input is also written to the key-value store as an upsert keyed by
   (track, rater), from which a restarted process rebuilds the ledger (kill -9 safe: the
   rebuilt ledger plus Kafka's redelivery of uncommitted records gives the same state).
3. Every ``score_interval_s`` the scorer re-scores (ω depends on all raters) and publishes
   tracks.scored.v1 for the tracks whose feedback changed, in TrackScoredBatch chunks. The
   pass runs in a child process fed the accepted inputs (``services.feedback._scorer``), so
   its O(N) computation never holds this process's interpreter lock.
4. The same pass writes the mean rating of every model version (generated and baseline tracks
   apart) to ``fb:model-ratings`` and the ``riffloop_mean_rating`` gauge: the read model the
   gateway's ListModels serves, so no other service has to replay tracks.scored.v1 to know it.

Key-value layout: ``fb:tracks`` hash track → JSON {provenance, clip_seconds, served_to};
``fb:ratings:<track>`` hash rater → JSON rating; ``fb:listens:<track>`` hash rater → JSON listen;
``fb:model-ratings`` hash version → JSON :class:`ModelRatings` (read by the gateway).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import threading
import time
from typing import Any

from riffloop.core import (
    ConfigurationError,
    ConflictError,
    ItemsRefused,
    NotFoundError,
    PermissionDeniedError,
    ValidationError,
    publish_dead_letter,
    refuse_items,
    refused_items_envelope,
)
from riffloop.loop import (
    ConfidenceWeight,
    FeedbackLedger,
    ListenEvent,
    Rating,
    SpamFilter,
    SpamReport,
)
from riffloop.runtime import (
    MODEL_RATINGS_KEY,
    TRACK_SCORES_KEY,
    ServiceSettings,
    checked_track_ready,
    metrics,
)
from riffloop.v1 import events_pb2
from riffloop.v1 import feedback_service_pb2 as pb
from riffloop.v1 import feedback_service_pb2_grpc as pb_grpc
from services.feedback._scorer import (
    InlineScorer,
    ModelRatings,
    Op,
    ProcessScorer,
    register_record,
)

# How long a refused envelope's count is remembered against a redelivery (a week: far beyond any
# consumer back-off or restart).
_REFUSED_ONCE_TTL_S = 7 * 24 * 3600.0
_log = logging.getLogger("riffloop.feedback")

#: Hash of the feedback events waiting for their tracks.ready: event id → base64 envelope.
PARKED_KEY = "fb:parked"
FEEDBACK_TOPIC = "feedback.received.v1"


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
    """The ledger, its key-value mirror and the last published scores; one lock guards them.

    Every input the ledger accepts is also queued (``_pending``) for the scorer's replica,
    in the order it was applied; a scoring pass hands the queue over with the dirty tracks.
    """

    def __init__(
        self,
        ports: Any,
        *,
        spam: SpamFilter | None = None,
        confidence: ConfidenceWeight | None = None,
        scorer: InlineScorer | ProcessScorer | None = None,
    ) -> None:
        self.ports = ports
        self.lock = threading.Lock()
        self.ledger = FeedbackLedger()
        self.scorer = scorer or InlineScorer(spam or SpamFilter(), confidence or ConfidenceWeight())
        # The last published score of each track (what tracks.scored.v1 consumers last saw).
        self.scores: dict[str, events_pb2.TrackScored] = {}
        self.report: SpamReport | None = None
        self.dirty: set[str] = set()
        self.model_ratings: dict[str, ModelRatings] = {}
        self._pending: list[Op] = []
        self._replica_stale = True  # the scorer's ledger must start from a snapshot
        self._model_ratings_written: dict[str, str] = {}
        self._caught_seen: set[tuple[str, str]] = set()
        # Feedback that overtook its tracks.ready (see _park): event id → (envelope, its
        # tracks), and each unknown track → the event ids waiting for it. The envelopes
        # themselves are kept in PARKED_KEY, so a restart loses none of them.
        self._parked: dict[str, tuple[events_pb2.Envelope, frozenset[str]]] = {}
        self._waiting: dict[str, set[str]] = {}

    # -- rebuild ------------------------------------------------------------------------------

    def rebuild(self) -> int:
        """Reload every track, rating and listen from the key-value store; return ratings."""
        kv = self.ports.kv
        ratings = 0
        with self.lock:
            self.ledger = FeedbackLedger()
            for raw in kv.hgetall("fb:tracks").values():
                register_record(self.ledger, json.loads(raw))
            for track_id in list(self._track_ids()):
                # (an accepted item was served to its rater: by the queue, if not their own)
                for raw in kv.hgetall(f"fb:ratings:{track_id}").values():
                    rating = Rating(**json.loads(raw))
                    self.ledger.mark_served(track_id, rating.rater_id, rating.submitted_at)
                    self._apply_rating(rating)
                    ratings += 1
                for raw in kv.hgetall(f"fb:listens:{track_id}").values():
                    listen = ListenEvent(**json.loads(raw))
                    self.ledger.mark_served(track_id, listen.rater_id, listen.submitted_at)
                    self._apply_listen(listen)
                self.dirty.add(track_id)
            self._pending, self._replica_stale = [], True
            self._parked, self._waiting = {}, {}
            for event_id, raw in kv.hgetall(PARKED_KEY).items():
                envelope = events_pb2.Envelope.FromString(base64.b64decode(raw))
                self._index_parked(event_id, envelope)
        metrics.FEEDBACK_PARKED.set(len(self._parked))
        return ratings

    def _index_parked(self, event_id: str, envelope: events_pb2.Envelope) -> None:
        tracks = frozenset(e.track_id for e in _feedback_items(envelope))
        self._parked[event_id] = (envelope, tracks)
        for track_id in tracks:
            if not self.ledger.knows(track_id):
                self._waiting.setdefault(track_id, set()).add(event_id)

    def _forget_parked(self, event_id: str) -> None:
        if event_id not in self._parked:
            return  # expired meanwhile (expire_parked claims under the lock)
        _, tracks = self._parked.pop(event_id)
        for track_id in tracks:
            waiting = self._waiting.get(track_id)
            if waiting is not None:
                waiting.discard(event_id)
                if not waiting:
                    del self._waiting[track_id]

    def release_parked(self, track_id: str | None = None) -> int:
        """Apply the parked feedback whose tracks are now all known (those waiting for
        ``track_id``, or all of them); return how many events were applied.

        An event is forgotten only once applied: a failure (Redis, the broker) propagates with
        everything still parked, and the consumer's retry of the TrackReady releases it again
        (applying it twice changes nothing). An item refused now goes to the DLQ from here —
        its record was committed when it was parked."""
        with self.lock:
            candidates = list(self._parked if track_id is None else self._waiting.get(track_id, ()))
            ready = [
                (event_id, self._parked[event_id][0])
                for event_id in candidates
                if all(self.ledger.knows(t) for t in self._parked[event_id][1])
            ]
        for event_id, envelope in ready:
            try:
                self.on_feedback(envelope)
            except (ValidationError, PermissionDeniedError) as exc:  # ItemsRefused included
                self._dead_letter(exc.rest if isinstance(exc, ItemsRefused) else envelope, exc)
            self.ports.kv.hdel(PARKED_KEY, [event_id])
            with self.lock:
                self._forget_parked(event_id)
        if ready:
            metrics.FEEDBACK_PARKED.set(len(self._parked))
        return len(ready)

    def expire_parked(self, max_age_s: float, now_s: float | None = None) -> int:
        """Dead-letter parked feedback older than ``max_age_s`` (by its envelope's time) that
        still waits for a track: that track never became ready, and waiting longer only keeps
        it in memory and Redis. The DLQ record, under the id ``<event id>.expired`` (the
        original id is marked handled, so a replay of it would be skipped as a duplicate),
        names the tracks; a replay after their tracks.ready applies it. Returns how many
        expired."""
        now_s = time.time() if now_s is None else now_s
        with self.lock:  # claimed here: a concurrent release_parked no longer sees them
            expired = []
            for event_id, (envelope, tracks) in list(self._parked.items()):
                missing = sorted(t for t in tracks if not self.ledger.knows(t))
                age_s = now_s - envelope.occurred_at.ToNanoseconds() / 1e9
                if missing and age_s > max_age_s:  # all known: release_parked applies it
                    self._forget_parked(event_id)
                    expired.append((event_id, envelope, missing))
        for done, (event_id, envelope, missing) in enumerate(expired):
            why = f"track(s) {', '.join(missing[:5])} never became ready within {max_age_s:.0f} s"
            renamed = type(envelope)()
            renamed.CopyFrom(envelope)
            renamed.event_id = f"{envelope.event_id}.expired"
            try:
                self._dead_letter(renamed, NotFoundError(why + " of this feedback"))
                self.ports.kv.hdel(PARKED_KEY, [event_id])
            except Exception:
                with self.lock:  # parked again, the rest too: the next tick retries them
                    for again, envelope_again, _ in expired[done:]:
                        if again not in self._parked:
                            self._index_parked(again, envelope_again)
                raise
        if expired:
            metrics.FEEDBACK_PARKED.set(len(self._parked))
            _log.warning("parked feedback expired to the DLQ", extra={"events": len(expired)})
        return len(expired)

    def _dead_letter(self, envelope: events_pb2.Envelope, error: Exception) -> None:
        """Feedback whose record was committed long ago (parked) to the DLQ, from here."""
        publish_dead_letter(
            self.ports.bus,
            group=self.ports.producer,
            topic=FEEDBACK_TOPIC,
            key=_feedback_items(envelope)[0].user_id or envelope.event_id,
            value=envelope.SerializeToString(),
            event_id=envelope.event_id,
            error=error,
            attempts=1,
        )
        metrics.DLQ_MESSAGES.labels(self.ports.producer, FEEDBACK_TOPIC).inc()

    def _track_ids(self) -> list[str]:
        return [p.track_id for p in self.ledger.provenances()]

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
        prov = checked_track_ready(ready)
        served_at = envelope.occurred_at.ToNanoseconds() / 1e9
        record = {
            "provenance": prov.to_json(),
            "clip_seconds": ready.duration_seconds,
            "served_to": {ready.user_id: served_at} if ready.user_id else {},
        }
        with self.lock:
            register_record(self.ledger, record)
            self._pending.append(("track", record))
            parked = ready.track_id in self._waiting
        self.ports.kv.hset("fb:tracks", {ready.track_id: json.dumps(record)})
        if parked:
            self.release_parked(ready.track_id)

    def on_feedback(self, envelope: events_pb2.Envelope) -> None:
        """One FeedbackReceived, or a FeedbackBatch (one user's items from one SubmitFeedback
        call) applied item by item. A batch's invalid items are refused on their own
        (``ItemsRefused``: to the DLQ, the rest kept).

        Three steps, so that a failure anywhere leaves nothing half-recorded: check every item
        against the ledger (nothing changes), write the new ones to the key-value mirror, and
        only then record them in the ledger. Had the ledger come first, a failed write would
        have left the items in memory, the retry would have seen them as duplicates and skipped
        the write, and a restart (which rebuilds the ledger from the mirror) would have lost
        them."""
        submitted_at = envelope.occurred_at.ToNanoseconds() / 1e9
        batched = envelope.WhichOneof("payload") == "feedback_batch"
        events = total = _feedback_items(envelope)
        with self.lock:
            unknown = [e for e in events if e.track_id and not self.ledger.knows(e.track_id)]
        if unknown:
            if not batched or len(unknown) == len(events):
                self._park(envelope)
                return
            # the items of known tracks now, the others when their tracks are ready
            self._park(refused_items_envelope(envelope, "feedback_batch", unknown, suffix="parked"))
            events = [e for e in events if not e.track_id or self.ledger.knows(e.track_id)]
        new: dict[tuple[str, str, str], Rating | ListenEvent] = {}  # (kind, track, user) → item
        refused: list[tuple[events_pb2.FeedbackReceived, str]] = []
        with self.lock:
            for event in events:
                try:
                    if event.HasField("served_at") and event.track_id:
                        # The gateway's word that it served the track to this user (the
                        # listening queue). Marking is idempotent and grants nothing but the
                        # right to rate once, so it need not wait for the write below.
                        self.ledger.mark_served(
                            event.track_id,
                            event.user_id,
                            event.served_at.ToNanoseconds() / 1e9,
                        )
                    at = (
                        event.client_time.ToNanoseconds() / 1e9
                        if event.HasField("client_time")
                        else submitted_at
                    )
                    kind, value = self._checked(event, at)
                except ConflictError:
                    continue  # recorded before (a redelivery): nothing to do
                except (ValidationError, PermissionDeniedError) as exc:
                    # (the tracks are all known here, so "not served to this user" will not
                    # change on a retry: the item is refused like an invalid one)
                    if not batched:  # a poison event: the consumer dead-letters it at once
                        self._count_refused(envelope, [event])
                        raise ValidationError(exc.reason) from exc
                    # one bad item must not sink the user's other items (the gateway checked
                    # them all, so this is a bug or a replay of old data): it goes to the DLQ
                    # on its own once the good ones are stored
                    refused.append((event, f"{event.track_id or '?'}: {exc.reason}"))
                    continue
                new.setdefault((kind, event.track_id, event.user_id), value)  # first one wins
        if new:
            writes: dict[str, dict[str, str]] = {}
            for (kind, track_id, user), value in new.items():
                table = "ratings" if kind == "rating" else "listens"
                writes.setdefault(f"fb:{table}:{track_id}", {})[user] = json.dumps(_row(value))
            # Upserts keyed by (track, rater): writing them again after a crash changes nothing.
            self.ports.kv.hset_many(writes)
            recorded = {"rating": 0, "listen": 0}
            with self.lock:  # only this consumer thread changes the ledger: the checks hold
                for (kind, track_id, _), value in new.items():
                    if isinstance(value, Rating):
                        self.ledger.rate(value)
                    else:
                        self.ledger.listen(value)
                    self.dirty.add(track_id)
                    self._pending.append((kind, value))
                    recorded[kind] += 1
            for kind, n in recorded.items():
                if n:
                    metrics.FEEDBACK_RECORDED.labels(kind, "recorded").inc(n)
        for event, _ in refused:  # counted here, once the write of the rest has succeeded
            metrics.FEEDBACK_RECORDED.labels(
                event.WhichOneof("feedback") or "none", "refused"
            ).inc()
        self._count_refused(envelope, [event for event, _ in refused])
        # (out of every item: a batch split for parking is never refused whole)
        refuse_items(envelope, "feedback_batch", refused, len(total))

    def _count_refused(
        self, envelope: events_pb2.Envelope, events: list[events_pb2.FeedbackReceived]
    ) -> None:
        """Ratings refused here, per rater, in ``fb:refused`` (RaterReport's rejected_ratings):
        once per envelope, however often it is redelivered."""
        per_rater: dict[str, float] = {}
        for event in events:
            if event.WhichOneof("feedback") == "rating":
                per_rater[event.user_id] = per_rater.get(event.user_id, 0.0) + 1.0
        if per_rater:
            self.ports.kv.apply_once(
                f"fb:refused-once:{envelope.event_id}",
                _REFUSED_ONCE_TTL_S,
                {"fb:refused": per_rater},
            )

    def _park(self, envelope: events_pb2.Envelope) -> None:
        """Keep feedback that overtook its tracks.ready until that arrives (on_track_ready
        releases it). The gateway accepts a rating only for a track it has seen ready, so the
        TrackReady exists; but this consumer reads the two topics' partitions in no set order,
        and through a backlog (a restart) a rating often comes first. Retrying it here could
        not help — the TrackReady waits behind it on this same consumer — and after the retries
        the rating went to the DLQ."""
        raw = base64.b64encode(envelope.SerializeToString()).decode()
        self.ports.kv.hset(PARKED_KEY, {envelope.event_id: raw})
        with self.lock:
            self._index_parked(envelope.event_id, envelope)
            missing = sorted(t for t in self._parked[envelope.event_id][1] if t in self._waiting)
            parked = len(self._parked)
        metrics.FEEDBACK_PARKED.set(parked)
        _log.info(
            "feedback parked until its tracks are ready",
            extra={"event_id": envelope.event_id, "tracks": missing[:5]},
        )

    def _checked(
        self, event: events_pb2.FeedbackReceived, submitted_at: float
    ) -> tuple[str, Rating | ListenEvent]:
        """One item checked against the ledger, unchanged: (kind, the item as it would be
        recorded); raises what recording it would raise (ConflictError for a duplicate)."""
        if not event.track_id:
            raise ValidationError("a feedback item carries no track_id")
        which = event.WhichOneof("feedback")
        if which == "rating":
            rating = Rating(event.track_id, event.user_id, int(event.rating.stars), submitted_at)
            return "rating", self.ledger.check_rating(rating)
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
            self.ledger.check_listen(listen)
            return "listen", listen
        raise ValidationError(f"feedback for track {event.track_id} carries no rating or listen")

    # -- scoring ------------------------------------------------------------------------------

    def score_changed(self) -> list[events_pb2.TrackScoredBatch]:
        """One pass of the scorer over everything (ω pools all raters): the changed tracks'
        scores in chunks of at most ``_scorer.SCORES_PER_RECORD``. On failure the tracks stay
        dirty and the scorer's replica starts again from a snapshot of the ledger."""
        with self.lock:
            reset = self._replica_stale or self.scorer.needs_reset
            if not (self.dirty or self._pending or reset):
                return []
            # Inputs are handed over on every tick, rated or not: the replica then starts from
            # the ledger while it is small (the first tick after start-up), and a stream of
            # TrackReady never piles up into the first pass that has ratings to score. That
            # first pass used to snapshot the whole ledger under this lock (100,000 tracks of
            # the benchmark: 9 % of the process's samples while the ratings streamed in).
            changed, self.dirty = self.dirty, set()
            if reset:
                # Once per scorer start: ≈ 0.1 s per 50,000 ratings under the lock.
                ops: list[Op] = [("reset", self.ledger.snapshot())]
            else:
                ops = self._pending
            self._pending, self._replica_stale = [], False
        try:
            result = self.scorer.run(ops, changed)
        except BaseException:
            with self.lock:
                self.dirty |= changed
                self._replica_stale = True
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
        fresh = {v: r.to_json() for v, r in ratings.items()}
        changed = {v: raw for v, raw in fresh.items() if self._model_ratings_written.get(v) != raw}
        if changed:
            self.ports.kv.hset_many({MODEL_RATINGS_KEY: changed})
            self._model_ratings_written.update(changed)
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
            except BaseException:
                with self.lock:  # not published: score them again on the next pass
                    self.dirty |= {item.track_id for b in batches[i:] for item in b.items}
                raise
        self.write_model_ratings()  # every pass: cheap when nothing changed, retries a failure
        return sum(len(batch.items) for batch in batches)

    def close(self) -> None:
        """Stop the scorer (its child process, if any)."""
        self.scorer.close()


def _feedback_items(envelope: events_pb2.Envelope) -> list[events_pb2.FeedbackReceived]:
    """The FeedbackReceived items of a feedback.received.v1 record: one, or a batch."""
    if envelope.WhichOneof("payload") == "feedback_batch":
        return list(envelope.feedback_batch.items)
    return [envelope.feedback_received]


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
            rejected_ratings=int(
                float(self.state.ports.kv.hget("fb:refused", request.user_id) or 0)
            ),
            reliability=reliability,
            flagged=bool(reasons),
            reasons=reasons,
            mean_stars=mean,
            stddev_stars=std,
        )
