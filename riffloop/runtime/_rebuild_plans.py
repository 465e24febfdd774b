"""What the feedback service and the gateway rebuild from the log (riffloop.runtime._rebuild),
each with its consumer's own rules.

- feedback: tracks.ready.v1, then feedback.received.v1, into a fresh
  ``riffloop.loop.FeedbackIntake`` on the store: the ledger's mirror (``fb:tracks``,
  ``fb:ratings:<track>``, ``fb:listens:<track>``), ``fb:parked`` and ``fb:refused``. The scores
  and ``fb:model-ratings`` follow from them on the next scoring pass.
- gateway: generation.requested.v1, its DLQ, tracks.ready.v1, feedback.received.v1 and
  model.published.v1 into :class:`TrackRecords` (track records, the queue, who was served and
  who rated, the models).
- selector: tracks.scored.v1 and model.published.v1 through a fresh copy of its consumer's
  handlers (``sel:scores``, ``sel:model``), then trainset.published.v1 with the manifests it
  names into :class:`TrainsetHistory` (``sel:trainset``, ``sel:purged``).
- trainer: the running canary's evidence (``trainer:canary:<candidate>`` and its looks) from
  model.published.v1 and tracks.scored.v1 (:class:`CanaryEvidence`).
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from riffloop.core import EventBus, KeyValueStore, ObjectStore
from riffloop.runtime._convert import checked_track_ready
from riffloop.runtime._rebuild import EnvelopeHandler, RebuildPlan, Replay
from riffloop.runtime._track_records import REBUILT_MARKER, TrackRecords

FEEDBACK_REBUILT_MARKER = "fb:rebuilt"
SELECTOR_REBUILT_MARKER = "sel:rebuilt"
SELECTOR_TRAINSET_KEY = "sel:trainset"
SELECTOR_PURGED_KEY = "sel:purged"
TRAINER_REBUILT_MARKER = "trainer:rebuilt"
CANARY_EVIDENCE_PREFIX = "trainer:canary:"  # + candidate: riffloop.loop.ReleaseCycle's hash


def feedback_track_record(envelope: Any) -> Any:
    """A tracks.ready.v1 envelope as the feedback ledger's ``TrackRecord``: its provenance, its
    clip length, served to the user it was made for at the event's time."""
    from riffloop.loop import TrackRecord

    ready = envelope.track_ready
    provenance = checked_track_ready(ready)
    served_at = envelope.occurred_at.ToNanoseconds() / 1e9
    served_to = {ready.user_id: served_at} if ready.user_id else {}
    return TrackRecord(provenance, ready.duration_seconds, served_to)


def feedback_rebuild_plan(kv: KeyValueStore, bus: EventBus, *, producer: str) -> RebuildPlan:
    """The feedback service's plan (``producer``: its consumer group, as in the live intake)."""
    from riffloop.loop import FeedbackIntake

    def start() -> Replay:
        intake = FeedbackIntake(kv, bus, producer=producer, dead_letters=False)

        def finish() -> None:
            intake.release_parked()  # feedback that met its track only later in the replay

        return Replay(
            {
                "tracks.ready.v1": lambda e: intake.on_track_ready(feedback_track_record(e)),
                "feedback.received.v1": intake.on_feedback,
            },
            finish,
        )

    return RebuildPlan(FEEDBACK_REBUILT_MARKER, ("tracks.ready.v1", "feedback.received.v1"), start)


def gateway_rebuild_plan(kv: KeyValueStore, dispatcher: Any, *, producer: str) -> RebuildPlan:
    """The gateway's plan; ``dispatcher`` derives track ids from request ids (its key must be
    the gateway's ``RIFFLOOP_DISPATCH_KEY``), ``producer`` is the gateway's service name."""

    def start() -> Replay:
        records = TrackRecords(kv, dispatcher, producer=producer, event_time=True)
        return Replay(
            {
                "generation.requested.v1": records.on_generation_requested,
                "generation.requested.v1.dlq": records.on_generation_dead_lettered,
                "tracks.ready.v1": records.on_track_ready,
                "feedback.received.v1": records.on_feedback,
                "model.published.v1": records.on_model_published,
            },
            finish=records.count_queue_serves,
        )

    return RebuildPlan(
        REBUILT_MARKER,
        (
            "generation.requested.v1",
            "generation.requested.v1.dlq",
            "tracks.ready.v1",
            "feedback.received.v1",
            "model.published.v1",
        ),
        start,
    )


