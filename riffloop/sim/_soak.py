"""The soak: the simulated population listens and rates through the gateway for many minutes while
each service process's memory, open files and threads are sampled (``bin/riffloop soak``).

    bin/riffloop soak [--minutes 30] [--listeners 16] [--sample-every 30]
        [--population riffloop.sim:bright_dense_listeners] [--infra-env .riffloop/infra/infra.env]

1. Kafka, MinIO and Redis are started (or reused with ``--infra-env``); the gateway and feedback
   services run as separate processes (``riffloop.stack``) on a fresh topic prefix and their
   own Redis database, so no earlier run is replayed into them.
2. Tracks are made ready the way the generator does it, by publishing TrackReady events (no
   model needed). A feeder keeps the listening queue stocked: a track is served to
   ``queue_target_listeners`` listeners, so it publishes while fewer than two tracks per listener
   are left to serve.
3. Each listener loops until the time is up, as a real client does: NextTrack, stream the audio,
   listen (in real time), ReportListen, Rate. It opens a new connection every
   ``SESSION_TRACKS`` tracks, so connection churn is part of the soak.
4. Every ``--sample-every`` seconds each service's RSS (``/proc/<pid>/status`` VmRSS), open file
   descriptors (``/proc/<pid>/fd``) and threads are read. The verdict (``flatness``): the first
   third of the samples is warm-up; a metric is flat when the mean of the last third is at most
   the second third's mean plus its tolerance. Exit status 1 when anything is not flat or a
   service died, 2 for a bad argument.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from riffloop.core import RiffloopError, ValidationError
from riffloop.sim._listeners import (
    Listener,
    checked_answer,
    load_listener_factory,
    make_population,
)

SAMPLE_RATE = 22050
# A listener reconnects after this many tracks (a client that opens the app again).
SESSION_TRACKS = 10
# The soak's Redis database (flushed at the start): away from a dev stack's 0, the simulation's
# low numbers and bench_ratings' 9.
SOAK_REDIS_DB = 13
# Distinct clips the tracks point at (tones from dark to bright, sparse to dense).
CLIP_VARIANTS = 8


# 1. The verdict: pure functions over the samples ----------------------------------------------
@dataclass(frozen=True, slots=True)
class Tolerance:
    """How much a metric's last-third mean may exceed its second-third mean: ``relative`` of
    that mean plus ``absolute`` units."""

    relative: float = 0.0
    absolute: float = 0.0

    def allowed(self, baseline: float) -> float:
        return self.relative * baseline + self.absolute


# RSS +10 % (allocator arenas and caches settle slowly), open files +5, threads +2.
DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "rss_mib": Tolerance(relative=0.10),
    "fds": Tolerance(absolute=5),
    "threads": Tolerance(absolute=2),
}


@dataclass(frozen=True, slots=True)
class Flatness:
    warm_mean: float  # mean of the second third (after warm-up)
    last_mean: float  # mean of the last third
    allowed: float  # how far last_mean may exceed warm_mean
    slope_per_h: float  # least-squares slope over the two thirds after warm-up, units per hour
    flat: bool


def least_squares_slope(times_s: Sequence[float], values: Sequence[float]) -> float:
    """b of the fit y = a + b·t (units per second): Σ(t−t̄)(y−ȳ) / Σ(t−t̄)²; 0 for one time."""
    t = np.asarray(times_s, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    spread = float(((t - t.mean()) ** 2).sum())
    if spread == 0.0:
        return 0.0
    return float(((t - t.mean()) * (y - y.mean())).sum() / spread)


def flatness(times_s: Sequence[float], values: Sequence[float], tolerance: Tolerance) -> Flatness:
    """Thirds by sample index, n = len(values): warm-up [0, ⌊n/3⌋), second [⌊n/3⌋, ⌊2n/3⌋),
    last [⌊2n/3⌋, n). Flat when mean(last) ≤ mean(second) + tolerance.allowed(mean(second))."""
    if len(times_s) != len(values):
        raise ValidationError(f"{len(times_s)} times for {len(values)} values")
    n = len(values)
    if n < 3:
        raise ValidationError(f"a verdict needs at least 3 samples (one per third), got {n}")
    if not all(math.isfinite(v) for v in (*times_s, *values)):
        raise ValidationError("samples must be finite numbers")
    first, second = n // 3, (2 * n) // 3
    warm_mean = float(np.mean(values[first:second]))
    last_mean = float(np.mean(values[second:]))
    allowed = tolerance.allowed(warm_mean)
    slope = least_squares_slope(times_s[first:], values[first:]) * 3600.0
    return Flatness(warm_mean, last_mean, allowed, slope, last_mean <= warm_mean + allowed)


# 2. Sampling a process ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ResourceSample:
    t_s: float
    rss_mib: float
    fds: int
    threads: int


def sample_process(pid: int, t_s: float) -> ResourceSample:
    """RSS and threads from /proc/<pid>/status (VmRSS in kB, Threads), open descriptors as the
    entries of /proc/<pid>/fd. Raises OSError when the process is gone."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.split()
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return ResourceSample(t_s, int(fields["VmRSS"][0]) / 1024.0, fds, int(fields["Threads"][0]))


