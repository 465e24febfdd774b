"""The scoring pass, kept off the consumer's interpreter: a replica of the ledger in a child
process, fed the consumer's accepted inputs, asked for the changed tracks' scores.

Why a process: a pass re-scores every rating (ω pools all raters, so it is O(N) in the
ledger, ≈ 1 s of pure Python and numpy per 50,000 ratings). In the consumer's process that
second held the interpreter lock, and the consumer, which needs it after every Redis and
Kafka call, fell behind the gateway by 1.6–2.1 s in half the benchmark runs (bench/README.md,
session 5). In a child the pass runs on its own core under a lower CPU priority
(``scorer_niceness``), and the consumer's process only pickles the inputs it accepted since
the last pass and parses the finished TrackScoredBatch chunks.

Protocol (one request, one reply, over a ``multiprocessing`` pipe, driven by the parent's
scoring thread so the consumer never blocks on it):

    parent → child   (ops, changed)   ops: ("reset", ledger snapshot) | ("track", record)
                                            | ("rating", Rating) | ("listen", ListenEvent)
                     None             close
    child → parent   PassResult | _Failure

The child applies the ops to its own :class:`FeedbackLedger` in the order the consumer applied
them, so its ledger equals the parent's at the moment the pass was asked for. A child that
dies or hangs is replaced, and its successor starts from a ``reset`` with the parent's
snapshot: nothing accepted is lost, the unpublished tracks stay dirty and are scored again.

:class:`InlineScorer` runs the same :class:`ScoreMirror` in the calling thread: for tests and
the one-process embedded stack, where a child process buys nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import multiprocessing
import os
import signal
import time
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
from scipy import stats

from riffloop.core import ConflictError
from riffloop.loop import (
    ConfidenceWeight,
    FeedbackLedger,
    SpamFilter,
    SpamReport,
    TrackKind,
    TrackProvenance,
    TrackScores,
)
from riffloop.runtime import metrics, track_scored_to_proto
from riffloop.v1 import events_pb2

_log = logging.getLogger("riffloop.feedback")

# Scores per TrackScoredBatch record: ≈ 150 bytes each, so a record stays near 75 kB, far under
# Kafka's 1 MB default message limit, and a consumer's retry of one record redoes little.
SCORES_PER_RECORD = 500

Op = tuple[str, Any]

# A spawned child imports numpy, scipy and the loop package before it can score (≈ 2 s idle).
_START_TIMEOUT_S = 120.0
_NO_REQUEST = object()  # ProcessScorer._exchange: only wait for the child's message


class ScorerError(RuntimeError):
    """The scoring pass failed (the child died, hung, or raised); the next pass starts over."""


STAR_INTERVAL_LEVEL = 0.95


@dataclasses.dataclass(frozen=True)
class KindRatings:
    """What listeners said of one kind of track (generated or baseline) of one model version.

    Stars, for people: the raw stars x_i ∈ {1 … 5} of the accepted ratings whose raters quality
    control trusts (ρ_r > 0; a caught spammer or bot has ρ_r = 0), pooled over the tracks:

        x̄ = Σ x_i / n      s² = (Σ x_i² − n·x̄²) / (n − 1)
        95 % interval  x̄ ± t_{0.975, n−1} · s / √n, clipped to the star range [1, 5];
        none when n < 2 (``stars_low``/``stars_high`` None); [x̄, x̄] when every star is equal.

    The t-interval treats the ratings as independent. Ratings of one track share that track's
    quality, so when a few tracks carry most ratings the interval is narrower than the
    uncertainty about the version (a bootstrap over tracks would widen it).

    Normalised score, for the loop: Σ_j R_j·n_j / Σ_j n_j over the tracks j (R_j the track's
    shrunk, rater-normalised score, n_j its accepted ratings, trusted or not): what the
    selector and the canary compare, on the star scale but not a mean of stars."""

    mean_stars: float = 0.0
    stars_low: float | None = None
    stars_high: float | None = None
    rating_count: int = 0  # n, the ratings behind mean_stars
    track_count: int = 0  # the tracks they rate
    mean_normalised_score: float = 0.0
    normalised_rating_count: int = 0  # Σ_j n_j


def star_summary(n: int, total: float, total_sq: float) -> tuple[float, float | None, float | None]:
    """(x̄, low, high) of n stars from Σ x and Σ x² (the t-interval of :class:`KindRatings`)."""
    if n < 1:
        return 0.0, None, None
    mean = total / n
    if n < 2:
        return mean, None, None
    variance = max(0.0, (total_sq - n * mean * mean) / (n - 1))  # round-off can dip below 0
    half = float(stats.t.ppf(0.5 + STAR_INTERVAL_LEVEL / 2, n - 1)) * math.sqrt(variance / n)
    return mean, max(1.0, mean - half), min(5.0, mean + half)


@dataclasses.dataclass(frozen=True)
class ModelRatings:
    """What listeners think of one model version, generated and baseline tracks apart — the
    baseline z0 is served under the version that was current, so the pair compares the model
    with its own training data on the same requests. The ``fb:model-ratings`` value."""

    generated: KindRatings = KindRatings()
    baseline: KindRatings = KindRatings()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def model_ratings(
    scores: TrackScores, provenance: Callable[[str], TrackProvenance]
) -> dict[str, ModelRatings]:
    """Per-version aggregates of the latest scores (tracks without a version are skipped)."""
    groups: dict[tuple[str, TrackKind], int] = {}  # (version, kind) → g
    codes = np.full(len(scores.first), -1, dtype=np.int64)
    for j, o in enumerate(scores.first):
        prov = provenance(o.track_id)
        if prov.model_version:
            codes[j] = groups.setdefault((prov.model_version, prov.kind), len(groups))
    k = len(groups)

    def per_group(keep: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return np.bincount(codes[keep], weights=weights[keep], minlength=k)

    # the normalised score: Σ R_j n_j and Σ n_j
    rated = (codes >= 0) & (scores.n_ratings > 0)
    n = scores.n_ratings.astype(float)
    score_total, score_count = per_group(rated, scores.score * n), per_group(rated, n)
    # the stars: Σ x, Σ x², n over trusted ratings, and the tracks they rate
    trusted = (codes >= 0) & (scores.n_trusted > 0)
    n_t = scores.n_trusted.astype(float)
    with np.errstate(invalid="ignore"):  # mean_stars is NaN where n_trusted = 0 (not kept)
        star_total = per_group(trusted, scores.mean_stars * n_t)
    star_sq, star_count = per_group(trusted, scores.sum_sq_stars), per_group(trusted, n_t)
    tracks = per_group(trusted, np.ones(len(codes)))

    def of(version: str, kind: TrackKind) -> KindRatings:
        g = groups.get((version, kind))
        if g is None:
            return KindRatings()
        count = round(float(star_count[g]))
        mean, low, high = star_summary(count, float(star_total[g]), float(star_sq[g]))
        scored = int(score_count[g])
        return KindRatings(
            mean_stars=mean,
            stars_low=low,
            stars_high=high,
            rating_count=count,
            track_count=int(tracks[g]),
            mean_normalised_score=float(score_total[g] / scored) if scored else 0.0,
            normalised_rating_count=scored,
        )

    return {
        version: ModelRatings(of(version, TrackKind.GENERATED), of(version, TrackKind.BASELINE))
        for version in {version for version, _ in groups}
    }


@dataclasses.dataclass(frozen=True)
class PassResult:
    """One pass's output: the changed tracks' scores as serialized TrackScoredBatch chunks of
    at most ``SCORES_PER_RECORD`` (in track order), every version's :class:`ModelRatings`, the
    spam report, and the seconds the pass computed."""

    chunks: list[bytes]
    model_ratings: dict[str, ModelRatings]
    report: SpamReport | None
    seconds: float


def register_record(ledger: FeedbackLedger, record: dict[str, Any]) -> None:
    """Apply one ``fb:tracks`` record (provenance, clip length, who it was served to)."""
    prov = TrackProvenance.from_json(record["provenance"])
    ledger.register_track(prov, float(record["clip_seconds"]))
    for user, served_at in record["served_to"].items():
        ledger.mark_served(prov.track_id, user, float(served_at))


class ScoreMirror:
    """A ledger fed the consumer's accepted inputs, and the O(N) pass over it."""

    def __init__(self, spam: SpamFilter, confidence: ConfidenceWeight) -> None:
        self.spam = spam
        self.confidence = confidence
        self.ledger = FeedbackLedger()

    def apply(self, ops: Sequence[Op]) -> None:
        for kind, value in ops:
            if kind == "reset":
                self.ledger = FeedbackLedger.restore(value)
            elif kind == "track":
                register_record(self.ledger, value)
            else:
                # the parent accepted it once (so it was served to its rater, by the queue if
                # not their own); a replayed op is a no-op
                self.ledger.mark_served(value.track_id, value.rater_id, value.submitted_at)
                with contextlib.suppress(ConflictError):
                    (self.ledger.rate if kind == "rating" else self.ledger.listen)(value)

    def score(self, changed: set[str]) -> PassResult:
        """Re-score everything (ω pools all raters); serialize the changed tracks' scores."""
        started = time.perf_counter()
        if not changed:  # inputs handed over, nothing rated since the last pass
            return PassResult([], {}, None, time.perf_counter() - started)
        observations = self.ledger.observations()
        if not observations:
            return PassResult([], {}, None, time.perf_counter() - started)
        provenance = self.ledger.provenance  # every rated track is registered
        report = self.spam.inspect(observations)
        scores = self.confidence.score_arrays(observations, report)
        ordered = sorted(changed & scores.index.keys())
        publish = set(ordered)
        listened: dict[str, list[float]] = {}
        for o in observations:
            if o.track_id in publish:
                listened.setdefault(o.track_id, []).append(o.listened_fraction)
        chunks = []
        for start in range(0, len(ordered), SCORES_PER_RECORD):
            batch = events_pb2.TrackScoredBatch()
            for track_id in ordered[start : start + SCORES_PER_RECORD]:
                fractions = listened[track_id]
                batch.items.append(
                    track_scored_to_proto(
                        scores.scored(scores.index[track_id]),
                        provenance(track_id),
                        sum(fractions) / len(fractions),
                    )
                )
            chunks.append(batch.SerializeToString())
        return PassResult(
            chunks,
            model_ratings(scores, provenance),
            report,
            time.perf_counter() - started,
        )


