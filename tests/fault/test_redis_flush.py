"""Redis loses its data (FLUSHDB of the stack's database) while 2,000 ratings stream through the
gateway into the feedback service (separate processes on real Kafka, MinIO and Redis): both
services notice the missing rebuild marker and replay their Kafka topics into Redis
(riffloop.runtime.rebuild), and the ratings go on. Then redis-server is killed -9 and restarted
from its append-only file: its new run_id makes both services rebuild again (a crash may have
cost the last second of writes). Last, the feedback service is killed -9 and restarted, so its
ledger comes from the rebuilt Redis alone.

The aggregates are checked against an offline recount of feedback.received.v1 (read whole,
nothing deduplicated): every accepted rating is in the rebuilt ledger's Redis rows and in the
restarted ledger, once — 0 lost, 0 counted twice.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest
import redis

from riffloop.client import GatewayClient, Rating
from riffloop.core import (
    ConflictError,
    KafkaEventBus,
    NotFoundError,
    RateLimitedError,
    RedisKeyValueStore,
    RiffloopError,
    S3ObjectStore,
    Settings,
    TransientError,
    decode_envelope,
    new_envelope,
)
from riffloop.runtime import FEEDBACK_REBUILT_MARKER, TokenSigner
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

USERS = 20
TRACKS_PER_USER = 100  # 2,000 ratings, one per track (its owner's)
BATCH = 10  # SubmitFeedback items per call
UNARY_SHARE = 0.3  # of each listener's ratings sent one Rate call each
WORKERS = 4
PACE_S = 0.03  # between one worker's calls: the stream lasts long enough to be cut
FLUSH_AT = 0.4  # Redis is emptied once this share of the ratings was accepted
RETRIED = 100  # accepted ratings a client sends again right after the flush
MARKERS = ("gw:rebuilt", FEEDBACK_REBUILT_MARKER)


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    accepted: set[str] = field(default_factory=set)
    already: set[str] = field(default_factory=set)  # ALREADY_EXISTS on a retry
    not_found: int = 0  # answers "no such track" (the gateway's records were gone)
    unavailable: int = 0
    errors: list[str] = field(default_factory=list)


def _publish_tracks(settings: Settings, tracks: dict[str, str], ref: common_pb2.ObjectRef) -> None:
    bus = KafkaEventBus.from_settings(settings)

    def publish(track_id: str) -> None:
        ready = track_ready(track_id, tracks[track_id], ref)
        bus.publish("tracks.ready.v1", track_id, new_envelope("generator", ready))

    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(publish, sorted(tracks)))
    finally:
        bus.close()


def _send(client: GatewayClient, unit: Unit, tally: Tally) -> list[str]:
    """One call; returns the tracks to send again."""
    kind, tracks = unit
    try:
        if kind == "rate":
            client.rate(tracks[0], stars(tracks[0]))
            outcomes: list[tuple[str, RiffloopError | None]] = [(tracks[0], None)]
        else:
            _, answers = client.submit_feedback([Rating(t, stars(t)) for t in tracks])
            outcomes = [(a.track_id, a.error) for a in answers]
    except (TransientError, RateLimitedError) as error:
        with tally.lock:
            tally.unavailable += 1
        time.sleep(error.retry_after_s or 0.5)
        return tracks
    except NotFoundError:  # the gateway has not read (or has lost and not yet rebuilt) it
        with tally.lock:
            tally.not_found += 1
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
                tally.not_found += 1
                again.append(track_id)
            else:
                tally.errors.append(f"{track_id}: {problem.reason}")
    if again:
        time.sleep(0.2)
    return again


def _worker(
    clients: dict[str, GatewayClient], units: dict[str, list[Unit]], tally: Tally
) -> Callable[[list[str]], None]:
    def work(users: list[str]) -> None:
        try:
            queues = {u: list(units[u]) for u in users}
            while any(queues.values()):
                for user in users:
                    if queues[user]:
                        kind, tracks = queues[user].pop(0)
                        left = _send(clients[user], (kind, tracks), tally)
                        if left:
                            queues[user].append((kind, left))
                        time.sleep(PACE_S)
        except Exception as error:
            with tally.lock:
                tally.errors.append(repr(error))

    return work


def _send_again(
    clients: dict[str, GatewayClient], tracks: dict[str, str], retried: list[str]
) -> Counter[str]:
    """Rate each of ``retried`` (accepted before) once more with the same stars, retrying while
    the gateway has no record of it; the outcomes by kind."""
    outcomes: Counter[str] = Counter()
    for track_id in retried:
        for _ in range(300):
            try:
                clients[tracks[track_id]].rate(track_id, stars(track_id))
                outcomes["accepted again"] += 1
            except ConflictError:
                outcomes["already rated"] += 1
            except (NotFoundError, TransientError, RateLimitedError):
                time.sleep(0.1)
                continue
            break
        else:
            outcomes["unanswered"] += 1
    return outcomes


def _recount(settings: Settings) -> Counter[tuple[str, str]]:
    """Every rating item on feedback.received.v1, first record to last: (track, listener) →
    copies, nothing deduplicated."""
    bus = KafkaEventBus.from_settings(settings)
    copies: Counter[tuple[str, str]] = Counter()
    try:
        for message in bus.replay("feedback.received.v1"):
            envelope = decode_envelope(message.value, message.topic)
            if envelope.WhichOneof("payload") == "feedback_batch":
                items = list(envelope.feedback_batch.items)
            else:
                items = [envelope.feedback_received]
            for item in items:
                if item.WhichOneof("feedback") == "rating":
                    copies[(item.track_id, item.user_id)] += 1
    finally:
        bus.close()
    return copies


def _redis_rows(kv: RedisKeyValueStore, tracks: dict[str, str]) -> dict[tuple[str, str], int]:
    """The feedback ledger's rows in Redis (``fb:ratings:<track>``: rater → rating)."""
    import json

    rows: dict[tuple[str, str], int] = {}
    for track_id in tracks:
        for rater, raw in kv.hgetall(f"fb:ratings:{track_id}").items():
            rows[(track_id, rater)] = int(json.loads(raw)["stars"])
    return rows


