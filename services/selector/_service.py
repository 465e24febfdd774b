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
set (pairs included, and whether its event went out); ``sel:model`` the served version;
``sel:purged`` hash target track → the iteration that purged it (a purged pair never returns).

Crash safety: the set is saved before its event is published and marked published after, so a
restart republishes a set whose event may not have gone out (same ``trainset_id``, derived from
its pairs: the trainer trains each id once). A pass that fails keeps its new-score count, and a
restart starts with one pass due, so no score that arrived before a crash is left unconsidered.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import threading
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
    RandomSelector,
    TrackKind,
    TrackProvenance,
    TrackScored,
    TrainingPair,
    WeightedSelector,
    auto_near_duplicate,
    manifest_json,
    model_score_by_input,
)
from riffloop.runtime import (
    OperatorGuarded,
    provenance_from_proto,
    scored_items,
    track_scored_to_proto,
)
from riffloop.v1 import common_pb2, events_pb2
from riffloop.v1 import selector_service_pb2 as pb
from riffloop.v1 import selector_service_pb2_grpc as pb_grpc

_log = logging.getLogger("riffloop.selector")


@dataclasses.dataclass(frozen=True, repr=False)
class SelectorSettings(OperatorGuarded):
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
    # "genetic" (the loop: survivors beat their input's baseline) or "random" (a control arm:
    # ``random_pairs`` generations drawn uniformly from those scored since the last set, ω = 1,
    # the ratings unused; seeded by ``random_seed`` and the iteration). "weighted": every
    # generation scored since the last set, weighted by its rating against its input's other
    # generations (riffloop.loop.WeightedSelector, temperature ``weight_temperature``);
    # "permuted": its control arm, the same weights shuffled within each input.
    selection: str = "genetic"
    random_pairs: int = 8
    random_seed: int = 0
    weight_temperature: float = 1.0
    # Preference pairs: each pair also names a generation of the same input that listeners
    # liked less (genetic: the input's lowest-rated one below its baseline; random: another
    # generation of the input, in a random order), for a trainer with RIFFLOOP_PREFERENCE_BETA.
    preference_pairs: bool = False

    def _validate(self) -> None:
        super()._validate()
        if self.select_interval_s <= 0 or self.min_new_scores < 1 or self.min_pairs < 1:
            raise ConfigurationError(
                "RIFFLOOP_SELECT_INTERVAL_S, _MIN_NEW_SCORES and _MIN_PAIRS must be positive"
            )
        if self.selection not in ("genetic", "random", "weighted", "permuted"):
            raise ConfigurationError(
                "RIFFLOOP_SELECTION must be genetic, random, weighted or permuted"
            )
        if not (math.isfinite(self.weight_temperature) and self.weight_temperature > 0):
            raise ConfigurationError("RIFFLOOP_WEIGHT_TEMPERATURE must be a positive number")
        if self.preference_pairs and self.selection in ("weighted", "permuted"):
            raise ConfigurationError(
                "RIFFLOOP_PREFERENCE_PAIRS is for genetic or random selection (a weighted set "
                "names no losers)"
            )
        if self.random_pairs < 1:
            raise ConfigurationError("RIFFLOOP_RANDOM_PAIRS must be at least 1")
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
    if scored.rating_count == 0 and scored.confidence > 0:
        # ω is the share of R that is data (docs/LOOP.md §3): no rating, no confidence
        raise ValidationError(
            f"track {scored.track_id}: confidence {scored.confidence} from no rating"
        )
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
        self.select_lock = threading.Lock()

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
            # one pass is due after a restart: scores counted before the crash were not kept
            self.new_scores = self.settings.min_new_scores if self.scores else 0
        if self.trainset is not None and not self.trainset.get("published", True):
            self._publish(self.trainset)  # saved, then the process died before its event

    def _publish(self, record: dict[str, Any]) -> None:
        """The set's event, then its record marked published (a retry republishes it)."""
        event = events_pb2.TrainsetPublished.FromString(bytes.fromhex(record["event"]))
        self.ports.publish("trainset.published.v1", record["trainset_id"], event)
        record = {**record, "published": True}
        self.ports.kv.set("sel:trainset", json.dumps(record))
        with self.lock:
            self.trainset = record

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
        event = envelope.model_published
        if event.action == common_pb2.MODEL_ACTION_CANARY:
            return  # a canary serves a share only: the purge still compares with the served model
        self.ports.kv.set("sel:model", event.version)

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

    def select_once(
        self, *, force: bool = False, pair_budget: int = 0
    ) -> events_pb2.TrainsetPublished | None:
        return self.run_pass(force=force, pair_budget=pair_budget).trainset

    def run_pass(self, *, force: bool = False, pair_budget: int = 0) -> SelectionPass:
        """One selection pass (the periodic one, or an operator's ``RunSelection``, forced)."""
        if pair_budget and self.settings.selection != "random":
            raise ValidationError("pair_budget is for random selection (a control arm) only")
        if pair_budget < 0:
            raise ValidationError("pair_budget must not be negative")
        with self.select_lock:  # the periodic pass and an operator's never overlap
            with self.lock:
                if not force and self.new_scores < self.settings.min_new_scores:
                    return SelectionPass(None, 0, 0, "waiting for new scores")
                counted = self.new_scores  # taken off only when this pass completes
                scores = dict(self.scores)
                provenances = dict(self.provenances)
                previous = self.trainset
            if previous is not None and not previous.get("published", True):
                self._publish(previous)  # an earlier pass saved it, then failed to publish it
            if self.settings.selection == "random":
                outcome = self._select_random(
                    scores, provenances, previous, pair_budget or self.settings.random_pairs
                )
            elif self.settings.selection in ("weighted", "permuted"):
                outcome = self._select_weighted(scores, provenances, previous)
            else:
                outcome = self._select(scores, provenances, previous)
            with self.lock:
                self.new_scores = max(0, self.new_scores - counted)
            return outcome

    def _select_random(
        self,
        scores: dict[str, TrackScored],
        provenances: dict[str, TrackProvenance],
        previous: dict[str, Any] | None,
        budget: int,
    ) -> SelectionPass:
        """The control arm: ``budget`` generations scored since the last set, drawn at random
        (ω = 1). Each set replaces the last (nothing carries over, nothing is purged), so the
        arm differs from the genetic one only in who chose the pairs."""
        iteration, earlier, new = _since_last_set(scores, previous)
        fresh = [provenances[t] for t in new]
        embeddings = {p.track_id: self._embedding(p.track_id) for p in fresh}
        selector = RandomSelector(
            self.settings.random_seed * 1000 + iteration, preference=self.settings.preference_pairs
        )
        pairs = selector.select(fresh, embeddings, budget, iteration)
        if len(pairs) < self.settings.min_pairs:
            return SelectionPass(None, len(fresh), 0, "too few pairs")
        event = self._save_and_publish(
            pairs, iteration, previous, seen=sorted(earlier | {p.track_id for p in fresh})
        )
        return SelectionPass(event, len(fresh), 0, "published")

    def _select_weighted(
        self,
        scores: dict[str, TrackScored],
        provenances: dict[str, TrackProvenance],
        previous: dict[str, Any] | None,
    ) -> SelectionPass:
        """Every generation scored since the last set, weighted by its rating against its
        input's other generations ("permuted": those weights shuffled within each input, the
        control arm). Like the random control, each set replaces the last (nothing carries
        over, nothing is purged): the fine-tune learns from the session its model served."""
        iteration, earlier, new = _since_last_set(scores, previous)
        fresh = {t: scores[t] for t in new}
        embeddings = {t: self._embedding(t) for t in fresh}
        # every baseline score stays in: R_b says which generations may become champions
        baselines = {t: s for t, s in scores.items() if s.kind is TrackKind.BASELINE}
        control = self.settings.selection == "permuted"
        selector = WeightedSelector(
            self.settings.weight_temperature,
            permute_seed=self.settings.random_seed * 1000 + iteration if control else None,
        )
        result = selector.select(fresh | baselines, provenances, embeddings, iteration)
        _log.info(
            "weighted selection",
            extra={"pairs": len(result.pairs), "candidates": result.candidates, **result.dropped},
        )
        counts = (result.candidates, result.survivors)
        if len(result.pairs) < self.settings.min_pairs:
            return SelectionPass(None, *counts, "too few pairs")
        event = self._save_and_publish(
            result.pairs, iteration, previous, seen=sorted(earlier | set(fresh))
        )
        return SelectionPass(event, *counts, "published")

    def _select(
        self,
        scores: dict[str, TrackScored],
        provenances: dict[str, TrackProvenance],
        previous: dict[str, Any] | None,
    ) -> SelectionPass:
        kv = self.ports.kv
        generated = [s.track_id for s in scores.values() if s.kind is TrackKind.GENERATED]
        embeddings = {t: self._embedding(t) for t in generated}
        iteration = (previous["iteration"] + 1) if previous else 1
        selector = GeneticSelector(
            cap_per_input=self.settings.cap_per_input, preference=self.settings.preference_pairs
        )
        result = selector.select(scores, provenances, embeddings, iteration)
        old_pairs = [_pair_from_dict(p) for p in previous["pairs"]] if previous else []
        chosen = {p.target_track_id for p in old_pairs}
        purged = set(kv.hgetall("sel:purged"))
        merged = old_pairs + [p for p in result.pairs if p.target_track_id not in chosen | purged]
        model = kv.get("sel:model") or ""
        purge = PurgeCycle(
            max_age=self.settings.max_age,
            # old and new pairs against each other: δ from their own spread (as the demo does)
            near_duplicate=auto_near_duplicate([np.asarray(p.embedding) for p in merged]),
            cap_per_input=self.settings.cap_per_input,
        )
        kept = purge.apply(merged, iteration, model_score_by_input(scores, model, provenances)).kept
        counts = (result.candidates, result.survivors)
        if len(kept) < self.settings.min_pairs:
            _log.info(
                "no training set",
                extra={"candidates": result.candidates, "survivors": result.survivors},
            )
            return SelectionPass(None, *counts, "too few pairs")
        if previous and {p.target_track_id for p in kept} == chosen:
            return SelectionPass(None, *counts, "unchanged")  # the last set stands
        # a pair of the last set that the purge dropped stays dropped: the next pass must not
        # re-admit it as a fresh survivor (a newcomer turned away by the cap may come back)
        dropped = chosen - {p.target_track_id for p in kept}
        if dropped:
            kv.hset("sel:purged", {t: str(iteration) for t in dropped})
        event = self._save_and_publish(kept, iteration, previous)
        return SelectionPass(event, *counts, "published")

    def _save_and_publish(
        self,
        kept: list[TrainingPair],
        iteration: int,
        previous: dict[str, Any] | None,
        **extra: Any,
    ) -> events_pb2.TrainsetPublished:
        kv = self.ports.kv
        model = kv.get("sel:model") or ""
        kept_ids = sorted(p.target_track_id for p in kept)
        # the same pairs give the same id, so a set republished after a crash is trained once
        digest = hashlib.sha256("\n".join(kept_ids).encode()).hexdigest()[:8]
        trainset_id = f"ts-{iteration:04d}-{digest}"
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
            "published": False,
            **extra,
        }
        kv.set("sel:trainset", json.dumps(record))  # saved first: a crash now republishes it
        with self.lock:
            self.trainset = record
        self._publish(record)
        _log.info("training set published", extra={"trainset_id": trainset_id, "pairs": len(kept)})
        return event


def _since_last_set(
    scores: dict[str, TrackScored], previous: dict[str, Any] | None
) -> tuple[int, set[str], list[str]]:
    """For a selector whose sets each replace the last (random, weighted, permuted): the next
    iteration, the tracks earlier sets drew from (the last record's ``seen``) and the
    generations scored since, in score order."""
    iteration = (previous["iteration"] + 1) if previous else 1
    earlier = set(previous.get("seen", [])) if previous else set()
    new = [t for t, s in scores.items() if s.kind is TrackKind.GENERATED and t not in earlier]
    return iteration, earlier, new


@dataclasses.dataclass(frozen=True)
class SelectionPass:
    """What one selection pass did: the set it published (None when none) and why."""

    trainset: events_pb2.TrainsetPublished | None
    candidates: int
    survivors: int
    outcome: str


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

    def RunSelection(
        self, request: pb.RunSelectionRequest, context: Any
    ) -> pb.RunSelectionResponse:
        done = self.state.run_pass(force=True, pair_budget=request.pair_budget)
        return pb.RunSelectionResponse(
            trainset=done.trainset,
            candidates=done.candidates,
            survivors=done.survivors,
            outcome=done.outcome,
        )

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
