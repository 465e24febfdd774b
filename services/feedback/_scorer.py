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

    parent → child   (ops, changed)   ops: riffloop.loop.ReplicaOp, applied by ``replay_ops``
                                            ("reset", ledger snapshot) | ("track", TrackRecord)
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
import logging
import multiprocessing
import os
import signal
import time
import traceback
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

from riffloop.loop import (
    ConfidenceWeight,
    FeedbackLedger,
    ModelRatings,
    ReplicaOp,
    SpamFilter,
    SpamReport,
    model_ratings,
    replay_ops,
)
from riffloop.runtime import metrics, track_scored_to_proto
from riffloop.v1 import events_pb2

_log = logging.getLogger("riffloop.feedback")

# Scores per TrackScoredBatch record: ≈ 150 bytes each, so a record stays near 75 kB, far under
# Kafka's 1 MB default message limit, and a consumer's retry of one record redoes little.
SCORES_PER_RECORD = 500

# A spawned child imports numpy, scipy and the loop package before it can score (≈ 2 s idle).
_START_TIMEOUT_S = 120.0
_NO_REQUEST = object()  # ProcessScorer._exchange: only wait for the child's message


class ScorerError(RuntimeError):
    """The scoring pass failed (the child died, hung, or raised); the next pass starts over."""


@dataclasses.dataclass(frozen=True)
class PassResult:
    """One pass's output: the changed tracks' scores as serialized TrackScoredBatch chunks of
    at most ``SCORES_PER_RECORD`` (in track order), every version's :class:`ModelRatings`, the
    spam report, and the seconds the pass computed."""

    chunks: list[bytes]
    model_ratings: dict[str, ModelRatings]
    report: SpamReport | None
    seconds: float


class ScoreMirror:
    """A ledger fed the consumer's accepted inputs, and the O(N) pass over it."""

    def __init__(self, spam: SpamFilter, confidence: ConfidenceWeight) -> None:
        self.spam = spam
        self.confidence = confidence
        self.ledger = FeedbackLedger()

    def apply(self, ops: Sequence[ReplicaOp]) -> None:
        self.ledger = replay_ops(self.ledger, ops)

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

    def run(self, ops: Sequence[ReplicaOp], changed: set[str]) -> PassResult:
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

    def run(self, ops: Sequence[ReplicaOp], changed: set[str]) -> PassResult:
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