def _ledger_total(client: GatewayClient) -> int:
    for model in client.list_models():
        if model.version == VERSION:
            return int(model.rating_count + model.baseline_rating_count)
    return 0


def _wait(check: Callable[[], bool], timeout_s: float, poll_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
    return True


def _rebuilt_under(kv: RedisKeyValueStore, instance: str) -> bool:
    """Both services' markers say a completed rebuild under the Redis process ``instance``."""
    import json

    raws = [kv.get(m) for m in MARKERS]
    return all(
        raw not in (None, "rebuilding") and json.loads(raw).get("instance") == instance
        for raw in raws
    )


def test_redis_flushed_during_2000_ratings_is_rebuilt_from_kafka_losing_none(
    service_stack, local_infra
) -> None:
    began = time.monotonic()
    stack = service_stack(("feedback", "gateway"))
    settings = Settings.from_env(stack.infra_env)
    run = uuid.uuid4().hex[:8]
    users = [f"listener-{run}-{u}" for u in range(USERS)]
    tracks: dict[str, str] = {}
    units: dict[str, list[Unit]] = {}
    for u, user in enumerate(users):
        mine = [f"trk-{run}-{u}-{t}" for t in range(TRACKS_PER_USER)]
        tracks.update(dict.fromkeys(mine, user))
        units[user] = rating_calls(mine, seed=u, unary_share=UNARY_SHARE, batch=BATCH)
    objects = S3ObjectStore.from_settings(settings)
    wav = objects.put("tracks", f"fault-{run}.wav", silent_wav(), content_type="audio/wav")
    _publish_tracks(settings, tracks, wav.to_proto())
    kv = RedisKeyValueStore.from_settings(settings)
    store = redis.Redis.from_url(settings.redis_url)  # the stack's own database
    assert _wait(lambda: all(kv.get(m) for m in MARKERS), 60), "the services never marked"
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
    assert _wait(lambda: len(tally.accepted) >= FLUSH_AT * len(tracks), 120, poll_s=0.02)
    pipe = store.pipeline(transaction=False)  # the ledger's rows now, in one round trip
    for track_id in tracks:
        pipe.hlen(f"fb:ratings:{track_id}")
    rows_before = sum(pipe.execute())
    store.flushdb()  # Redis lost everything: ledger rows, track records, once-keys, markers
    flushed_at = time.monotonic()
    at_flush = len(tally.accepted)
    # clients retry ratings they already sent (a lost answer, say) while the once-keys are gone
    with tally.lock:
        retried = sorted(tally.accepted)[:RETRIED]
    again = _send_again(clients, tracks, retried)
    rebuilt = _wait(
        lambda: all(kv.get(m) not in (None, "rebuilding") for m in MARKERS), 60, poll_s=0.05
    )
    rebuild_s = time.monotonic() - flushed_at
    assert rebuilt, "the services did not rebuild within 60 s"
    for worker in workers:
        worker.join(timeout=180)
    stream_s = time.monotonic() - stream_began
    assert not any(w.is_alive() for w in workers), "clients still sending after 180 s"

    # redis-server dies and comes back from its append-only file under a new run_id
    store.close()
    killed = False
    try:
        local_infra.kill("redis")
        killed = True
        local_infra.restart("redis")
        killed = False
    finally:
        if killed:  # the session's Redis outlives this test, whatever happened here
            local_infra.restart("redis")
    restarted_at = time.monotonic()
    survived = len(_redis_rows(kv, tracks))
    instance = kv.instance_id()
    assert _wait(lambda: _rebuilt_under(kv, instance), 60), "no rebuild after the restart"
    rebuild_after_restart_s = time.monotonic() - restarted_at

    copies = _recount(settings)
    doubled = {pair for pair, n in copies.items() if n > 1}
    # the ledger's rows in the rebuilt Redis, once the live consumer has caught up
    _wait(lambda: len(_redis_rows(kv, tracks)) >= len(copies), 60)
    rows = _redis_rows(kv, tracks)
    # a restarted feedback service holds only what the rebuilt Redis gives it
    stack.kill("feedback")
    stack.start("feedback")
    stack.wait_serving(("feedback",), 120)
    any_client = clients[users[0]]
    _wait(lambda: _ledger_total(any_client) >= len(tracks), 120, poll_s=0.5)
    time.sleep(2.0)  # another scoring pass: a double count would show by now
    ledger = _ledger_total(any_client)
    for client in clients.values():
        client.close()
    kv.close()
    answered = tally.accepted | tally.already
    print(
        f"\nRedis FLUSHDB during {len(tracks)} ratings from {USERS} listeners "
        f"({int(UNARY_SHARE * 100)} % by Rate, the rest in SubmitFeedback batches of {BATCH}): "
        f"set-up {setup_s:.0f} s, stream {stream_s:.0f} s\n"
        f"  accepted {len(tally.accepted)} ({at_flush} before the flush, {rows_before} ledger "
        f"rows in Redis then) + {len(tally.already)} found already rated on a retry; "
        f"{tally.not_found} answers 'no such track' while the gateway's records were gone\n"
        f"  {RETRIED} accepted ratings sent again after the flush: {again['accepted again']} "
        f"accepted again (their once-keys were gone), {again['already rated']} already rated\n"
        f"  both services rebuilt from Kafka {rebuild_s:.1f} s after the flush\n"
        f"  redis-server kill -9 + restart (AOF): {survived} ledger rows came back from the "
        f"file; rebuilt under the new run_id {rebuild_after_restart_s:.1f} s after the restart\n"
        f"  offline recount: {sum(copies.values())} rating items on the topic, {len(copies)} "
        f"distinct (track, listener), {len(doubled)} written twice\n"
        f"  after the rebuild: {len(rows)} ledger rows in Redis, {ledger} ratings in the "
        f"restarted ledger (ListModels); lost {len(set(copies) - set(rows))}, counted twice "
        f"{max(0, ledger - len(copies))}"
    )
    assert not tally.errors, tally.errors[:5]
    assert 0 < at_flush < len(tracks), "the flush must land while ratings stream"
    assert answered == set(tracks) and not tally.accepted & tally.already
    assert set(copies) == set(tracks.items())  # every accepted rating is on the topic
    assert again["unanswered"] == 0
    assert len(doubled) == again["accepted again"]  # each resend accepted: a second copy
    assert rows == {(t, u): stars(t) for t, u in tracks.items()}  # 0 lost, none altered
    assert ledger == len(copies) == len(tracks)  # 0 counted twice