class TrainsetHistory:
    """The selector's last training set and its purged pairs, from trainset.published.v1 and
    the manifests its events name (``trainsets/<id>.json``, written before each event).

    The selector purges exactly the pairs of its last set that the next set leaves out
    (``sel:purged``: target track → the iteration that dropped it; a purged pair never
    returns), so the purged pairs are the differences between consecutive sets, in iteration
    order (the topic's partitions do not keep that order: the sets are sorted here). The newest
    set is ``sel:trainset``, published. A selector that draws each set from the tracks scored
    since the last (random, weighted, permuted: ``purges`` False) purges nothing; its record's
    ``seen`` comes back as every target of every set. A weighted set trains every compared
    generation, so that is nearly all it had seen; a random arm may draw again a track it had
    seen but not drawn."""

    def __init__(self, kv: KeyValueStore, objects: ObjectStore, *, purges: bool) -> None:
        self.kv = kv
        self.objects = objects
        self.purges = purges
        self._events: dict[str, Any] = {}  # trainset id → TrainsetPublished

    def on_trainset_published(self, envelope: Any) -> None:
        event = envelope.trainset_published
        self._events[event.trainset_id] = event

    def finish(self) -> None:
        ordered = sorted(self._events.values(), key=lambda e: (e.iteration, e.trainset_id))
        previous: set[str] | None = None
        pairs: list[Any] = []
        trained: set[str] = set()  # every set's targets
        for event in ordered:
            manifest = json.loads(self.objects.get(event.manifest.bucket, event.manifest.key))
            pairs = list(manifest["pairs"])
            targets = {str(p["target_track_id"]) for p in pairs}
            trained |= targets
            if self.purges and previous is not None and (dropped := previous - targets):
                self.kv.hset(SELECTOR_PURGED_KEY, {t: str(event.iteration) for t in dropped})
            previous = targets
        if not ordered:
            return
        last = ordered[-1]
        raw = self.kv.get(SELECTOR_TRAINSET_KEY)
        if raw is not None and int(json.loads(raw)["iteration"]) > last.iteration:
            return  # the live selector saved a newer one meanwhile
        record = {
            "trainset_id": last.trainset_id,
            "iteration": int(last.iteration),
            "model_version": last.model_version,
            "pairs": pairs,
            "event": last.SerializeToString().hex(),
            "published": True,
        }
        if not self.purges:
            record["seen"] = sorted(trained)
        self.kv.set(SELECTOR_TRAINSET_KEY, json.dumps(record))


def selector_rebuild_plan(
    kv: KeyValueStore,
    objects: ObjectStore,
    consumer_handlers: Callable[[], Mapping[str, EnvelopeHandler]],
    *,
    purges: bool,
) -> RebuildPlan:
    """The selector's plan. ``consumer_handlers`` gives, for each rebuild, a fresh copy of its
    consumer's handlers of tracks.scored.v1 and model.published.v1 (writing the store as the
    live ones do); ``purges``: the genetic arm (the random control arm purges nothing)."""

    def start() -> Replay:
        history = TrainsetHistory(kv, objects, purges=purges)
        handlers = dict(consumer_handlers())
        handlers["trainset.published.v1"] = history.on_trainset_published
        return Replay(handlers, history.finish)

    return RebuildPlan(
        SELECTOR_REBUILT_MARKER,
        ("tracks.scored.v1", "model.published.v1", "trainset.published.v1"),
        start,
    )