# 3. The population and the feeder ------------------------------------------------------------
def _clips(seconds: float) -> list[bytes]:
    """CLIP_VARIANTS WAV clips: tone bursts whose pitch and burst rate rise with the index, so
    the tastes of the population disagree about them."""
    import soundfile

    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    out = []
    for k in range(CLIP_VARIANTS):
        freq = 110.0 * 2 ** (k * 5 / CLIP_VARIANTS)  # 110 Hz … ≈ 2.8 kHz
        bursts = 1.0 + k  # bursts per second
        envelope = (np.sin(2 * np.pi * bursts * t) > 0).astype(np.float64)
        audio = (0.3 * envelope * np.sin(2 * np.pi * freq * t)).astype("float32")
        buffer = io.BytesIO()
        soundfile.write(buffer, audio, SAMPLE_RATE, format="WAV", subtype="PCM_16")
        out.append(buffer.getvalue())
    return out


class _Tally:
    """What the population did, counted across its threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()

    def add(self, what: str, n: int = 1) -> None:
        with self.lock:
            self.counts[what] += n

    def error(self, reason: str) -> None:
        with self.lock:
            self.errors[reason[:70]] += 1


def _listen_loop(
    listener: Listener, target: str, token: str, stop: threading.Event, tally: _Tally
) -> None:
    """One listener until ``stop``: sessions of SESSION_TRACKS tracks, each a new connection."""
    import soundfile

    from riffloop.client import GatewayClient

    while not stop.is_set():
        with GatewayClient(target, token) as client:
            heard = 0
            while heard < SESSION_TRACKS and not stop.is_set():
                try:
                    info = client.next_track()
                    if info is None:
                        tally.add("starved")
                        stop.wait(1.0)
                        continue
                    tally.add("served")
                    wav = client.audio(info.track_id)
                    data, rate = soundfile.read(io.BytesIO(wav), dtype="float32", always_2d=True)
                    audio = data[:, 0]
                    answer = listener.listen(info.track_id, audio, rate)
                    stars, seconds, elapsed = checked_answer(answer, audio.size / rate)
                    if stop.wait(elapsed):  # listening takes the listener's own time
                        break
                    client.report_listen(
                        info.track_id, seconds, completed=seconds >= audio.size / rate - 1e-3
                    )
                    tally.add("listens")
                    if stars is not None:
                        client.rate(info.track_id, stars)
                        tally.add("ratings")
                    heard += 1
                except RiffloopError as exc:  # refused or unavailable: counted, then go on
                    tally.error(f"{type(exc).__name__}: {exc.reason}")
                    stop.wait(0.5)


def _feed(
    bus: object,
    refs: list[object],
    clip_seconds: float,
    run: str,
    target_listeners: int,
    listeners: int,
    stop: threading.Event,
    tally: _Tally,
) -> None:
    """Publish TrackReady events while fewer than two tracks per listener are left to serve
    (each track is served to ``target_listeners`` listeners, then leaves the queue)."""
    from riffloop.core import new_envelope
    from riffloop.v1 import common_pb2, events_pb2

    published = 0
    while not stop.is_set():
        with tally.lock:
            served = tally.counts["served"]
        while published * target_listeners - served < 2 * listeners * target_listeners:
            track_id = f"soak-{run}-{published}"
            ref = refs[published % len(refs)]
            ready = events_pb2.TrackReady(
                track_id=track_id,
                audio=ref.to_proto(),  # type: ignore[attr-defined]
                provenance=common_pb2.TrackProvenance(
                    # one in four a baseline, as the generator's dispatch serves them
                    kind=common_pb2.TRACK_KIND_BASELINE
                    if published % 4 == 0
                    else common_pb2.TRACK_KIND_GENERATED,
                    model_version="v0001",
                    input_song_ids=["a" * 64],
                    similarity=0.5,
                    quality=5,
                    baseline_song_id="b" * 64 if published % 4 == 0 else "",
                ),
                user_id=f"soak-{run}-studio",  # the owner, never one of the listeners
                duration_seconds=clip_seconds,
            )
            try:
                bus.publish(  # type: ignore[attr-defined]
                    "tracks.ready.v1", track_id, new_envelope("soak", ready)
                )
            except RiffloopError as exc:
                tally.error(f"publish: {exc.reason}")
                break
            published += 1
            tally.add("published")
        stop.wait(0.5)


# 4. The command ------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bin/riffloop soak",
        description="The simulated population listens and rates through the gateway while "
        "each service's RSS, open files and threads are sampled; exit 1 unless all are flat.",
    )
    p.add_argument("--minutes", type=float, default=30.0, help="how long (default 30)")
    p.add_argument("--listeners", type=int, default=16, help="simulated listeners (default 16)")
    p.add_argument(
        "--population",
        default="riffloop.sim:bright_dense_listeners",
        help="listener factory, module:function (docs/LISTENERS.md)",
    )
    p.add_argument("--spam-share", type=float, default=0.1, help="share of bots (default 0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--sample-every", type=float, default=30.0, help="seconds between samples (default 30)"
    )
    p.add_argument(
        "--clip-seconds", type=float, default=2.0, help="length of each track (default 2.0)"
    )
    p.add_argument(
        "--rss-tolerance",
        type=float,
        default=DEFAULT_TOLERANCES["rss_mib"].relative,
        help="RSS growth allowed, last third over the second (default 0.10 = +10 %%)",
    )
    p.add_argument(
        "--fd-tolerance",
        type=int,
        default=int(DEFAULT_TOLERANCES["fds"].absolute),
        help="open file descriptors allowed over the second third's mean (default 5)",
    )
    p.add_argument(
        "--thread-tolerance",
        type=int,
        default=int(DEFAULT_TOLERANCES["threads"].absolute),
        help="threads allowed over the second third's mean (default 2)",
    )
    p.add_argument(
        "--infra-env",
        type=Path,
        default=None,
        help="use running servers (an infra.env from `bin/riffloop infra up`) instead of "
        "starting Kafka, MinIO and Redis for this run",
    )
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse and validate; a bad value exits with status 2 and the reason, before anything
    starts."""
    p = _parser()
    ns = p.parse_args(argv)
    if not (math.isfinite(ns.minutes) and 0 < ns.minutes <= 24 * 60):
        p.error("--minutes must be a number of minutes in (0, 1440]")
    if not 1 <= ns.listeners <= 1000:
        p.error("--listeners must be an integer from 1 to 1000")
    if not (math.isfinite(ns.sample_every) and ns.sample_every >= 1):
        p.error("--sample-every must be at least 1 second")
    if ns.minutes * 60 / ns.sample_every < 5:
        p.error(
            f"--minutes {ns.minutes:g} gives {int(ns.minutes * 60 / ns.sample_every) + 1} "
            f"samples at --sample-every {ns.sample_every:g} s; the verdict needs at least 6 "
            "(two per third)"
        )
    if not (math.isfinite(ns.spam_share) and 0 <= ns.spam_share < 1):
        p.error("--spam-share must be in [0, 1)")
    if not (math.isfinite(ns.clip_seconds) and 0.5 <= ns.clip_seconds <= 60):
        p.error("--clip-seconds must be from 0.5 to 60")
    if not (math.isfinite(ns.rss_tolerance) and ns.rss_tolerance >= 0):
        p.error("--rss-tolerance must be a share ≥ 0 (0.10 = +10 %)")
    if ns.fd_tolerance < 0 or ns.thread_tolerance < 0:
        p.error("--fd-tolerance and --thread-tolerance must be ≥ 0")
    if ns.infra_env is not None and not ns.infra_env.is_file():
        p.error(f"--infra-env {ns.infra_env}: no such file (written by `bin/riffloop infra up`)")
    try:
        ns.factory = load_listener_factory(ns.population)
        ns.population_list = make_population(ns.factory, ns.listeners, ns.spam_share, ns.seed)
    except ValidationError as exc:
        p.error(exc.reason)
    return ns