class InlineScorer:
    """The pass in the calling thread (tests, the embedded one-process stack)."""

    def __init__(self, spam: SpamFilter, confidence: ConfidenceWeight) -> None:
        self._mirror = ScoreMirror(spam, confidence)
        self.needs_reset = True

    def start(self) -> None:
        pass

    def run(self, ops: Sequence[Op], changed: set[str]) -> PassResult:
        self._mirror.apply(ops)
        self.needs_reset = False
        return self._mirror.score(changed)

    def close(self) -> None:
        pass


@dataclasses.dataclass(frozen=True)
class _Failure:
    text: str


def _child_main(
    conn: Connection, spam: SpamFilter, confidence: ConfidenceWeight, nice: int
) -> None:
    """The child's loop: apply, score, reply; exit when the parent closes the pipe or dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which closes us
    if nice:
        os.nice(nice)
    mirror = ScoreMirror(spam, confidence)
    conn.send("ready")  # imports done: from here the parent times the passes alone
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        if request is None:
            return
        ops, changed = request
        try:
            mirror.apply(ops)
            reply: PassResult | _Failure = mirror.score(changed)
        except Exception:  # reported to the parent, which restarts us from a snapshot
            reply = _Failure(traceback.format_exc())
        try:
            conn.send(reply)
        except OSError:
            return  # the parent is gone (killed mid-pass)
        if isinstance(reply, _Failure):
            return


class ProcessScorer:
    """The pass in a child process (spawned, not forked: the parent runs Kafka and gRPC threads,
    which a fork would copy mid-state). Started on the first pass and again after a failure;
    ``needs_reset`` tells the caller to send the whole ledger first."""

    def __init__(
        self,
        spam: SpamFilter,
        confidence: ConfidenceWeight,
        *,
        niceness: int = 5,
        timeout_s: float = 120.0,
    ) -> None:
        self._spam = spam
        self._confidence = confidence
        self._niceness = niceness
        self._timeout_s = timeout_s
        self._context = multiprocessing.get_context("spawn")
        self._process: Any = None
        self._conn: Connection | None = None
        self.restarts = 0

    @property
    def needs_reset(self) -> bool:
        return self._conn is None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self) -> None:
        """Spawn the child unless one runs: at service start-up, and after a failure."""
        if self._conn is not None:
            return
        parent, child = self._context.Pipe()
        process = self._context.Process(
            target=_child_main,
            args=(child, self._spam, self._confidence, self._niceness),
            name="feedback-scorer",
            daemon=True,  # never outlives the service
        )
        process.start()
        child.close()
        self._process, self._conn = process, parent
        ready = self._exchange(
            _NO_REQUEST,
            _START_TIMEOUT_S,
            late=f"the scorer process did not start in {_START_TIMEOUT_S:g} s",
            dead="the scorer process died while starting",
        )
        if ready != "ready":
            self._discard()
            raise ScorerError(f"the scorer process said {ready!r} instead of 'ready'")
        _log.info("scorer process started", extra={"pid": process.pid})

    def run(self, ops: Sequence[Op], changed: set[str]) -> PassResult:
        self.start()
        reply = self._exchange(
            (list(ops), changed),
            self._timeout_s,
            late=f"the scoring pass took longer than {self._timeout_s:g} s",
            dead="the scorer process died",
        )
        if isinstance(reply, _Failure):
            self._discard()
            raise ScorerError(f"the scoring pass raised:\n{reply.text}")
        return reply

    def _exchange(self, request: Any, timeout_s: float, *, late: str, dead: str) -> Any:
        """Send ``request`` (unless ``_NO_REQUEST``) and return the child's reply; a child that
        does not answer within ``timeout_s`` or whose pipe breaks is discarded (ScorerError)."""
        conn = self._conn
        assert conn is not None
        try:
            if request is not _NO_REQUEST:
                conn.send(request)
            if not conn.poll(timeout_s):
                raise ScorerError(late)
            return conn.recv()
        except (EOFError, OSError) as exc:
            self._discard()
            raise ScorerError(f"{dead} ({exc!r})") from None
        except ScorerError:
            self._discard()
            raise

    def _discard(self) -> None:
        """Stop the current child (it is dead, hung or failed); the next pass starts another."""
        if self._conn is not None:
            self._conn.close()
        if self._process is not None:
            self._process.kill()
            self._process.join(5.0)
            self.restarts += 1
            metrics.SCORER_RESTARTS.inc()
        self._process, self._conn = None, None

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.send(None)
            self._conn.close()
        if self._process is not None:
            self._process.join(5.0)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(5.0)
        self._process, self._conn = None, None
