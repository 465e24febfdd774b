"""kill -9 the Kafka broker while 10,000 ratings stream through the gateway, then restart it:
every accepted rating is counted exactly once (real Kafka, MinIO and Redis; gateway and feedback
as separate processes).

Forty listeners rate their own tracks (made ready by publishing TrackReady, as the generator
does): one rating in twenty by a Rate call, the rest in SubmitFeedback batches of 50.
During the outage the gateway answers UNAVAILABLE with the ``retry-after-ms`` trailer; a client
waits that long and sends the same ratings again (a rating's idempotency key is its track and
listener). A publish that timed out in flight may still have been written, so a retry can put a
second copy of a rating on the topic; the feedback ledger counts a (track, listener) once. The
figures are checked against an offline recount of the feedback topic: a fresh consumer reads all
of it, dedupes nothing and counts the rating items.
"""

from __future__ import annotations

import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from riffloop.client import GatewayClient, Rating
from riffloop.core import (
    ConflictError,
    KafkaEventBus,
    NotFoundError,
    RateLimitedError,
    RiffloopError,
    S3ObjectStore,
    Settings,
    TransientError,
    decode_envelope,
    new_envelope,
)
from riffloop.runtime import TokenSigner
from riffloop.v1 import common_pb2
from tests.fault.ratings_support import (
    VERSION,
    Unit,
    rating_calls,
    silent_wav,
    stars,
    track_ready,
)

pytestmark = [pytest.mark.fault, pytest.mark.e2e, pytest.mark.slow]

USERS = 40
TRACKS_PER_USER = 250  # 10,000 ratings, one per track (its owner's)
BATCH = 50  # SubmitFeedback items per call
UNARY_SHARE = 0.05  # of each listener's ratings sent one Rate call each
WORKERS = 8  # client threads, each serving its listeners in turn
PACE_S = 0.02  # between one worker's calls: the stream lasts long enough to be cut
KILL_AT = 0.25  # the broker dies once this share of the ratings was accepted
DOWN_S = 8.0  # more than one publish timeout (5 s) passes with the broker dead


