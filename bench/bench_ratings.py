"""Ratings throughput: client → gateway → Kafka → feedback aggregate, on real local servers.

    nice .venv/bin/python -m bench.bench_ratings [--ratings 4000] [--concurrency 64]
        [--users 200] [--batch 1] [--rate R] [--infra-env .riffloop/infra/infra.env]
        [--trace calls.csv]

Starts Kafka, MinIO and Redis (``riffloop.infra``; or uses a running stack's ``infra.env``) and
the gateway and feedback services as separate processes (``riffloop.stack``), makes ``--ratings``
tracks ready (TrackReady events, as the generator publishes them; one track per rating, each
served to the user who rates it), then sends every rating through the gateway with
``--concurrency`` calls in flight (grpc.aio, closed loop) — one ``Rate`` call per rating, or with
``--batch N`` one ``SubmitFeedback`` call per N ratings of one user — and reports:

- gateway: accepted ratings/s while sending, call latency p50 / p99 / max at that rate;
- end to end: ratings/s until the feedback service has recorded every accepted rating
  (``riffloop_feedback_recorded_total{kind="rating", outcome="recorded"}``);
- the target it is judged against (design: ≥ 5,000 ratings/s, p99 < 50 ms).

The load generator shares the machine's cores with the servers, so the figures are a floor.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import redis
import soundfile
from prometheus_client.parser import text_string_to_metric_families

from riffloop.core import KafkaEventBus, S3ObjectStore, Settings, new_envelope
from riffloop.infra import InfraAddresses, LocalInfra, drop_topics
from riffloop.runtime import TokenSigner
from riffloop.stack import ServiceProcesses
from riffloop.v1 import gateway_service_pb2 as pb
from riffloop.v1 import gateway_service_pb2_grpc as pb_grpc
from tests.services.conftest import generated_track_ready

TARGET_RATE = 5000.0
TARGET_P99_MS = 50.0


async def _send(
    target: str,
    calls: list[tuple[str, list[tuple[str, int]]]],
    concurrency: int,
    signer: TokenSigner,
    batched: bool,
    rate: float | None = None,
    trace: list[tuple[float, float]] | None = None,
) -> tuple[list[float], float, int, int]:
    """Send ``calls`` — (user, [(track, stars), …]) — with ``concurrency`` in flight; returns
    (per-call latencies of successful calls, elapsed s, failed calls, accepted ratings).

    Closed loop by default (each worker sends its next call when the last one returns). With
    ``rate`` (ratings/s) it is open loop: call i is due at the moment its first rating's share
    of the schedule comes up, and its latency counts from that due time, not from when a worker
    got round to it — so a stalled server shows up as latency instead of quietly slowing the
    load down (no coordinated omission). ``concurrency`` then only caps the calls in flight."""
    channel = grpc.aio.insecure_channel(target)
    stub = pb_grpc.GatewayServiceStub(channel)
    tokens: dict[str, str] = {}
    latencies: list[float] = []
    failures = 0
    accepted = 0
    queue: asyncio.Queue[tuple[float | None, str, list[tuple[str, int]]]] = asyncio.Queue()
    # Connection set-up and token signing are not the gateway's latency at a rate: do both
    # before the clock starts (the first calls otherwise measured the TCP + HTTP/2 handshake).
    await channel.channel_ready()
    for user, _ in calls:
        tokens.setdefault(user, signer.issue(user))
    started = time.perf_counter()
    sent = 0
    for user, ratings in calls:
        due = started + 0.05 + sent / rate if rate else None
        queue.put_nowait((due, user, ratings))
        sent += len(ratings)

    async def worker() -> None:
        nonlocal failures, accepted
        while not queue.empty():
            due, user, ratings = queue.get_nowait()
            token = tokens.setdefault(user, signer.issue(user))
            metadata = (("authorization", f"Bearer {token}"),)
            if due is not None:
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
            call_started = due if due is not None else time.perf_counter()
            try:
                if batched:
                    items = [
                        pb.FeedbackItem(rating=pb.RateRequest(track_id=t, stars=s))
                        for t, s in ratings
                    ]
                    response = await stub.SubmitFeedback(
                        pb.SubmitFeedbackRequest(items=items), metadata=metadata, timeout=10
                    )
                    accepted += response.accepted
                else:
                    (track_id, stars) = ratings[0]
                    await stub.Rate(
                        pb.RateRequest(track_id=track_id, stars=stars),
                        metadata=metadata,
                        timeout=10,
                    )
                    accepted += 1
                latencies.append(time.perf_counter() - call_started)
                if trace is not None:  # (due time since the start, latency) per call
                    trace.append((call_started - started, latencies[-1]))
            except grpc.aio.AioRpcError:
                failures += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    await channel.close()
    return latencies, elapsed, failures, accepted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratings", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument(
        "--batch", type=int, default=1, help="ratings per call: 1 = Rate, N > 1 = SubmitFeedback"
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=None,
        help="offered ratings/s (open loop, latency from each call's due time); default: "
        "closed loop, as fast as --concurrency allows",
    )
    parser.add_argument("--infra-env", type=Path, default=None)
    parser.add_argument(
        "--trace",
        type=Path,
        default=None,
        help="write each timed call's due time and latency to this CSV (find stalls in time)",
    )
    parser.add_argument(
        "--warmup", type=int, default=10, help="untimed calls sent first (default 10)"
    )
    parser.add_argument(
        "--score-interval",
        type=float,
        default=5.0,
        help="the feedback service's RIFFLOOP_SCORE_INTERVAL_S (its re-scoring pass)",
    )
    options = parser.parse_args(argv)

    infra: LocalInfra | None = None
    tmp = Path(tempfile.mkdtemp(prefix="riffloop-bench-"))
    if options.infra_env:
        addresses = InfraAddresses.from_env_file(options.infra_env)
    else:
        infra = LocalInfra(tmp / "infra")
        addresses = infra.start()
    env = addresses.env()
    # Redis database 9 belongs to this benchmark and starts empty: the feedback service restores
    # its ledger from Redis at start-up, so an earlier run's ratings would be re-scored too.
    env["RIFFLOOP_REDIS_URL"] = (
        urllib.parse.urlsplit(env["RIFFLOOP_REDIS_URL"])._replace(path="/9").geturl()
    )
    redis.Redis.from_url(env["RIFFLOOP_REDIS_URL"]).flushdb()
    run = uuid.uuid4().hex[:8]
    # Fresh topics per run: a new consumer group starts at the earliest offset, and on shared
    # topics the feedback service would first re-read every earlier run's ratings.
    env["RIFFLOOP_KAFKA_TOPIC_PREFIX"] = f"bench-{run}."
    overrides = {
        "gateway": {
            "RIFFLOOP_SERVICE_NAME": f"gateway-b{run}",
            "RIFFLOOP_RATE_LIMIT_PER_S": "100000",
            "RIFFLOOP_RATE_LIMIT_BURST": "100000",
            "RIFFLOOP_MAX_FEEDBACK_BATCH": str(max(options.batch, 100)),
        },
        "feedback": {
            "RIFFLOOP_SERVICE_NAME": f"feedback-b{run}",
            "RIFFLOOP_SCORE_INTERVAL_S": str(options.score_interval),
        },
    }
    stack = ServiceProcesses(tmp / "stack", env, overrides=overrides, tied_to_parent=True)
    try:
        stack.up(("feedback", "gateway"))
        settings = Settings.from_env(env)
        bus = KafkaEventBus.from_settings(settings)
        objects = S3ObjectStore.from_settings(settings)
        wav = io.BytesIO()
        soundfile.write(wav, np.zeros(11025, dtype="float32"), 22050, format="WAV")
        ref = objects.put("tracks", f"bench-{run}.wav", wav.getvalue())
        rng = np.random.default_rng(0)
        jobs = []
        t0 = time.perf_counter()
        ready_events = []
        for i in range(options.ratings):
            user = f"bench-{run}-{i % options.users}"
            track_id = f"b{run}-{i}"
            ready = generated_track_ready(
                track_id, user, duration_seconds=0.5, model_version="v0001", audio=ref.to_proto()
            )
            ready_events.append((track_id, new_envelope("bench", ready)))
            jobs.append((track_id, user, int(rng.integers(1, 6))))
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(lambda e: bus.publish("tracks.ready.v1", *e), ready_events))
        print(
            f"published {options.ratings} TrackReady in {time.perf_counter() - t0:.1f} s; "
            "waiting for the gateway to consume them",
            file=sys.stderr,
        )
        gateway = stack.state.processes["gateway"]
        feedback = stack.state.processes["feedback"]
        gw_metrics = f"http://127.0.0.1:{gateway.metrics_port}/metrics"
        fb_metrics = f"http://127.0.0.1:{feedback.metrics_port}/metrics"

        def samples(url: str, name: str, **labels: str) -> float:
            with urllib.request.urlopen(url, timeout=5) as response:
                text = response.read().decode()
            return sum(
                s.value
                for f in text_string_to_metric_families(text)
                for s in f.samples
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
            )

        def consumed(url: str, topic: str) -> float:
            return samples(url, "riffloop_kafka_messages_total", topic=topic, outcome="handled")

        def server_buckets(method: str) -> dict[float, float]:
            """The gateway's own latency histogram (handler time, interceptors included)."""
            with urllib.request.urlopen(gw_metrics, timeout=5) as response:
                text = response.read().decode()
            return {
                float(s.labels["le"]): s.value
                for f in text_string_to_metric_families(text)
                for s in f.samples
                if s.name == "riffloop_grpc_request_seconds_bucket"
                and s.labels.get("method") == method
            }

        def recorded() -> float:
            return samples(
                fb_metrics, "riffloop_feedback_recorded_total", kind="rating", outcome="recorded"
            )

        while consumed(gw_metrics, "tracks.ready.v1") < options.ratings:
            time.sleep(0.5)
        while consumed(fb_metrics, "tracks.ready.v1") < options.ratings:
            time.sleep(0.5)
        signer = TokenSigner(stack.state.auth_secret)
        calls = _calls(jobs, options.batch)
        print(
            f"tracks ready; sending {len(jobs)} ratings in {len(calls)} calls",
            file=sys.stderr,
            flush=True,
        )
        # Warm-up calls (first connections, token cache, producer metadata, allocator) are sent
        # and counted through, but not timed: a benchmark reports the steady state.
        warm, calls = calls[: options.warmup], calls[options.warmup :]
        _, _, _, warm_accepted = asyncio.run(
            _send(gateway.target, warm, options.concurrency, signer, options.batch > 1)
        )
        while recorded() < warm_accepted:
            time.sleep(0.1)
        method = "SubmitFeedback" if options.batch > 1 else "Rate"
        buckets_before = server_buckets(method)
        before = recorded()
        trace: list[tuple[float, float]] = []
        started = time.perf_counter()
        latencies, elapsed, failures, accepted = asyncio.run(
            _send(
                gateway.target,
                calls,
                options.concurrency,
                signer,
                options.batch > 1,
                options.rate,
                trace,
            )
        )
        sent_at = time.perf_counter()
        recorded_when_sent = recorded() - before
        while recorded() - before < accepted:
            if time.perf_counter() - started > 600:
                break
            time.sleep(0.1)
        end_to_end = time.perf_counter() - started
        counted = recorded() - before
        drain = time.perf_counter() - sent_at
        after = server_buckets(method)
        server = {le: after[le] - buckets_before.get(le, 0.0) for le in after}
        bus.close()
    finally:
        stack.down()
        drop_topics(env["RIFFLOOP_KAFKA_BOOTSTRAP"], env["RIFFLOOP_KAFKA_TOPIC_PREFIX"])
        if infra is not None:
            infra.stop()
    ms = sorted(x * 1000 for x in latencies)
    rate = accepted / elapsed
    p50 = statistics.median(ms)
    p99 = ms[min(len(ms) - 1, int(0.99 * len(ms)))]
    how = f"SubmitFeedback × {options.batch} ratings" if options.batch > 1 else "Rate"
    print(
        f"ratings timed         {sum(len(c[1]) for c in calls)} in {len(calls)} calls of {how} "
        f"(after {options.warmup} warm-up calls) "
        f"({failures} calls failed), "
        + (
            f"offered {options.rate:,.0f} ratings/s open loop (≤ {options.concurrency} in flight)"
            if options.rate
            else f"closed loop, concurrency {options.concurrency}"
        )
    )
    print(
        f"gateway accepted      {rate:,.0f} ratings/s  (target {TARGET_RATE:,.0f}: "
        f"{rate / TARGET_RATE:.2f}×)"
    )
    print(
        f"gateway call latency  p50 {p50:.1f} ms  p99 {p99:.1f} ms  max {ms[-1]:.1f} ms  "
        f"(target p99 < {TARGET_P99_MS:.0f} ms)"
    )
    print(
        f"gateway server time   p50 ≤ {_quantile(server, 0.5)} ms  "
        f"p99 ≤ {_quantile(server, 0.99)} ms  (riffloop_grpc_request_seconds: inside the "
        "server, without the load generator)"
    )
    print(
        f"end to end            {counted:,.0f} counted by feedback in {end_to_end:.1f} s = "
        f"{counted / end_to_end:,.0f} ratings/s; while sending the feedback service kept up "
        f"with {recorded_when_sent / elapsed:,.0f}/s and caught up {drain:.2f} s after the last "
        "call"
    )
    if options.trace is not None:
        rows = "".join(f"{due:.4f},{latency * 1000:.2f}\n" for due, latency in sorted(trace))
        options.trace.write_text("due_s,latency_ms\n" + rows)
        print(f"per-call latencies in {options.trace}")
    return 0


def _quantile(cumulative: dict[float, float], q: float) -> str:
    """The histogram bucket bound (ms) below which a share q of the calls finished."""
    total = cumulative.get(float("inf"), 0.0)
    for bound in sorted(cumulative):
        if total and cumulative[bound] >= q * total:
            return "∞" if bound == float("inf") else f"{bound * 1000:g}"
    return "?"


def _calls(jobs: list[tuple[str, str, int]], batch: int) -> list[tuple[str, list[tuple[str, int]]]]:
    """Group (track, user, stars) jobs into calls of up to ``batch`` ratings of one user."""
    by_user: dict[str, list[tuple[str, int]]] = {}
    for track_id, user, stars in jobs:
        by_user.setdefault(user, []).append((track_id, stars))
    size = max(1, batch)
    calls = [
        (user, ratings[i : i + size])
        for user, ratings in by_user.items()
        for i in range(0, len(ratings), size)
    ]
    # interleave users the way independent clients would arrive
    calls.sort(key=lambda call: zlib.crc32(call[1][0][0].encode()))
    return calls


if __name__ == "__main__":
    sys.exit(main())