class CanaryEvidence:
    """The running canary's evidence, as ``riffloop.loop.ReleaseCycle`` keeps it for a restart
    (``trainer:canary:<candidate>``: track → ScoredTrack JSON; ``…:looks``: the planned looks
    taken), from the log.

    The canary is the one ``models/CANARY`` names while the registry still has it as CANARY
    (what ``ReleaseCycle.resume_canary`` watches). Its evidence is the latest score of every
    track of either version (parent, candidate) recorded since the canary began — its CANARY
    event on model.published.v1 — with a finite R; a look is taken for each planned sample size
    (``Canary.looks``) the smaller side's generations reached, as the watch took them. Scores
    recorded in the same instant as the CANARY event by another host's clock may differ by a
    few parent tracks from what the live watch saw. Without a running canary there is nothing
    to rebuild: a promoted-at-once version's watch (``trainer:watch``) is not on the log."""

    def __init__(
        self,
        kv: KeyValueStore,
        objects: ObjectStore,
        scored_tracks: Callable[[Any], Sequence[Any]],
        *,
        min_ratings: int,
        max_ratings: int,
    ) -> None:
        from riffloop.core import NotFoundError
        from riffloop.loop import ModelRegistry, VersionStatus
        from riffloop.runtime._models import ModelStore

        self.kv = kv
        self.scored_tracks = scored_tracks
        self.min_ratings, self.max_ratings = min_ratings, max_ratings
        self.watch: tuple[str, str] | None = None
        self.since: float | None = None
        self.evidence: dict[str, Any] = {}
        marker = ModelStore(objects).canary()
        if marker is None:
            return
        version, parent = str(marker["version"]), str(marker.get("parent") or "")
        try:
            record = ModelRegistry(objects).get(version)
        except NotFoundError:
            return
        if record.status is VersionStatus.CANARY and parent:
            self.watch = (parent, version)

    def on_model_published(self, envelope: Any) -> None:
        from riffloop.v1 import common_pb2

        event = envelope.model_published
        if self.watch is None or event.version != self.watch[1]:
            return
        if event.action == common_pb2.MODEL_ACTION_CANARY:  # the latest start of this canary
            self.since = envelope.occurred_at.ToNanoseconds() / 1e9

    def on_track_scored(self, envelope: Any) -> None:
        if self.watch is None or self.since is None:
            return
        if envelope.occurred_at.ToNanoseconds() / 1e9 < self.since:
            return  # scored before the canary began: the watch never saw it
        for scored in self.scored_tracks(envelope):
            if scored.model_version in self.watch and math.isfinite(scored.score):
                self.evidence[scored.track_id] = scored

    def finish(self) -> None:
        from riffloop.loop import Canary, canary_margins

        if self.watch is None or not self.evidence:
            return
        parent, candidate = self.watch
        key = CANARY_EVIDENCE_PREFIX + candidate
        self.kv.hset(key, {t: s.to_json() for t, s in self.evidence.items()})
        margins = canary_margins(self.evidence, self.watch)
        smaller = min(len(margins[parent]), len(margins[candidate]))
        looks = bisect.bisect_right(Canary.looks(self.min_ratings, self.max_ratings), smaller)
        if looks:
            self.kv.set(key + ":looks", str(looks))


def trainer_rebuild_plan(
    kv: KeyValueStore,
    objects: ObjectStore,
    scored_tracks: Callable[[Any], Sequence[Any]],
    *,
    min_ratings: int,
    max_ratings: int,
) -> RebuildPlan:
    """The trainer's plan: ``scored_tracks`` is its consumer's reading of a tracks.scored.v1
    record (riffloop.loop ScoredTrack of each rated track), ``min_ratings`` / ``max_ratings``
    its canary settings."""

    def start() -> Replay:
        evidence = CanaryEvidence(
            kv, objects, scored_tracks, min_ratings=min_ratings, max_ratings=max_ratings
        )
        return Replay(
            {
                "model.published.v1": evidence.on_model_published,
                "tracks.scored.v1": evidence.on_track_scored,
            },
            evidence.finish,
        )

    return RebuildPlan(TRAINER_REBUILT_MARKER, ("model.published.v1", "tracks.scored.v1"), start)