def format_report(
    samples: dict[str, list[ResourceSample]], tolerances: dict[str, Tolerance]
) -> tuple[str, bool]:
    """The samples as a table, then one verdict line per service and metric; and whether all
    are flat."""
    lines = [f"{'t (s)':>7}  " + "  ".join(f"{name + ' MiB/fds/thr':>26}" for name in samples)]
    rows = min(len(v) for v in samples.values())
    for i in range(rows):
        t = next(iter(samples.values()))[i].t_s
        cells = [
            f"{s[i].rss_mib:>12.1f} {s[i].fds:>6d} {s[i].threads:>6d}" for s in samples.values()
        ]
        lines.append(f"{t:>7.0f}  " + "  ".join(f"{c:>26}" for c in cells))
    lines.append("")
    lines.append(
        f"{'service':<9} {'metric':<8} {'2nd third':>10} {'last third':>10} {'allowed':>9} "
        f"{'slope/h':>9}  verdict"
    )
    all_flat = True
    for name, series in samples.items():
        times = [s.t_s for s in series]
        for metric, tolerance in tolerances.items():
            f = flatness(times, [float(getattr(s, metric)) for s in series], tolerance)
            all_flat &= f.flat
            lines.append(
                f"{name:<9} {metric:<8} {f.warm_mean:>10.1f} {f.last_mean:>10.1f} "
                f"{'+' + format(f.allowed, '.1f'):>9} {f.slope_per_h:>+9.1f}  "
                f"{'flat' if f.flat else 'NOT FLAT'}"
            )
    return "\n".join(lines), all_flat


