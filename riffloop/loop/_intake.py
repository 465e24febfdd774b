"""Feedback intake: tracks.ready and feedback.received events into the ledger, each input once.

The rules between the feedback service's consumer and :class:`FeedbackLedger` (the service only
moves events, serves reads and counts metrics):

1. A TrackReady makes its track known: a :class:`TrackRecord` (provenance, clip length, the
   user it was made for) registered in the ledger and written to the key-value mirror.
2. Feedback (one FeedbackReceived, or a FeedbackBatch of one user's items) is applied item by
   item, at the item's own client time. An item carrying ``served_at`` (the gateway's listening
   queue served the track to this user) first marks the track served to them, so any listener
   the queue served may rate it. Three steps, so a failure anywhere leaves nothing
   half-recorded: check every item against the ledger (nothing changes), write the new ones to
   the mirror (:class:`FeedbackMirror`), and only then record them in the ledger. A duplicate
   (ConflictError) is the same item delivered again and is ignored, so every accepted rating
   counts exactly once; a batch's bad items are refused on their own (``ItemsRefused``).
3. Feedback naming a track not yet known is parked (:class:`ParkedFeedback`) until that track's
   TrackReady arrives, and dead-lettered when it has not come within an age limit.
4. Every accepted input is queued for the scorer's replica of the ledger and its track marked
   changed; a scoring pass takes both (:meth:`FeedbackIntake.hand_over`).
5. A restarted process rebuilds the ledger and the parked feedback from the mirror
   (:meth:`FeedbackIntake.rebuild`): with the log's redelivery of uncommitted records that is
   the same state (kill -9 safe).
6. The mirror itself is a cache of the log: a fresh intake fed tracks.ready.v1 and then
   feedback.received.v1 from their first records writes the same mirror and parked feedback
   (``riffloop.runtime.feedback_rebuild_plan``), every item once, the first of a (track, rater)
   winning as it did in the ledger.

Key-value layout: ``fb:tracks`` hash track → JSON :class:`TrackRecord`; ``fb:ratings:<track>``
hash rater → JSON rating; ``fb:listens:<track>`` hash rater → JSON listen; ``fb:parked`` hash
event id → base64 envelope; ``fb:refused`` hash rater → ratings refused here.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from riffloop.core import (
    ConflictError,
    EventBus,
    ItemsRefused,
    KeyValueStore,
    NotFoundError,
    PermissionDeniedError,
    ValidationError,
    publish_dead_letter,
    refuse_items,
    refused_items_envelope,
)
from riffloop.loop._feedback import FeedbackLedger, ListenEvent, Rating
from riffloop.loop._provenance import TrackProvenance

if TYPE_CHECKING:
    from riffloop.v1 import events_pb2

_log = logging.getLogger("riffloop.feedback")

FEEDBACK_TOPIC = "feedback.received.v1"
# How long a refused envelope's count is remembered against a redelivery (a week: far beyond any
# consumer back-off or restart).
_REFUSED_ONCE_TTL_S = 7 * 24 * 3600.0

#: An input for the scorer's replica of the ledger, in the order the ledger accepted it:
#: ("reset", a ledger snapshot) | ("track", TrackRecord) | ("rating", Rating)
#: | ("listen", ListenEvent).
ReplicaOp = tuple[str, Any]


@dataclasses.dataclass(frozen=True)
class TrackRecord:
    """A track as the feedback ledger knows it: its provenance, its clip length, and who it was
    served to (rater → served_at, s). The ``fb:tracks`` value."""

    provenance: TrackProvenance
    clip_seconds: float
    served_to: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def track_id(self) -> str:
        return self.provenance.track_id

    def to_json(self) -> str:
        return json.dumps(
            {
                "provenance": self.provenance.to_json(),
                "clip_seconds": self.clip_seconds,
                "served_to": self.served_to,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> TrackRecord:
        raw = json.loads(text)
        return cls(
            TrackProvenance.from_json(raw["provenance"]),
            float(raw["clip_seconds"]),
            {user: float(at) for user, at in raw["served_to"].items()},
        )

    def register(self, ledger: FeedbackLedger) -> None:
        """Register the track in ``ledger`` and mark it served (idempotent; ConflictError for
        a track registered with another provenance)."""
        ledger.register_track(self.provenance, float(self.clip_seconds))
        for user, served_at in self.served_to.items():
            ledger.mark_served(self.track_id, user, float(served_at))


def replay_accepted(ledger: FeedbackLedger, item: Rating | ListenEvent) -> bool:
    """Record in ``ledger`` an item accepted before (a rebuild, the scorer's replica); return
    whether it was new. It was served to its rater when accepted (by the listening queue, if
    not their own track), so it is marked served again; a second copy is a no-op."""
    ledger.mark_served(item.track_id, item.rater_id, item.submitted_at)
    try:
        if isinstance(item, Rating):
            ledger.rate(item)
        else:
            ledger.listen(item)
    except ConflictError:
        return False
    return True


def replay_ops(ledger: FeedbackLedger, ops: Iterable[ReplicaOp]) -> FeedbackLedger:
    """Apply the scorer's ops to a replica of the ledger; return it (a new one after a
    ``reset``)."""
    for kind, value in ops:
        if kind == "reset":
            ledger = FeedbackLedger.restore(value)
        elif kind == "track":
            value.register(ledger)
        else:
            replay_accepted(ledger, value)
    return ledger


def feedback_item(event: Any, submitted_at: float) -> Rating | ListenEvent:
    """A ``FeedbackReceived`` as the ledger's Rating or ListenEvent, at ``submitted_at``
    (not yet checked against the ledger). A listen not completed counts as skipped."""
    if not event.track_id:
        raise ValidationError("a feedback item carries no track_id")
    which = event.WhichOneof("feedback")
    if which == "rating":
        return Rating(event.track_id, event.user_id, int(event.rating.stars), submitted_at)
    if which == "listen":
        return ListenEvent(
            track_id=event.track_id,
            rater_id=event.user_id,
            seconds_listened=float(event.listen.seconds_listened),
            clip_seconds=float(event.listen.clip_seconds),
            completed=bool(event.listen.completed),
            skipped=not event.listen.completed,
            submitted_at=submitted_at,
        )
    raise ValidationError(f"feedback for track {event.track_id} carries no rating or listen")


def feedback_items(envelope: events_pb2.Envelope) -> list[events_pb2.FeedbackReceived]:
    """The FeedbackReceived items of a feedback.received.v1 record: one, or a batch."""
    if envelope.WhichOneof("payload") == "feedback_batch":
        return list(envelope.feedback_batch.items)
    return [envelope.feedback_received]


class FeedbackMirror:
    """The ledger's inputs in the key-value store, as upserts keyed by (track, rater): writing
    one again after a crash changes nothing, and :meth:`rebuild` replays them all."""

    TRACKS_KEY = "fb:tracks"
    REFUSED_KEY = "fb:refused"

    def __init__(self, kv: KeyValueStore) -> None:
        self.kv = kv

    def store_track(self, record: TrackRecord) -> None:
        self.kv.hset(self.TRACKS_KEY, {record.track_id: record.to_json()})

    def store(self, items: Iterable[Rating | ListenEvent]) -> None:
        """One write of every item, under ``fb:ratings:<track>`` / ``fb:listens:<track>``."""
        writes: dict[str, dict[str, str]] = {}
        for item in items:
            table = "ratings" if isinstance(item, Rating) else "listens"
            writes.setdefault(f"fb:{table}:{item.track_id}", {})[item.rater_id] = json.dumps(
                _row(item)
            )
        self.kv.hset_many(writes)

    def rebuild(self, ledger: FeedbackLedger) -> int:
        """Replay every stored track, then every rating and listen, into ``ledger``; return
        the ratings read."""
        for raw in self.kv.hgetall(self.TRACKS_KEY).values():
            TrackRecord.from_json(raw).register(ledger)
        ratings = 0
        for track_id in [p.track_id for p in ledger.provenances()]:
            for raw in self.kv.hgetall(f"fb:ratings:{track_id}").values():
                replay_accepted(ledger, Rating(**json.loads(raw)))
                ratings += 1
            for raw in self.kv.hgetall(f"fb:listens:{track_id}").values():
                replay_accepted(ledger, ListenEvent(**json.loads(raw)))
        return ratings

    def count_refused(self, event_id: str, events: Iterable[Any]) -> None:
        """Add the ratings among ``events`` (FeedbackReceived) refused here to their raters'
        ``fb:refused`` counts, once per envelope however often it is redelivered."""
        per_rater: dict[str, float] = {}
        for event in events:
            if event.WhichOneof("feedback") == "rating":
                per_rater[event.user_id] = per_rater.get(event.user_id, 0.0) + 1.0
        if per_rater:
            self.kv.apply_once(
                f"fb:refused-once:{event_id}", _REFUSED_ONCE_TTL_S, {self.REFUSED_KEY: per_rater}
            )

    def refused_ratings(self, rater_id: str) -> int:
        return int(float(self.kv.hget(self.REFUSED_KEY, rater_id) or 0))


def _row(item: Rating | ListenEvent) -> dict[str, Any]:
    """The key-value row of a rating or listen (``dataclasses.asdict`` without its deep copy,
    a third of the consumer's time per item)."""
    return {f.name: getattr(item, f.name) for f in dataclasses.fields(item)}


class ParkedFeedback:
    """Feedback that overtook its tracks' TrackReady, waiting for them.

    The envelopes live in the key-value store (``KEY``: event id → base64 envelope), so a
    restart loses none. In memory: each parked event's tracks, and for each track still
    unknown the events waiting for it. Not locked: :class:`FeedbackIntake` holds its lock
    around the in-memory calls and makes the key-value calls outside it."""

    KEY = "fb:parked"

    def __init__(self, kv: KeyValueStore) -> None:
        self.kv = kv
        self._parked: dict[str, tuple[events_pb2.Envelope, frozenset[str]]] = {}
        self._waiting: dict[str, set[str]] = {}

    def __len__(self) -> int:
        return len(self._parked)

    def __contains__(self, event_id: object) -> bool:
        return event_id in self._parked

    def waits_for(self, track_id: str) -> bool:
        return track_id in self._waiting

    def missing(self, event_id: str) -> list[str]:
        """The tracks a parked event still waits for, sorted."""
        return sorted(t for t in self._parked[event_id][1] if t in self._waiting)

    def store(self, envelope: events_pb2.Envelope) -> None:
        raw = base64.b64encode(envelope.SerializeToString()).decode()
        self.kv.hset(self.KEY, {envelope.event_id: raw})

    def remove(self, event_id: str) -> None:
        self.kv.hdel(self.KEY, [event_id])

    def restore(self, knows: Callable[[str], bool]) -> None:
        """Forget what is in memory and index every stored envelope again."""
        from riffloop.v1 import events_pb2

        self._parked, self._waiting = {}, {}
        for event_id, raw in self.kv.hgetall(self.KEY).items():
            self.index(event_id, events_pb2.Envelope.FromString(base64.b64decode(raw)), knows)

    def index(
        self, event_id: str, envelope: events_pb2.Envelope, knows: Callable[[str], bool]
    ) -> None:
        tracks = frozenset(e.track_id for e in feedback_items(envelope))
        self._parked[event_id] = (envelope, tracks)
        for track_id in tracks:
            if not knows(track_id):
                self._waiting.setdefault(track_id, set()).add(event_id)

    def forget(self, event_id: str) -> None:
        if event_id not in self._parked:
            return  # expired meanwhile (claim_expired runs under the intake's lock)
        _, tracks = self._parked.pop(event_id)
        for track_id in tracks:
            waiting = self._waiting.get(track_id)
            if waiting is not None:
                waiting.discard(event_id)
                if not waiting:
                    del self._waiting[track_id]

    def ready(
        self, knows: Callable[[str], bool], track_id: str | None = None
    ) -> list[tuple[str, events_pb2.Envelope]]:
        """The parked events whose tracks are now all known: of those waiting for
        ``track_id``, or of all."""
        candidates = list(self._parked if track_id is None else self._waiting.get(track_id, ()))
        return [
            (event_id, self._parked[event_id][0])
            for event_id in candidates
            if all(knows(t) for t in self._parked[event_id][1])
        ]

    def claim_expired(
        self, knows: Callable[[str], bool], max_age_s: float, now_s: float
    ) -> list[tuple[str, events_pb2.Envelope, list[str]]]:
        """Forget and return (event id, envelope, missing tracks) of each event older than
        ``max_age_s`` (by its envelope's time) that still waits for a track. One whose tracks
        are all known is never expired, however old: releasing it applies it."""
        expired = []
        for event_id, (envelope, tracks) in list(self._parked.items()):
            missing = sorted(t for t in tracks if not knows(t))
            age_s = now_s - envelope.occurred_at.ToNanoseconds() / 1e9
            if missing and age_s > max_age_s:
                self.forget(event_id)
                expired.append((event_id, envelope, missing))
        return expired


@dataclasses.dataclass
class FeedbackHooks:
    """Metric callbacks (the feedback service wires them to Prometheus)."""

    on_recorded: Callable[[str, str, int], None] | None = None  # (kind, outcome, n)
    on_parked: Callable[[int], None] | None = None  # events parked now
    on_dead_letter: Callable[[str], None] | None = None  # the topic

    def recorded(self, kind: str, outcome: str, n: int) -> None:
        if self.on_recorded is not None:
            self.on_recorded(kind, outcome, n)

    def parked(self, n: int) -> None:
        if self.on_parked is not None:
            self.on_parked(n)

    def dead_letter(self, topic: str) -> None:
        if self.on_dead_letter is not None:
            self.on_dead_letter(topic)


class FeedbackIntake:
    """The ledger, its key-value mirror, the parked feedback and the scoring backlog (the
    tracks changed and the inputs accepted since the last pass); one lock guards them.

    ``kv`` holds the mirror and the parked envelopes; ``bus`` takes the dead letters of
    parked feedback, published as ``producer`` (the consumer group that committed it).
    ``dead_letters=False`` (a rebuild replaying the log) sends none: the consumer sent them
    when it first met those records."""

    def __init__(
        self,
        kv: KeyValueStore,
        bus: EventBus,
        *,
        producer: str,
        hooks: FeedbackHooks | None = None,
        dead_letters: bool = True,
    ) -> None:
        self.lock = threading.Lock()
        self.ledger = FeedbackLedger()
        self.mirror = FeedbackMirror(kv)
        self.parked = ParkedFeedback(kv)
        self.hooks = hooks or FeedbackHooks()
        self._bus = bus
        self._producer = producer
        self._dead_letters = dead_letters
        # Tracks whose score may have changed since the last pass, and the inputs the scorer's
        # replica has not applied yet (in the order the ledger applied them).
        self.dirty: set[str] = set()
        self._pending: list[ReplicaOp] = []
        self._replica_stale = True  # the scorer's replica must start from a snapshot

    # 1. rebuild ---------------------------------------------------------------------------
    def rebuild(self) -> int:
        """Reload every track, rating, listen and parked event from the key-value store;
        return the ratings. Every track counts as changed; the replica starts over."""
        with self.lock:
            self.ledger = FeedbackLedger()
            ratings = self.mirror.rebuild(self.ledger)
            self.dirty.update(p.track_id for p in self.ledger.provenances())
            self._pending, self._replica_stale = [], True
            self.parked.restore(self.ledger.knows)
        self.hooks.parked(len(self.parked))
        return ratings

    # 2. events ----------------------------------------------------------------------------
    def on_track_ready(self, record: TrackRecord) -> None:
        with self.lock:
            record.register(self.ledger)
            self._pending.append(("track", record))
            waited_for = self.parked.waits_for(record.track_id)
        self.mirror.store_track(record)
        if waited_for:
            self.release_parked(record.track_id)

    def on_feedback(self, envelope: events_pb2.Envelope) -> None:
        """One FeedbackReceived, or a FeedbackBatch applied item by item (steps 2 and 3 of the
        module's rules). Had the ledger come before the mirror, a failed write would have left
        the items in memory, the retry would have seen them as duplicates and skipped the
        write, and a restart (which rebuilds the ledger from the mirror) would have lost them."""
        submitted_at = envelope.occurred_at.ToNanoseconds() / 1e9
        batched = envelope.WhichOneof("payload") == "feedback_batch"
        events = total = feedback_items(envelope)
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
                        self.mirror.count_refused(envelope.event_id, [event])
                        raise ValidationError(exc.reason) from exc
                    # one bad item must not sink the user's other items (the gateway checked
                    # them all, so this is a bug or a replay of old data): it goes to the DLQ
                    # on its own once the good ones are stored
                    refused.append((event, f"{event.track_id or '?'}: {exc.reason}"))
                    continue
                new.setdefault((kind, event.track_id, event.user_id), value)  # first one wins
        if new:
            self.mirror.store(new.values())
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
                    self.hooks.recorded(kind, "recorded", n)
        for event, _ in refused:  # counted here, once the write of the rest has succeeded
            self.hooks.recorded(event.WhichOneof("feedback") or "none", "refused", 1)
        self.mirror.count_refused(envelope.event_id, [event for event, _ in refused])
        # (out of every item: a batch split for parking is never refused whole)
        refuse_items(envelope, "feedback_batch", refused, len(total))

    def _checked(
        self, event: events_pb2.FeedbackReceived, submitted_at: float
    ) -> tuple[str, Rating | ListenEvent]:
        """One item checked against the ledger, unchanged: (kind, the item as it would be
        recorded); raises what recording it would raise (ConflictError for a duplicate)."""
        item = feedback_item(event, submitted_at)
        if isinstance(item, Rating):
            return "rating", self.ledger.check_rating(item)
        self.ledger.check_listen(item)
        return "listen", item

    # 3. parked feedback -------------------------------------------------------------------
    def _park(self, envelope: events_pb2.Envelope) -> None:
        """Keep feedback that overtook its tracks.ready until that arrives (on_track_ready
        releases it). The gateway accepts a rating only for a track it has seen ready, so the
        TrackReady exists; but the consumer reads the two topics' partitions in no set order,
        and through a backlog (a restart) a rating often comes first. Retrying it could not
        help — the TrackReady waits behind it on the same consumer."""
        self.parked.store(envelope)
        with self.lock:
            self.parked.index(envelope.event_id, envelope, self.ledger.knows)
            missing = self.parked.missing(envelope.event_id)
            parked = len(self.parked)
        self.hooks.parked(parked)
        _log.info(
            "feedback parked until its tracks are ready",
            extra={"event_id": envelope.event_id, "tracks": missing[:5]},
        )

    def release_parked(self, track_id: str | None = None) -> int:
        """Apply the parked feedback whose tracks are now all known (those waiting for
        ``track_id``, or all of them); return how many events were applied.

        An event is forgotten only once applied: a failure (the key-value store, the broker)
        propagates with everything still parked, and the consumer's retry of the TrackReady
        releases it again (applying it twice changes nothing). An item refused now goes to the
        DLQ from here — its record was committed when it was parked."""
        with self.lock:
            ready = self.parked.ready(self.ledger.knows, track_id)
        for event_id, envelope in ready:
            try:
                self.on_feedback(envelope)
            except (ValidationError, PermissionDeniedError) as exc:  # ItemsRefused included
                self._dead_letter(exc.rest if isinstance(exc, ItemsRefused) else envelope, exc)
            self.parked.remove(event_id)
            with self.lock:
                self.parked.forget(event_id)
        if ready:
            self.hooks.parked(len(self.parked))
        return len(ready)

    def expire_parked(self, max_age_s: float, now_s: float | None = None) -> int:
        """Dead-letter parked feedback older than ``max_age_s`` (by its envelope's time) that
        still waits for a track: that track never became ready, and waiting longer only keeps
        it in memory and the key-value store. The DLQ record, under the id ``<event id>.expired``
        (the original id is marked handled, so a replay of it would be skipped as a duplicate),
        names the tracks; a replay after their tracks.ready applies it. Returns how many
        expired."""
        now_s = time.time() if now_s is None else now_s
        with self.lock:  # claimed here: a concurrent release_parked no longer sees them
            expired = self.parked.claim_expired(self.ledger.knows, max_age_s, now_s)
        for done, (event_id, envelope, missing) in enumerate(expired):
            why = f"track(s) {', '.join(missing[:5])} never became ready within {max_age_s:.0f} s"
            renamed = type(envelope)()
            renamed.CopyFrom(envelope)
            renamed.event_id = f"{envelope.event_id}.expired"
            try:
                self._dead_letter(renamed, NotFoundError(why + " of this feedback"))
                self.parked.remove(event_id)
            except Exception:
                with self.lock:  # parked again, the rest too: the next tick retries them
                    for again, envelope_again, _ in expired[done:]:
                        if again not in self.parked:
                            self.parked.index(again, envelope_again, self.ledger.knows)
                raise
        if expired:
            self.hooks.parked(len(self.parked))
            _log.warning("parked feedback expired to the DLQ", extra={"events": len(expired)})
        return len(expired)

    def _dead_letter(self, envelope: events_pb2.Envelope, error: Exception) -> None:
        """Feedback whose record was committed long ago (parked) to the DLQ, from here."""
        if not self._dead_letters:
            return
        publish_dead_letter(
            self._bus,
            group=self._producer,
            topic=FEEDBACK_TOPIC,
            key=feedback_items(envelope)[0].user_id or envelope.event_id,
            value=envelope.SerializeToString(),
            event_id=envelope.event_id,
            error=error,
            attempts=1,
        )
        self.hooks.dead_letter(FEEDBACK_TOPIC)

    # 4. the scoring backlog ---------------------------------------------------------------
    def hand_over(self, replica_needs_reset: bool) -> tuple[list[ReplicaOp], set[str]] | None:
        """What the next scoring pass gets: (ops for the scorer's replica, the tracks to score),
        or None when there is nothing to hand over. The tracks are no longer dirty from here:
        :meth:`pass_failed` and :meth:`unpublished` give them back.

        Inputs are handed over on every tick, rated or not: the replica then starts from the
        ledger while it is small (the first tick after start-up), and a stream of TrackReady
        never piles up into the first pass that has ratings to score (a snapshot of a 100,000
        track ledger under this lock was 9 % of the process's samples while ratings streamed
        in). A reset (≈ 0.1 s per 50,000 ratings under the lock) happens once per replica."""
        with self.lock:
            reset = self._replica_stale or replica_needs_reset
            if not (self.dirty or self._pending or reset):
                return None
            changed, self.dirty = self.dirty, set()
            ops: list[ReplicaOp] = [("reset", self.ledger.snapshot())] if reset else self._pending
            self._pending, self._replica_stale = [], False
        return ops, changed

    def pass_failed(self, changed: set[str]) -> None:
        """The pass given ``changed`` failed: score them again, from a fresh replica."""
        with self.lock:
            self.dirty |= changed
            self._replica_stale = True

    def unpublished(self, track_ids: Iterable[str]) -> None:
        """Scores computed but not published: score those tracks again on the next pass."""
        with self.lock:
            self.dirty.update(track_ids)
