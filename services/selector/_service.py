"""The selector: scored tracks in, training sets out (riffloop.loop's genetic selection + purge).

1. tracks.scored.v1 → remember the latest (R, ω, n) and provenance of every track.
2. model.published.v1 → remember the model being served (the purge compares pairs with it).
3. Every ``select_interval_s``, when at least ``min_new_scores`` scores arrived since the last
   set: ``GeneticSelector.select`` (survivors beat their input's baseline), ``PurgeCycle.apply``
   over the previous set plus the survivors, write the manifest to ``trainsets/<id>.json`` and
   publish trainset.published.v1.

Embeddings for the diversity guard come from each track's provenance object
(``tracks/<track_id>.json``, field ``embedding``) written by the generator.

Key-value layout: ``sel:scores`` hash track → JSON score; ``sel:trainset`` JSON of the last
published set (pairs included); ``sel:model`` the served version.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import threading
import uuid
from typing import Any

import numpy as np

from riffloop.core import (
    ConfigurationError,
    NotFoundError,
    ValidationError,
    refuse_items,
)
from riffloop.loop import (
    GeneticSelector,
    PurgeCycle,
    TrackKind,
    TrackProvenance,
    TrackScored,
    TrainingPair,
    manifest_json,
    model_score_by_input,
)
from riffloop.runtime import (
    ServiceSettings,
    provenance_from_proto,
    scored_items,
    track_scored_to_proto,
)
from riffloop.v1 import events_pb2
from riffloop.v1 import selector_service_pb2 as pb
from riffloop.v1 import selector_service_pb2_grpc as pb_grpc

_log = logging.getLogger("riffloop.selector")


@dataclasses.dataclass(frozen=True, repr=False)
class SelectorSettings(ServiceSettings):
    service_name: str = "selector"
    grpc_port: int = 50055
    metrics_port: int = 9105
    select_interval_s: float = 5.0
    # New scores needed before another training set is considered.
    min_new_scores: int = 4
    # A set with fewer pairs is not published (the trainer would over-fit on it).
    min_pairs: int = 1
    cap_per_input: int = 3
    max_age: int = 2

    def _validate(self) -> None:
        super()._validate()
        if self.select_interval_s <= 0 or self.min_new_scores < 1 or self.min_pairs < 1:
            raise ConfigurationError(
                "RIFFLOOP_SELECT_INTERVAL_S, _MIN_NEW_SCORES and _MIN_PAIRS must be positive"
            )
        if self.cap_per_input < 1 or self.max_age < 1:
            raise ConfigurationError(
                "RIFFLOOP_CAP_PER_INPUT and RIFFLOOP_MAX_AGE must be at least 1 (0 purges every "
                "pair, so no training set would ever be published)"
            )


def _score_from_event(scored: events_pb2.TrackScored, prov: TrackProvenance) -> TrackScored:
    """The loop's TrackScored; a score that is not a number, or ω outside [0, 1], is refused,
    never ranked (R is on the star scale but not clipped to it: rater normalisation can leave
    it a little outside 1–5)."""
    if not math.isfinite(scored.mean_rating):
        raise ValidationError(f"track {scored.track_id}: mean rating {scored.mean_rating}")
    if not 0.0 <= scored.confidence <= 1.0:  # also refuses NaN
        raise ValidationError(f"track {scored.track_id}: confidence {scored.confidence} ∉ [0, 1]")
    return TrackScored(
        track_id=scored.track_id,
        kind=prov.kind,
        input_key=prov.input_key,
        score=float(scored.mean_rating),
        omega=float(scored.confidence),
        n_ratings=int(scored.rating_count),
        effective_n=float(scored.rating_count) * float(scored.confidence),
        mean_stars=float(scored.mean_rating),
    )


class SelectorState:
    def __init__(self, ports: Any, settings: SelectorSettings) -> None:
        self.ports = ports
        self.settings = settings
        self.lock = threading.Lock()
        self.scores: dict[str, TrackScored] = {}
        self.provenances: dict[str, TrackProvenance] = {}
        self.embeddings: dict[str, np.ndarray] = {}
        self.new_scores = 0
        self.trainset: dict[str, Any] | None = None

    def rebuild(self) -> None:
        kv = self.ports.kv
        with self.lock:
            for raw in kv.hgetall("sel:scores").values():
                row = json.loads(raw)
                prov = TrackProvenance.from_json(row["provenance"])
                self.provenances[prov.track_id] = prov
                self.scores[prov.track_id] = TrackScored(
                    **{**row["score"], "kind": TrackKind(row["score"]["kind"])}
                )
            raw_set = kv.get("sel:trainset")
            self.trainset = json.loads(raw_set) if raw_set else None

    # -- events -------------------------------------------------------------------------------

    def on_track_scored(self, envelope: events_pb2.Envelope) -> None:
        """One TrackScored or a chunk of a scoring pass: all of it in one key-value write. A
        chunk's bad items are refused on their own (``ItemsRefused``: they go to the DLQ, the
        rest of the chunk is kept); a single bad TrackScored is dead-lettered as before."""
        rows: dict[str, str] = {}
        latest: dict[str, tuple[TrackProvenance, TrackScored]] = {}
        batched = envelope.WhichOneof("payload") == "track_scored_batch"
        refused: list[tuple[events_pb2.TrackScored, str]] = []
        items = scored_items(envelope)
        for scored in items:
            try:
                if not scored.track_id:
                    raise ValidationError("a score carries no track_id")
                prov = provenance_from_proto(scored.track_id, scored.provenance)
                score = _score_from_event(scored, prov)
            except ValidationError as exc:
                if not batched:
                    raise
                refused.append((scored, f"{scored.track_id or '?'}: {exc.reason}"))
                continue
            row = {
                "provenance": prov.to_json(),
                "score": {**score.to_dict(), "kind": str(prov.kind)},
            }
            rows[scored.track_id] = json.dumps(row)
            latest[scored.track_id] = (prov, score)
        if rows:
            self.ports.kv.hset("sel:scores", rows)
            with self.lock:
                for track_id, (prov, score) in latest.items():
                    self.provenances[track_id] = prov
                    self.scores[track_id] = score
                self.new_scores += len(latest)
        refuse_items(envelope, "track_scored_batch", refused, len(items))

    def on_model_published(self, envelope: events_pb2.Envelope) -> None:
        self.ports.kv.set("sel:model", envelope.model_published.version)

    # -- selection ----------------------------------------------------------------------------

    def _embedding(self, track_id: str) -> np.ndarray:
        cached = self.embeddings.get(track_id)
        if cached is None:
            try:
                raw = json.loads(self.ports.objects.get("tracks", f"{track_id}.json"))
                cached = np.asarray(raw.get("embedding") or [0.0], dtype=float)
            except NotFoundError:
                cached = np.zeros(1)
            self.embeddings[track_id] = cached
        return cached

    def select_once(self, *, force: bool = False) -> events_pb2.TrainsetPublished | None:
        with self.lock:
            if not force and self.new_scores < self.settings.min_new_scores:
                return None
            self.new_scores = 0
            scores = dict(self.scores)
            provenances = dict(self.provenances)
            previous = self.trainset
        generated = [s.track_id for s in scores.values() if s.kind is TrackKind.GENERATED]
        embeddings = {t: self._embedding(t) for t in generated}
        iteration = (previous["iteration"] + 1) if previous else 1
        selector = GeneticSelector(cap_per_input=self.settings.cap_per_input)
        result = selector.select(scores, provenances, embeddings, iteration)
        old_pairs = [_pair_from_dict(p) for p in previous["pairs"]] if previous else []
        chosen = {p.target_track_id for p in old_pairs}
        merged = old_pairs + [p for p in result.pairs if p.target_track_id not in chosen]
        model = self.ports.kv.get("sel:model") or ""
        purge = PurgeCycle(max_age=self.settings.max_age, cap_per_input=self.settings.cap_per_input)
        kept = purge.apply(merged, iteration, model_score_by_input(scores, model, provenances)).kept
        if len(kept) < self.settings.min_pairs:
            _log.info(
                "no training set",
                extra={"candidates": result.candidates, "survivors": result.survivors},
            )
            return None
        if previous and {p.target_track_id for p in kept} == chosen:
            return None  # nothing new survived: the last set stands
        trainset_id = f"ts-{iteration:04d}-{uuid.uuid4().hex[:8]}"
        ref = self.ports.objects.put(
            "trainsets",
            f"{trainset_id}.json",
            manifest_json(kept, trainset_id).encode(),
            content_type="application/json",
        )
        event = events_pb2.TrainsetPublished(
            trainset_id=trainset_id,
            manifest=ref.to_proto(),
            pair_count=len(kept),
            iteration=iteration,
            model_version=model,
        )
        record = {
            "trainset_id": trainset_id,
            "iteration": iteration,
            "model_version": model,
            "pairs": [p.to_dict() for p in kept],
            "event": event.SerializeToString().hex(),
        }
        self.ports.publish("trainset.published.v1", trainset_id, event)
        self.ports.kv.set("sel:trainset", json.dumps(record))
        with self.lock:
            self.trainset = record
        _log.info("training set published", extra={"trainset_id": trainset_id, "pairs": len(kept)})
        return event


def _pair_from_dict(raw: dict[str, Any]) -> TrainingPair:
    return TrainingPair(
        **{
            **raw,
            "input_song_ids": tuple(raw["input_song_ids"]),
            "embedding": tuple(raw["embedding"]),
        }
    )


class SelectorServicer(pb_grpc.SelectorServiceServicer):
    def __init__(self, state: SelectorState) -> None:
        self.state = state

    def CurrentTrainset(self, request: Any, context: Any) -> pb.CurrentTrainsetResponse:
        with self.state.lock:
            record = self.state.trainset
        if record is None:
            return pb.CurrentTrainsetResponse()
        event = events_pb2.TrainsetPublished.FromString(bytes.fromhex(record["event"]))
        return pb.CurrentTrainsetResponse(trainset=event)

    def Population(self, request: pb.PopulationRequest, context: Any) -> pb.PopulationResponse:
        size = request.page_size or 100
        if not 1 <= size <= 1000:
            raise ValidationError("page_size must lie in 1–1000 (or 0 for 100)")
        with self.state.lock:
            scores = dict(self.state.scores)
            provenances = dict(self.state.provenances)
            record = self.state.trainset
        from riffloop.loop import baseline_scores

        baseline = baseline_scores(scores)
        chosen = {p["target_track_id"] for p in record["pairs"]} if record else set()
        members = [
            pb.PopulationMember(
                score=track_scored_to_proto(s, provenances[s.track_id]),
                baseline_mean_rating=baseline.get(s.input_key, 0.0),
                survives=s.track_id in chosen,
            )
            for s in sorted(scores.values(), key=lambda s: (-s.score, s.track_id))
        ]
        return pb.PopulationResponse(members=members[:size], total_count=len(members))