def soak(argv: Sequence[str] | None = None) -> int:
    ns = parse_args(argv)
    tolerances = {
        "rss_mib": Tolerance(relative=ns.rss_tolerance),
        "fds": Tolerance(absolute=ns.fd_tolerance),
        "threads": Tolerance(absolute=ns.thread_tolerance),
    }
    import redis

    from riffloop.core import KafkaEventBus, S3ObjectStore, Settings
    from riffloop.infra import InfraAddresses, LocalInfra, drop_topics
    from riffloop.runtime import TokenSigner
    from riffloop.sim._deployment import _redis_db
    from riffloop.stack import ServiceProcesses

    services = ("feedback", "gateway")
    run = uuid.uuid4().hex[:8]
    tmp = Path(tempfile.mkdtemp(prefix="riffloop-soak-"))
    infra: LocalInfra | None = None
    if ns.infra_env is not None:
        addresses = InfraAddresses.from_env_file(ns.infra_env)
    else:
        print("starting Kafka, MinIO and Redis", file=sys.stderr, flush=True)
        infra = LocalInfra(tmp / "infra")
        addresses = infra.start()
    env = addresses.env()
    env["RIFFLOOP_REDIS_URL"] = _redis_db(env["RIFFLOOP_REDIS_URL"], SOAK_REDIS_DB)
    env["RIFFLOOP_KAFKA_TOPIC_PREFIX"] = f"soak-{run}."
    with redis.Redis.from_url(env["RIFFLOOP_REDIS_URL"]) as client:
        client.flushdb()  # the feedback service restores its ledger from here at start-up
    target_listeners = min(10, ns.listeners)  # a track leaves the queue after this many
    overrides = {
        "gateway": {"RIFFLOOP_QUEUE_TARGET_LISTENERS": str(target_listeners)},
        "feedback": {},
    }
    stack = ServiceProcesses(tmp / "stack", env, overrides=overrides, tied_to_parent=True)
    stop = threading.Event()
    tally = _Tally()
    samples: dict[str, list[ResourceSample]] = {name: [] for name in services}
    died: list[str] = []
    threads: list[threading.Thread] = []
    bus = None
    stopped = 0
    try:
        print(f"starting {', '.join(services)} (logs under {tmp / 'stack'})", file=sys.stderr)
        stack.up(services)
        settings = Settings.from_env(env)
        bus = KafkaEventBus.from_settings(settings)
        objects = S3ObjectStore.from_settings(settings)
        refs = [
            objects.put("tracks", f"soak-{run}-{k}.wav", wav, content_type="audio/wav")
            for k, wav in enumerate(_clips(ns.clip_seconds))
        ]
        signer = TokenSigner(stack.state.auth_secret)
        target = stack.state.processes["gateway"].target
        threads.append(
            threading.Thread(
                target=_feed,
                args=(bus, refs, ns.clip_seconds, run, target_listeners, ns.listeners, stop, tally),
                daemon=True,
            )
        )
        threads += [
            threading.Thread(
                target=_listen_loop,
                args=(x, target, signer.issue(x.listener_id), stop, tally),
                daemon=True,
            )
            for x in ns.population_list
        ]
        for thread in threads:
            thread.start()
        print(
            f"soak: {ns.listeners} listeners ({ns.population}) for {ns.minutes:g} min, "
            f"sampling every {ns.sample_every:g} s",
            file=sys.stderr,
            flush=True,
        )
        started = time.monotonic()
        duration = ns.minutes * 60.0
        tick = 0
        while not died:
            t = time.monotonic() - started
            for name in services:
                try:
                    samples[name].append(sample_process(stack.state.processes[name].pid, t))
                except OSError:
                    died.append(name)
            if not died:
                s = {n: samples[n][-1] for n in services}
                with tally.lock:
                    done = dict(tally.counts)
                print(
                    f"[{t:6.0f} s] "
                    + "  ".join(f"{n} {v.rss_mib:.0f} MiB {v.fds} fds" for n, v in s.items())
                    + f"  listens {done.get('listens', 0)} ratings {done.get('ratings', 0)}",
                    file=sys.stderr,
                    flush=True,
                )
            tick += 1
            if tick * ns.sample_every > duration + 1e-6:
                break
            time.sleep(max(0.0, started + tick * ns.sample_every - time.monotonic()))
        # a listener thread ends early only on an unexpected error (its traceback is above)
        stopped = sum(not thread.is_alive() for thread in threads)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        if bus is not None:
            bus.close()
        stack.down()
        drop_topics(env["RIFFLOOP_KAFKA_BOOTSTRAP"], env["RIFFLOOP_KAFKA_TOPIC_PREFIX"])
        if infra is not None:
            infra.stop()
    counts, errors = tally.counts, tally.errors
    print(
        f"population: {counts['published']} tracks published, {counts['served']} served, "
        f"{counts['listens']} listens, {counts['ratings']} ratings, {counts['starved']} "
        f"empty NextTrack answers, {sum(errors.values())} errors"
    )
    for reason, n in errors.most_common(5):
        print(f"  {n:>6} × {reason}")
    if died:
        print(f"NOT FLAT: {', '.join(died)} died during the soak (logs under {tmp / 'stack'})")
        return 1
    if stopped:
        print(f"NOT FLAT: {stopped} of the soak's threads stopped on an error; load was lower")
        return 1
    if counts["ratings"] == 0:
        print("NOT FLAT: the population rated nothing, so nothing was soaked")
        return 1
    table, flat = format_report(samples, tolerances)
    print(table)
    print(
        "verdict: "
        + ("flat" if flat else "NOT FLAT")
        + f" (first third warm-up; tolerances: RSS +{ns.rss_tolerance:.0%}, "
        f"fds +{ns.fd_tolerance}, threads +{ns.thread_tolerance})"
    )
    return 0 if flat else 1