@dataclass
class Tally:
    """What the clients saw, by track."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    accepted: set[str] = field(default_factory=set)  # answered OK
    already: set[str] = field(default_factory=set)  # ALREADY_EXISTS: an earlier try was taken
    unsure: set[str] = field(default_factory=set)  # sent in a call refused UNAVAILABLE
    refused_calls: int = 0  # calls answered UNAVAILABLE (DEADLINE_EXCEEDED counts too)
    resent: int = 0  # ratings sent again after such a refusal
    hints: list[float | None] = field(default_factory=list)  # each UNAVAILABLE's retry hint
    deadline_exceeded: int = 0  # refusals by the client's own deadline (no hint to carry)
    rate_limited: int = 0
    first_refusal: float = 0.0
    last_refusal: float = 0.0
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)  # the test gave up

    def refused(self, tracks: list[str], error: TransientError) -> None:
        with self.lock:
            now = time.monotonic()
            self.first_refusal = self.first_refusal or now
            self.last_refusal = now
            self.refused_calls += 1
            self.resent += len(tracks)
            if error.reason.startswith("DEADLINE_EXCEEDED"):
                self.deadline_exceeded += 1
            else:
                self.hints.append(error.retry_after_s)
            self.unsure.update(tracks)


def _publish_tracks(settings: Settings, tracks: dict[str, str], ref: common_pb2.ObjectRef) -> None:
    """One TrackReady per track (the generator's event). Sent without waiting for each ack
    (the port's publish waits for every one): 10,000 acknowledged one by one took a minute on
    a busy two-core machine."""
    from kafka import KafkaProducer

    producer = KafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=20, client_id="fault"
    )
    try:
        for track_id, user in tracks.items():
            ready = track_ready(track_id, user, ref)
            envelope = new_envelope("generator", ready)
            producer.send(
                settings.kafka_topic_prefix + "tracks.ready.v1",
                key=track_id.encode(),
                value=envelope.SerializeToString(),
            )
        producer.flush(timeout=60)
    finally:
        producer.close(timeout=10)


def _send(client: GatewayClient, unit: Unit, tally: Tally) -> list[str]:
    """One call for ``unit``; returns its tracks to send again (empty when all were answered)."""
    kind, tracks = unit
    try:
        if kind == "rate":
            client.rate(tracks[0], stars(tracks[0]))
            outcomes: list[tuple[str, RiffloopError | None]] = [(tracks[0], None)]
        else:
            _, answers = client.submit_feedback([Rating(t, stars(t)) for t in tracks])
            outcomes = [(a.track_id, a.error) for a in answers]
    except TransientError as error:  # the broker is away: wait as told, then the same again
        tally.refused(tracks, error)
        time.sleep(error.retry_after_s or 1.0)
        return tracks
    except RateLimitedError as error:
        with tally.lock:
            tally.rate_limited += 1
        time.sleep(error.retry_after_s or 0.5)
        return tracks
    except NotFoundError:  # the gateway has not read this track's TrackReady yet
        time.sleep(0.2)
        return tracks
    except ConflictError as error:
        outcomes = [(tracks[0], error)]
    again = []
    with tally.lock:
        for track_id, problem in outcomes:
            if problem is None:
                tally.accepted.add(track_id)
            elif isinstance(problem, ConflictError):
                tally.already.add(track_id)
            elif isinstance(problem, NotFoundError):
                again.append(track_id)
            else:
                tally.errors.append(f"{track_id}: {problem.reason}")
    if again:
        time.sleep(0.2)
    return again


def _worker(
    clients: dict[str, GatewayClient], units: dict[str, list[Unit]], tally: Tally
) -> Callable[[list[str]], None]:
    """A client thread: its listeners' calls in turn, each unit until all its tracks are
    answered."""

    def work(users: list[str]) -> None:
        try:
            queues = {u: list(units[u]) for u in users}
            while any(queues.values()) and not tally.stop.is_set():
                for user in users:
                    if queues[user]:
                        kind, tracks = queues[user].pop(0)
                        left = _send(clients[user], (kind, tracks), tally)
                        if left:
                            queues[user].append((kind, left))
                        time.sleep(PACE_S)
        except Exception as error:  # reported by the test, not lost with the thread
            with tally.lock:
                tally.errors.append(repr(error))

    return work


def _ledger_total(client: GatewayClient) -> int:
    """Ratings the feedback ledger holds for this test's model version, as ListModels serves
    them (the scoring pass's per-version read model: every accepted rating, trusted or not)."""
    for model in client.list_models():
        if model.version == VERSION:
            return int(model.rating_count + model.baseline_rating_count)
    return 0


def _counter(metrics_port: int, name: str, **labels: str) -> int:
    """A counter of a service's /metrics, summed over the series carrying ``labels``."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    wanted = [f'{key}="{value}"' for key, value in labels.items()]
    total = 0.0
    with urllib.request.urlopen(url, timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + "{") and all(label in line for label in wanted):
                total += float(line.rsplit(" ", 1)[1])
    return int(total)


def _tracks_read(metrics_port: int) -> int:
    """tracks.ready.v1 records a service has handled."""
    return _counter(
        metrics_port, "riffloop_kafka_messages_total", topic="tracks.ready.v1", outcome="handled"
    )


def _recount(settings: Settings) -> Counter[tuple[str, str]]:
    """Every rating item on feedback.received.v1, read by a fresh consumer group from the
    first record to the end: (track, listener) → copies, nothing deduplicated."""
    bus = KafkaEventBus.from_settings(settings)
    subscription = bus.subscribe(f"recount-{uuid.uuid4().hex[:8]}", ["feedback.received.v1"])
    copies: Counter[tuple[str, str]] = Counter()
    read = 0
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            for message in subscription.poll(1.0, max_records=500):
                read += 1
                envelope = decode_envelope(message.value, message.topic)
                if envelope.WhichOneof("payload") == "feedback_batch":
                    items = list(envelope.feedback_batch.items)
                else:
                    items = [envelope.feedback_received]
                for item in items:
                    if item.WhichOneof("feedback") == "rating":
                        copies[(item.track_id, item.user_id)] += 1
            # nothing is committed, so a partition's lag is its end offset
            assigned = len(subscription.assignment()) == settings.kafka_partitions
            if assigned and read >= sum(subscription.lag().values()):
                return copies
    finally:
        subscription.close()
        bus.close()
    raise AssertionError(f"the recount read {read} records in 60 s without reaching the end")


def _wait(check: Callable[[], bool], timeout_s: float, poll_s: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
    return True


def test_broker_kill_9_during_10000_ratings_counts_each_accepted_rating_once(
    service_stack, local_infra
) -> None:
    began = time.monotonic()
    stack = service_stack(("feedback", "gateway"))
    stack_s = time.monotonic() - began
    settings = Settings.from_env({**stack.infra_env, "RIFFLOOP_KAFKA_LINGER_MS": "5"})
    run = uuid.uuid4().hex[:8]
    users = [f"listener-{run}-{u}" for u in range(USERS)]
    tracks: dict[str, str] = {}  # track → its owner, the one listener who rates it
    units: dict[str, list[Unit]] = {}
    for u, user in enumerate(users):
        mine = [f"trk-{run}-{u}-{t}" for t in range(TRACKS_PER_USER)]
        tracks.update(dict.fromkeys(mine, user))
        units[user] = rating_calls(mine, seed=u, unary_share=UNARY_SHARE, batch=BATCH)
    objects = S3ObjectStore.from_settings(settings)
    wav = objects.put("tracks", f"fault-{run}.wav", silent_wav(), content_type="audio/wav")
    _publish_tracks(settings, tracks, wav.to_proto())
    # both services know every track before the ratings start: the outage then meets ratings,
    # not listeners waiting for their tracks
    ports = [stack.state.processes[name].metrics_port for name in ("gateway", "feedback")]
    known = _wait(lambda: all(_tracks_read(port) >= len(tracks) for port in ports), 240)
    assert known, f"tracks read: {[_tracks_read(port) for port in ports]} of {len(tracks)}"
    setup_s = time.monotonic() - began

    signer = TokenSigner(stack.state.auth_secret)
    target = stack.state.processes["gateway"].target
    clients = {user: GatewayClient(target, signer.issue(user)) for user in users}
    tally = Tally()
    work = _worker(clients, units, tally)
    workers = [threading.Thread(target=work, args=(users[i::WORKERS],)) for i in range(WORKERS)]
    stream_began = time.monotonic()
    for worker in workers:
        worker.start()
    dead = False
    try:
        started = _wait(lambda: len(tally.accepted) >= KILL_AT * len(tracks), 120, poll_s=0.02)
        assert started, f"only {len(tally.accepted)} ratings accepted in 120 s"
        local_infra.kill("kafka")
        dead = True
        at_kill = len(tally.accepted)
        time.sleep(DOWN_S)
        while_down = len(tally.accepted) - at_kill
        restart_began = time.monotonic()
        local_infra.restart("kafka")
        dead = False
        restart_s = time.monotonic() - restart_began
    except BaseException:
        tally.stop.set()  # the clients stop too
        raise
    finally:
        if dead:  # the session's broker outlives this test, whatever happened here
            local_infra.restart("kafka")
        finished = _wait(lambda: not any(w.is_alive() for w in workers), 180)
        tally.stop.set()
        for worker in workers:
            worker.join(timeout=30)
    stream_s = time.monotonic() - stream_began
    assert finished, f"clients still sending after 180 s: {len(tally.accepted)} accepted"

    copies = _recount(settings)  # the topic, read back whole
    doubled = {track for (track, _), n in copies.items() if n > 1}
    any_client = clients[users[0]]
    feedback_metrics = ports[1]
    _wait(lambda: _ledger_total(any_client) >= len(tracks), 120)
    time.sleep(2.0)  # another scoring pass: a double count would show by now
    ledger = _ledger_total(any_client)
    # each rating the ledger recorded as new (a duplicate is not)
    recorded = _counter(
        feedback_metrics, "riffloop_feedback_recorded_total", kind="rating", outcome="recorded"
    )
    for client in clients.values():
        client.close()
    hints = [h for h in tally.hints if h is not None]
    print(
        f"\nbroker kill -9 during {len(tracks)} ratings from {USERS} listeners "
        f"({int(UNARY_SHARE * 100)} % by Rate, the rest in SubmitFeedback batches of {BATCH}): "
        f"stack up {stack_s:.0f} s, tracks ready {setup_s - stack_s:.0f} s, stream "
        f"{stream_s:.0f} s, broker down {DOWN_S:.0f} s + restart {restart_s:.0f} s\n"
        f"  accepted {len(tally.accepted)} + {len(tally.already)} found already rated on a "
        f"retry ({at_kill} before the kill, {while_down} while the broker was down)\n"
        f"  refused during the outage: {tally.refused_calls} calls, UNAVAILABLE for "
        f"{tally.last_refusal - tally.first_refusal:.0f} s, retry hint "
        f"{min(hints, default=0):.1f}–{max(hints, default=0):.1f} s, "
        f"{len(tally.hints) - len(hints)} without one; {tally.deadline_exceeded} calls past the "
        f"client's deadline\n"
        f"  retried: {tally.resent} ratings sent again ({len(tally.unsure)} distinct); "
        f"rate-limited calls {tally.rate_limited}\n"
        f"  offline recount: {sum(copies.values())} rating items on the topic, "
        f"{len(copies)} distinct (track, listener), {len(doubled)} written twice\n"
        f"  ledger: {ledger} ratings (ListModels), {recorded} recorded (feedback counter)"
    )
    assert not tally.errors, tally.errors[:5]
    assert 0 < at_kill < len(tracks), "the kill must land while ratings stream"
    assert tally.refused_calls > 0, "no client saw the outage"
    assert len(hints) == len(tally.hints) > 0, "an UNAVAILABLE without a retry hint"
    # every rating answered once: accepted, or taken by an earlier try whose answer was lost
    assert tally.accepted | tally.already == set(tracks)
    assert not tally.accepted & tally.already
    assert tally.already <= tally.unsure, "ALREADY_EXISTS for a rating never sent before"
    # every accepted rating is on the topic; a second copy only of one sent again
    assert set(copies) == set(tracks.items())
    assert doubled <= tally.unsure
    # and the ledger counts each once
    assert ledger == len(tracks)
    assert recorded == len(tracks)
