"""The demo and the evidence through the services: simulated people as clients of the gateway.

Three deployments of the six services (``riffloop.sim.EmbeddedDeployment``; with ``stack``,
``StackDeployment``: processes on real Kafka, MinIO and Redis), identical but for one setting:
SELECTED (the selector keeps generations that beat their input's baseline), CONTROL (the
selector draws the same number of generations at random, ω = 1) and BASE (never fine-tuned; it
serves the iteration-0 and evaluation sessions only). All three share the dispatch key, so a
request key meets the same blind draw (baseline or generation) and seed in
each: common random numbers, the pairing the evidence rests on.

Per session (``it0`` … ``itK``, then ``eval``) in each deployment:

1. Requests: for each input merge (two held-out corpus recordings), a studio user uploads both
   songs and asks ``requests_per_merge`` times for a ``track_seconds`` track (``Generate`` with
   the client key ``<session>:m<m>:r<r>`` and a seed derived from it), then waits until ready.
2. Listening: each simulated listener, in turn, asks ``NextTrack`` up to
   ``ratings_per_listener`` times, streams the track, hears it (the plug-in ``Listener``),
   reports the listening time and rates it, stamping its own client time. The gateway's clock
   skips the time listened (``SimClock``), so an hour of listening takes seconds.
3. Scoring: the feedback service's passes (spam filter → reliability, ω); the experimenter waits
   until they settle, then reads each track's R, ω, n and provenance (``TrackScore``).
4. Release step (after ``it0`` … ``itK−1``): ``RunSelection`` on SELECTED, then on CONTROL with
   the same pair budget; each trainer fine-tunes (LoRA, replay, ω-weighted loss), gates and
   publishes; the next session is served by whatever each deployment then serves (a candidate
   the gate refused is not).

The deployments share nothing, so each step runs in all of them at once (a thread per
deployment): the sessions of one iteration, then the trainers of one release step.

The evaluation session serves fresh merges (no iteration used them) from all three deployments;
``docs/results`` reads selected − control and the lift over BASE from its rows. Only the
column "hidden liking" looks inside the listeners (mean liking u of the honest ones).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from riffloop.core import RateLimitedError, RiffloopError, TransientError, ValidationError
from riffloop.loop import CycleSettings, TrackKind, welch_ci
from riffloop.runtime import provenance_from_proto
from riffloop.sim._deployment import Deployment, EmbeddedDeployment, SimClock, StackDeployment
from riffloop.sim._listeners import (
    Listener,
    ListenerFactory,
    audio_features,
    checked_answer,
    load_listener_factory,
    make_population,
)

Progress = Callable[[str], None]
SAMPLE_RATE = 22_050


DEFAULT_MODEL_DIR = Path("assets/base-model")


@dataclass(frozen=True)
class LoopConfig:
    """The experiment's sizes and the settings it gives the services (the rest are the services'
    defaults). Defaults aim at a warm demo in ≤ 20 min on 2 CPU cores with the 64 × 64 model."""

    iterations: int = 2  # release steps; each arm has iterations + 1 listening sessions
    n_listeners: int = 50
    spam_share: float = 0.2
    listeners: str = "riffloop.sim:bright_dense_listeners"
    seed: int = 0
    n_inputs: int = 16  # held-out recordings in the input pool
    n_merges: int = 8  # input merges (pairs of recordings), each one studio user's request
    # 6 requests per merge: ≈ 4.5 generations compete for each input and R_b rests on ≈ 1.5
    # baseline tracks. Every track is 4 windows (5.94 s) and a session of 96 took 7 min here,
    # so the demo asks for half as many; 25 listeners per track in the queue keep ≈ 25 ratings
    # per track.
    requests_per_merge: int = 6
    ratings_per_listener: int = 48  # NextTrack calls per listener and session
    queue_target_listeners: int = 25  # the gateway's RIFFLOOP_QUEUE_TARGET_LISTENERS
    baseline_share: float = 0.25
    similarity: float = 0.5
    quality: int = 20
    invert_steps: int = 20  # the encoder's inversion and each version's baseline index
    finetune_steps: int = 60
    finetune_batch: int = 8
    learning_rate: float = 5e-4
    lora_rank: int = 8
    replay_ratio: float = 0.5
    # Exploratory, off by default: β > 0 makes both arms' selectors name a loser per pair
    # (RIFFLOOP_PREFERENCE_PAIRS) and their trainers fit the Diffusion-DPO loss with this β
    # (RIFFLOOP_PREFERENCE_BETA; docs/LOOP.md §5); 0 = the ω-weighted ε loss on the winners.
    preference_beta: float = 0.0
    # Exploratory, "first" by default: what each arm's trainer learns from a kept track, its
    # first window or "all" its windows (RIFFLOOP_TRAIN_WINDOWS; docs/LOOP.md §5).
    train_windows: str = "first"
    # Exploratory, "genetic" by default: the selected arm's selector (RIFFLOOP_SELECTION).
    # "weighted" trains on every generation of a session, weighted by its rating against its
    # input's other generations, and the control arm then trains on the same kind of set with
    # those weights shuffled within each input ("permuted") instead of a random draw.
    selection: str = "genetic"
    canary_alpha: float = 0.05
    # Torch threads per UNet call. The deployments work at the same time (their sessions, then
    # their trainers), so one thread each keeps a 2-core machine's cores busy without the
    # oversubscription of two 2-thread pools; measured in docs/results/services/README.md.
    torch_threads: int = 1
    # Each input song is an excerpt of this many seconds of a held-out recording; tracks are
    # asked for at this length (served as 4 overlapping windows, 5.94 s).
    input_seconds: float = 8.0
    track_seconds: float = 5.9
    # The evaluation session after the last iteration: fresh requests (merges no iteration used)
    # served by BASE, SELECTED and CONTROL under the same request keys (common random numbers).
    # 0 merges: off.
    eval_merges: int = 8
    eval_requests_per_merge: int = 6
    eval_ratings_per_listener: int = 48
    # What a saved run was made with beyond these numbers (a run is reused only when equal):
    # 5 = the loop through the six services (listening queue, gateway API, trainer's cycle);
    # 6 = the same with the deployments at work at once (one torch thread each), the baseline
    # index's rows carried over between versions, clients pacing to the gateway's rate limit.
    # (Preference pairs, preference_beta > 0, came later with its default 0 keeping protocol 6;
    # its runs are exploratory, docs/results/services/exploratory/.)
    protocol: int = 6

    def __post_init__(self) -> None:
        """Every field in its range, so a bad ``--flag`` fails before anything starts."""
        at_least = {
            "iterations": 1,
            "n_listeners": 1,
            "seed": 0,
            "n_inputs": 2,  # a merge pairs two recordings
            "n_merges": 1,
            "requests_per_merge": 1,
            "ratings_per_listener": 1,
            "queue_target_listeners": 1,
            "quality": 1,
            "invert_steps": 1,
            "torch_threads": 1,
            "eval_merges": 0,  # 0: no evaluation session
            "eval_requests_per_merge": 1,
            "eval_ratings_per_listener": 1,
        }
        for name, low in at_least.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValidationError(f"{name} must be an integer ≥ {low}, got {value!r}")
        shares: dict[str, tuple[float, float, bool]] = {  # name: (low, high, high included?)
            "spam_share": (0.0, 1.0, False),
            "baseline_share": (0.0, 1.0, True),
            "similarity": (0.0, 1.0, False),
            "input_seconds": (2.0, 60.0, True),
            "track_seconds": (1.486, 60.0, True),
        }
        for name, (floor, ceiling, closed) in shares.items():
            value = getattr(self, name)
            inside = floor <= value <= ceiling if closed else floor <= value < ceiling
            if not (isinstance(value, int | float) and math.isfinite(value) and inside):
                bracket = "]" if closed else ")"
                raise ValidationError(
                    f"{name} must lie in [{floor:g}, {ceiling:g}{bracket}, got {value!r}"
                )
        if self.selection not in ("genetic", "weighted"):
            raise ValidationError(f"selection must be genetic or weighted, got {self.selection!r}")
        if self.selection == "weighted" and self.preference_beta > 0:
            raise ValidationError(
                "preference_beta needs the genetic selection (weighted sets name no losers)"
            )
        self.cycle_settings()  # the fine-tune's and canary's fields: checked where they are used

    def cycle_settings(self) -> CycleSettings:
        """What this config sets of each arm's release cycle (the trainer's RIFFLOOP_* beside
        it); its checks are the cycle's, named as this config's fields."""
        try:
            return CycleSettings(
                finetune_steps=self.finetune_steps,
                batch_size=self.finetune_batch,
                learning_rate=self.learning_rate,
                replay_ratio=self.replay_ratio,
                lora_rank=self.lora_rank,
                preference_beta=self.preference_beta,
                train_windows=self.train_windows,
                canary_alpha=self.canary_alpha,
            )
        except ValidationError as exc:
            raise ValidationError(exc.reason.replace("batch_size", "finetune_batch")) from None


@dataclass(frozen=True)
class IterationRow:
    """One row of the paper's table."""

    arm: str
    iteration: int
    model_version: str
    ratings_used: int
    mean_generated: float
    mean_baseline: float
    delta: float
    delta_lo: float
    delta_hi: float
    diversity: float
    spam_caught: int
    spammers: int
    false_alarms: int
    hidden_generated: float  # mean hidden liking u of generations (honest listeners)
    hidden_baseline: float
    train_pairs: int
    gate: str
    canary: str
    seconds: float
    session: str = "train"  # "train": an iteration's own session; "eval": the evaluation session


@dataclass
class LoopResult:
    config: LoopConfig
    rows: list[IterationRow] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    registry_versions: list[dict[str, Any]] = field(default_factory=list)
    # The evaluation session's tracks, one dict per (arm, request): what `paired_evaluation`
    # (riffloop.sim._report) pairs across arms by request key. Not kept by `read_result`.
    eval_tracks: list[dict[str, Any]] = field(default_factory=list)

    def final(self, arm: str) -> IterationRow:
        """The arm's last row: its evaluation-session row when there is one (the model the arm
        ended up serving, measured on the shared evaluation requests), else its last iteration."""
        rows = [r for r in self.rows if r.arm == arm]
        evaluated = [r for r in rows if r.session == "eval"]
        return (evaluated or rows)[-1]

    def iterations(self, arm: str) -> list[IterationRow]:
        return [r for r in self.rows if r.arm == arm and r.session == "train"]


@dataclass(frozen=True)
class InputSong:
    """One input recording: an excerpt of a held-out corpus render, as a WAV file."""

    name: str
    wav: bytes


def load_inputs(config: LoopConfig) -> list[InputSong]:
    """``n_inputs`` excerpts of ``input_seconds`` from distinct held-out pieces of the corpus the
    base model was trained on (its renders are cached by ``python -m riffloop.music corpus``)."""
    import soundfile

    from riffloop.music._corpus import corpus_dir

    audio_dir = corpus_dir() / "audio"
    manifest = corpus_dir() / "mel-64x64" / "manifest.json"
    if not manifest.is_file():
        raise ValidationError(
            f"no corpus at {corpus_dir()}: build it with `bin/riffloop python -m riffloop.music "
            "corpus` (`bin/riffloop demo` and `bin/riffloop evidence` build it themselves)"
        )
    pieces = json.loads(manifest.read_text())["pieces"]
    heldout = sorted(
        {
            (p["id"], instrument)
            for p in pieces
            if p.get("split") == "heldout"
            for instrument in p.get("instruments", [])
        }
    )
    rng = np.random.default_rng([config.seed, 7])
    songs: list[InputSong] = []
    seen: set[str] = set()
    for i in rng.permutation(len(heldout)):
        piece, instrument = heldout[int(i)]
        stem = piece.replace("/", "__").replace(" ", "_")
        path = audio_dir / f"{stem}__{instrument}.flac"
        if piece in seen or not path.is_file():
            continue
        data, rate = soundfile.read(path, dtype="float32", always_2d=True)
        n = int(config.input_seconds * rate)
        if len(data) < n:
            continue
        start = int(rng.integers(0, len(data) - n + 1))
        buffer = io.BytesIO()
        soundfile.write(buffer, data[start : start + n, 0], rate, format="WAV", subtype="PCM_16")
        songs.append(InputSong(f"{piece}:{instrument}@{start / rate:.1f}s", buffer.getvalue()))
        seen.add(piece)
        if len(songs) == config.n_inputs:
            return songs
    raise ValidationError(
        f"the corpus has only {len(songs)} held-out pieces of ≥ {config.input_seconds:g} s; "
        f"n_inputs is {config.n_inputs}"
    )


@dataclass
class ServedTrack:
    """What the experimenter knows of one track after its session (the operator's view)."""

    track_id: str
    request_key: str  # the studio's client key, the same in every deployment (the pairing)
    kind: TrackKind
    input_key: str
    model_version: str
    score: float  # R
    ratings: int
    embedding: np.ndarray
    liking: float  # mean hidden liking of the honest listeners who could hear it


@dataclass
class _Arm:
    name: str
    deployment: Deployment
    clock: Callable[[], float]
    listeners: list[Listener]
    pairs: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    audio: dict[str, np.ndarray] = field(default_factory=dict)
    eval_tracks: list[ServedTrack] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)  # listeners in threads (stack)

    def refuse(self, reason: str) -> None:
        with self.lock:
            self.refused[reason] += 1


# How often a client call refused with RESOURCE_EXHAUSTED is tried again before the run stops.
RATE_LIMIT_RETRIES = 100
T = TypeVar("T")


def _paced(
    arm: _Arm, wait: Callable[[float], None], call: Callable[..., T], *args: Any, **kwargs: Any
) -> T:
    """``call(*args, **kwargs)`` as an app makes it: refused over the user's rate limit
    (RESOURCE_EXHAUSTED), it waits the gateway's retry-after and tries again. Each refusal is
    counted in the arm's report; only a limit that never lets the call through stops the run."""
    for _ in range(RATE_LIMIT_RETRIES):
        try:
            return call(*args, **kwargs)
        except RateLimitedError as exc:
            arm.refuse("rate limited (RESOURCE_EXHAUSTED), retried after the gateway's hint")
            wait(exc.retry_after_s if exc.retry_after_s else 1.0)
    raise TransientError(f"[{arm.name}] still rate limited after {RATE_LIMIT_RETRIES} tries")


def _request_seed(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % (2**31 - 1) + 1


class LoopExperiment:
    """Runs the protocol above; ``run()`` returns a ``LoopResult`` (the paper's table)."""

    def __init__(
        self,
        config: LoopConfig,
        inputs: Sequence[InputSong],
        factory: ListenerFactory | None = None,
        progress: Progress = print,
        model_dir: Path = DEFAULT_MODEL_DIR,
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
        stack: Mapping[str, str] | None = None,
    ) -> None:
        """``overrides``: per service, settings laid over the experiment's (a test's untrained
        tiny model, say); ``model_dir``: the trained base model every deployment starts from;
        ``stack``: the local infrastructure's settings (``riffloop.infra``), to run each
        deployment as six processes on real Kafka, MinIO and Redis instead of embedded."""
        self.stack = dict(stack) if stack is not None else None
        self.run_id = uuid.uuid4().hex[:6]
        self.cfg = config
        self.model_dir = Path(model_dir).resolve()
        self.overrides = {k: dict(v) for k, v in (overrides or {}).items()}
        self.inputs = list(inputs)
        self.factory = factory or load_listener_factory(config.listeners)
        self.progress = progress
        self.arms: dict[str, _Arm] = {}
        rng = np.random.default_rng(config.seed + 1)
        n = len(self.inputs)
        merges: set[tuple[int, int]] = set()
        while len(merges) < min(config.n_merges, n * (n - 1) // 2):
            a, b = sorted(int(x) for x in rng.choice(n, size=2, replace=False))
            merges.add((a, b))
        self.merges = sorted(merges)
        pairs = [(a, b) for a in range(n) for b in range(a + 1, n)]
        fresh = [p for p in pairs if p not in set(self.merges)] or pairs
        picks = np.random.default_rng([config.seed, 10_000]).choice(
            len(fresh), size=min(config.eval_merges, len(fresh)), replace=False
        )
        self.eval_merges = sorted(fresh[int(i)] for i in picks)

    # 0. deployments ------------------------------------------------------------------------------
    def arm_selections(self) -> tuple[tuple[str, str], ...]:
        """(arm, its selector's RIFFLOOP_SELECTION): SELECTED the experiment's rule, CONTROL
        its ratings-blind twin (a random draw, or the weights shuffled within each input), BASE
        never fine-tuned."""
        control = "random" if self.cfg.selection == "genetic" else "permuted"
        return (
            ("selected", self.cfg.selection),
            ("control", control),
            ("base", self.cfg.selection),
        )

    def settings(self, selection: str) -> dict[str, dict[str, Any]]:
        """Each service's settings in this experiment: the services' defaults, except the
        experiment's sizes and the selection rule. Selection runs when the experimenter asks
        (``RunSelection``), so its periodic pass is put off."""
        cfg = self.cfg
        return {
            "gateway": {
                "queue_target_listeners": cfg.queue_target_listeners,
                "baseline_share": cfg.baseline_share,
            },
            "generator": {"baseline_share": cfg.baseline_share, "torch_threads": cfg.torch_threads},
            "encoder": {"inversion_steps": cfg.invert_steps, "torch_threads": cfg.torch_threads},
            "feedback": {"score_interval_s": 0.5, "scorer": "inline"},  # one process
            "selector": {
                "selection": selection,
                "random_seed": cfg.seed,
                "select_interval_s": 1e9,
                "preference_pairs": cfg.preference_beta > 0,
            },
            "trainer": {
                "base_model_dir": str(self.model_dir),
                "finetune_steps": cfg.finetune_steps,
                "batch_size": cfg.finetune_batch,
                "learning_rate": cfg.learning_rate,
                "lora_rank": cfg.lora_rank,
                "replay_ratio": cfg.replay_ratio,
                "preference_beta": cfg.preference_beta,
                "train_windows": cfg.train_windows,
                "baseline_inversion_steps": cfg.invert_steps,
                "canary_share": 0.0,  # promote, then watch the next session's ratings
                "canary_alpha": cfg.canary_alpha,
                "torch_threads": cfg.torch_threads,
            },
        }

    def _start(self, name: str, selection: str) -> _Arm:
        clock = SimClock()
        key = hashlib.sha256(f"riffloop-sim-dispatch/{self.cfg.seed}".encode()).hexdigest()
        settings = self.settings(selection)
        for service, changes in self.overrides.items():
            settings[service] = {**settings.get(service, {}), **changes}
        deployment: Deployment
        if self.stack is None:
            deployment = EmbeddedDeployment(
                name, settings, key, clock=clock, queue_seed=self.cfg.seed
            ).start()
        else:
            db = 1 + len(self.arms)  # Redis databases 1–3; 0 stays the stack's own
            deployment = StackDeployment(
                name, settings, key, self.stack, db, Path(".riffloop/sim-stack"), self.run_id
            ).start()
            clock = deployment.clock  # type: ignore[assignment]
        listeners = make_population(
            self.factory, self.cfg.n_listeners, self.cfg.spam_share, self.cfg.seed
        )
        return _Arm(name, deployment, clock, listeners)

    # 1. requests ---------------------------------------------------------------------------------
    def _request(self, arm: _Arm, label: str, merges: Sequence[tuple[int, int]], per: int) -> dict:
        cfg = self.cfg
        # the studio's app waits out a rate-limit refusal in the servers' time
        wait = arm.clock.skip if isinstance(arm.clock, SimClock) else time.sleep
        tracks: dict[str, str] = {}  # request key → track id
        for m, merge in enumerate(merges):
            with arm.deployment.gateway(f"studio-{label}-m{m}") as studio:
                songs = [
                    _paced(arm, wait, studio.upload_song, self.inputs[i].wav).song_id for i in merge
                ]
                for r in range(per):
                    key = f"{label}:m{m}:r{r}"
                    tracks[key] = _paced(
                        arm,
                        wait,
                        studio.generate,
                        songs,
                        similarity=cfg.similarity,
                        quality=cfg.quality,
                        seed=_request_seed(f"{cfg.seed}/{key}"),
                        duration_seconds=cfg.track_seconds,
                        client_request_id=key,
                    )
        deadline = time.monotonic() + 1800
        for m, _merge in enumerate(merges):
            with arm.deployment.gateway(f"studio-{label}-m{m}") as studio:
                for r in range(per):
                    left = max(1.0, deadline - time.monotonic())
                    track_id = tracks[f"{label}:m{m}:r{r}"]
                    _paced(arm, wait, studio.wait_ready, track_id, timeout_s=left)
        return tracks

    # 2. listening ---------------------------------------------------------------------------
    def _listen(self, arm: _Arm, per_listener: int) -> int:
        """Every listener's session. Embedded: one after another, the gateway's clock skipping
        each track's listening time (``SimClock``). On the process stack the servers keep wall
        time, so the listeners listen at once, each waiting out what it hears."""
        if isinstance(arm.clock, SimClock):
            heard = 0
            for listener in arm.listeners:
                heard += self._hear(arm, listener, per_listener, arm.clock.skip)
                arm.clock.skip(3600.0)  # an hour before the next listener's session
            return heard
        with ThreadPoolExecutor(max_workers=len(arm.listeners)) as pool:
            sessions = [
                pool.submit(self._hear, arm, listener, per_listener, time.sleep)
                for listener in arm.listeners
            ]
            return sum(session.result() for session in sessions)

    def _hear(
        self, arm: _Arm, listener: Listener, per_listener: int, wait: Callable[[float], None]
    ) -> int:
        """One listener's session through the gateway: up to ``per_listener`` tracks from
        NextTrack, each streamed, heard, then its listening time reported and its stars given,
        stamped with the listener's own clock (after ``wait``ing out the time it took)."""
        heard = 0
        with arm.deployment.gateway(listener.listener_id) as client:
            for _ in range(per_listener):
                info = _paced(arm, wait, client.next_track)
                if info is None:
                    break
                audio = arm.audio.get(info.track_id)
                if audio is None:
                    audio = _decode(_paced(arm, wait, client.audio, info.track_id))
                    arm.audio[info.track_id] = audio
                clip = audio.size / SAMPLE_RATE
                try:
                    answer = listener.listen(info.track_id, audio, SAMPLE_RATE)
                except Exception as exc:  # a bug in the plug-in: stop, naming it
                    raise ValidationError(
                        f"listener {listener.listener_id} ({type(listener).__name__}) "
                        f"raised {type(exc).__name__}: {exc}"
                    ) from exc
                try:
                    stars, seconds, elapsed = checked_answer(answer, clip)
                except ValidationError as exc:  # what the gateway would refuse anyway
                    arm.refuse(exc.reason)
                    continue
                wait(elapsed)
                at = arm.clock()
                done = seconds >= clip - 1e-3
                try:
                    _paced(
                        arm,
                        wait,
                        client.report_listen,
                        info.track_id,
                        seconds,
                        completed=done,
                        at=at,
                    )
                    if stars is not None:
                        _paced(arm, wait, client.rate, info.track_id, stars, at=at)
                except RiffloopError as exc:  # refused by the gateway: counted, not fatal
                    arm.refuse(exc.reason[:60])
                    continue
                heard += 1
        return heard

    # 3. scoring ----------------------------------------------------------------------------------
    def _settled_scores(self, arm: _Arm, track_ids: Sequence[str]) -> dict[str, Any]:
        """Each track's TrackScored once the feedback service's passes stop changing them."""
        deadline = time.monotonic() + 300
        last: dict[str, Any] = {}
        stable_since = None
        while time.monotonic() < deadline:
            now = {t: arm.deployment.track_score(t) for t in track_ids}
            counts = {t: (s.rating_count, round(s.mean_rating, 6)) for t, s in now.items()}
            if counts == {t: (s.rating_count, round(s.mean_rating, 6)) for t, s in last.items()}:
                stable_since = stable_since or time.monotonic()
                if time.monotonic() - stable_since >= 3.0:
                    return now
            else:
                stable_since = None
            last = now
            time.sleep(0.5)
        raise TransientError("the feedback service's scores did not settle within 300 s")

    def _served(self, arm: _Arm, tracks: dict[str, str]) -> list[ServedTrack]:
        scores = self._settled_scores(arm, list(tracks.values()))
        honest = [x for x in arm.listeners if getattr(x, "kind", "") == "honest"]
        out = []
        for request_key, track_id in tracks.items():
            s = scores[track_id]
            prov = provenance_from_proto(track_id, s.provenance)
            audio = arm.audio.get(track_id)
            liking = _hidden_liking(honest, audio) if audio is not None else math.nan
            out.append(
                ServedTrack(
                    track_id=track_id,
                    request_key=request_key,
                    kind=prov.kind,
                    input_key=prov.input_key,
                    model_version=prov.model_version,
                    score=float(s.mean_rating),
                    ratings=int(s.rating_count),
                    embedding=np.asarray(arm.deployment.track_embedding(track_id), dtype=float),
                    liking=liking,
                )
            )
        return out

    def _row(
        self, arm: _Arm, iteration: int, served: list[ServedTrack], session: str, seconds: float
    ) -> IterationRow:
        rated = [t for t in served if t.ratings > 0]
        gen = [t for t in rated if t.kind is TrackKind.GENERATED]
        base = [t for t in rated if t.kind is TrackKind.BASELINE]
        delta, lo, hi = welch_ci([t.score for t in gen], [t.score for t in base])
        embeddings = [t.embedding for t in served if t.kind is TrackKind.GENERATED]
        kinds = {x.listener_id: getattr(x, "kind", "unknown") for x in arm.listeners}
        reports = {lid: arm.deployment.rater_report(lid) for lid in kinds}
        flagged = {lid for lid, report in reports.items() if report is not None and report.flagged}
        spammers = {k for k, v in kinds.items() if v not in ("honest", "unknown")}
        versions = Counter(t.model_version for t in served if t.kind is TrackKind.GENERATED)
        status = arm.deployment.train_status()
        gate = status.last_gate_report
        return IterationRow(
            arm=arm.name,
            iteration=iteration,
            model_version=versions.most_common(1)[0][0] if versions else "",
            ratings_used=sum(t.ratings for t in served),
            mean_generated=float(np.mean([t.score for t in gen])) if gen else math.nan,
            mean_baseline=float(np.mean([t.score for t in base])) if base else math.nan,
            delta=delta,
            delta_lo=lo,
            delta_hi=hi,
            diversity=_mean_pairwise_distance(embeddings),
            spam_caught=len(flagged & spammers),
            spammers=len(spammers),
            false_alarms=len(flagged - spammers),
            hidden_generated=_nanmean([t.liking for t in served if t.kind is TrackKind.GENERATED]),
            hidden_baseline=_nanmean([t.liking for t in served if t.kind is TrackKind.BASELINE]),
            train_pairs=arm.pairs,
            gate=("—" if not gate.metric else ("pass" if gate.passed else "reject")),
            canary="—",
            seconds=seconds,
            session=session,
        )

    # 4. the release step -------------------------------------------------------------------------
    def _select(self, arm: _Arm, pair_budget: int = 0) -> tuple[str, Any]:
        """Close the session with a selection pass; returns the published training set's id
        ("" when none) and the trainer's status before it. Sets the arm's pair count."""
        before = arm.deployment.train_status()
        done = arm.deployment.run_selection(pair_budget)
        if not done.trainset.trainset_id:
            self.progress(f"[{arm.name}] selection: {done.outcome}; the model stays")
            arm.pairs = 0
            return "", before
        arm.pairs = int(done.trainset.pair_count)
        if pair_budget:
            why = f"drawn at random from {done.candidates} new generations"
        elif self.cfg.selection == "weighted":
            why = (
                f"every compared generation of {done.candidates}, weighted by rating "
                f"({done.survivors} above their input's mean"
                + ("; weights shuffled)" if arm.name == "control" else ")")
            )
        else:
            why = f"{done.survivors} of {done.candidates} generations beat their baseline"
        trainset = done.trainset.trainset_id
        self.progress(f"[{arm.name}] selection: {arm.pairs} pairs ({why}) → {trainset}")
        return trainset, before

    def _await_release(self, arm: _Arm, trainset: str, before: Any) -> None:
        """Wait for the trainer to publish or refuse the candidate of ``trainset``, then for
        the gateway to serve what it decided."""
        deadline = time.monotonic() + 3600
        while time.monotonic() < deadline:
            status = arm.deployment.train_status()
            idle = status.state in (0, 1)  # UNSPECIFIED, IDLE (trainer_service.proto)
            if (
                status.trainset_id == trainset
                and idle
                and (
                    list(status.versions) != list(before.versions) or status.last_gate_report.metric
                )
            ):
                self._wait_served(arm, status.current_version)
                gate = status.last_gate_report
                self.progress(
                    f"[{arm.name}] trainer: serving {status.current_version}; gate "
                    f"{'passed' if gate.passed else 'refused'} ({gate.summary})"
                )
                return
            time.sleep(1.0)
        raise TransientError(f"[{arm.name}] the trainer did not finish {trainset} within 1 h")

    def _release(self) -> None:
        """The release step of both fine-tuned arms: SELECTED's selection pass, CONTROL's with
        the same pair budget, then both trainers at once."""
        selected, control = self.arms["selected"], self.arms["control"]
        waits = [(selected, *self._select(selected))]
        if selected.pairs:
            # a random control draws as many pairs; a permuted one shuffles its own set's weights
            budget = selected.pairs if self.cfg.selection == "genetic" else 0
            waits.append((control, *self._select(control, budget)))
        else:
            control.pairs = 0
        self._at_once([(a, t, b) for a, t, b in waits if t], self._await_release)

    @staticmethod
    def _at_once(jobs: Sequence[tuple[Any, ...]], work: Callable[..., T]) -> list[T]:
        """``work(*job)`` for every job at the same time (the deployments are independent),
        results in order; the first failure is raised once all have ended."""
        if len(jobs) <= 1:
            return [work(*job) for job in jobs]
        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            futures = [pool.submit(work, *job) for job in jobs]
            return [f.result() for f in futures]

    def _wait_served(self, arm: _Arm, version: str) -> None:
        """Until the gateway names ``version`` current (the generators hot-swap on the same
        event)."""
        deadline = time.monotonic() + 300
        with arm.deployment.gateway("experimenter") as client:
            while time.monotonic() < deadline:
                if any(m.current and m.version == version for m in client.list_models()):
                    time.sleep(1.0)  # the generators' consumers read the same event
                    return
                time.sleep(0.5)
        raise TransientError(f"[{arm.name}] {version} was not served within 300 s")

    # 5. the run ----------------------------------------------------------------------------------
    def _session(
        self,
        arm: _Arm,
        label: str,
        iteration: int,
        merges: Sequence[tuple[int, int]],
        per_merge: int,
        per_listener: int,
    ) -> IterationRow:
        t0 = time.monotonic()
        tracks = self._request(arm, label, merges, per_merge)
        t_gen = time.monotonic() - t0
        heard = self._listen(arm, per_listener)
        served = self._served(arm, tracks)
        if label == "eval":
            arm.eval_tracks = served
        arm.audio.clear()  # this session's tracks leave the queue with it (≈ 0.5 MB each)
        row = self._row(
            arm, iteration, served, "eval" if label == "eval" else "train", time.monotonic() - t0
        )
        self.progress(
            f"[{arm.name}] {label}: {len(tracks)} tracks ({t_gen:.0f} s), {heard} listens, "
            f"model {row.model_version}, generated {row.mean_generated:.2f} vs baseline "
            f"{row.mean_baseline:.2f} (Δ {row.delta:+.2f} [{row.delta_lo:+.2f}, "
            f"{row.delta_hi:+.2f}]), spam caught {row.spam_caught}/{row.spammers} "
            f"({time.monotonic() - t0:.0f} s)"
        )
        return row

    def run(self) -> LoopResult:
        import torch

        cfg = self.cfg
        torch.set_num_threads(cfg.torch_threads)
        result = LoopResult(cfg)
        started = time.monotonic()
        try:
            for name, selection in self.arm_selections():
                t0 = time.monotonic()
                self.arms[name] = self._start(name, selection)
                self.progress(f"[{name}] six services up ({time.monotonic() - t0:.0f} s)")
            per = cfg.requests_per_merge
            for iteration in range(cfg.iterations + 1):
                label = f"it{iteration}"
                names = ["selected", "control"] + (["base"] if iteration == 0 else [])
                rows = self._at_once(
                    [
                        (
                            self.arms[name],
                            label,
                            iteration,
                            self.merges,
                            per,
                            cfg.ratings_per_listener,
                        )
                        for name in names
                    ],
                    self._session,
                )
                result.rows.extend(row for row in rows if row.arm != "base")
                if iteration < cfg.iterations:
                    t1 = time.monotonic()
                    self._release()
                    result.timings[f"release-{iteration + 1}"] = time.monotonic() - t1
            if cfg.eval_merges > 0:
                names = ["base", "selected", "control"]
                result.rows.extend(
                    self._at_once(
                        [
                            (
                                self.arms[name],
                                "eval",
                                cfg.iterations if name != "base" else 0,
                                self.eval_merges,
                                cfg.eval_requests_per_merge,
                                cfg.eval_ratings_per_listener,
                            )
                            for name in names
                        ],
                        self._session,
                    )
                )
            for name, arm in self.arms.items():
                result.eval_tracks.extend(
                    {
                        "arm": name,
                        "request_key": t.request_key,
                        "kind": t.kind.value,
                        "input_key": t.input_key,
                        "model_version": t.model_version,
                        "score": t.score,
                        "ratings": t.ratings,
                        "liking": t.liking,
                    }
                    for t in arm.eval_tracks
                )
                if arm.refused:
                    reasons = "; ".join(f"{why} ×{k}" for why, k in arm.refused.most_common(3))
                    self.progress(f"[{name}] refused listener answers or retried calls: {reasons}")
        finally:
            for arm in self.arms.values():
                arm.deployment.stop()
        result.timings["total"] = time.monotonic() - started
        return result


def _hidden_liking(honest: Sequence[Listener], audio: np.ndarray) -> float:
    """Mean true liking u of the honest listeners for a track (the column the services never
    see): ``utility(audio, rate)`` where a population offers it, else ``liking(features)``."""
    values: list[float] = []
    features = None
    space = getattr(honest[0], "space", None) if honest else None
    if space is not None and hasattr(space, "liking"):
        # a random-taste population: its seed's direction d, shared by its listeners (each
        # jittered around it), from one embedding of the track instead of one per listener
        return float(space.liking(audio, SAMPLE_RATE))
    for listener in honest:
        if hasattr(listener, "utility"):
            values.append(float(listener.utility(audio, SAMPLE_RATE)))
        elif hasattr(listener, "liking"):
            features = features or audio_features(audio, SAMPLE_RATE)
            values.append(float(listener.liking(features)))
    return float(np.mean(values)) if values else math.nan


def _decode(wav: bytes) -> np.ndarray:
    import soundfile

    data, rate = soundfile.read(io.BytesIO(wav), dtype="float32", always_2d=True)
    if rate != SAMPLE_RATE:
        raise ValidationError(f"a track came at {rate} Hz, not {SAMPLE_RATE}")
    return data[:, 0]


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def _mean_pairwise_distance(embeddings: Sequence[np.ndarray]) -> float:
    rows = [e for e in embeddings if e.size]
    if len(rows) < 2 or len({e.size for e in rows}) != 1:
        return math.nan
    e = np.stack(rows)
    d = np.sqrt(((e[:, None, :] - e[None, :, :]) ** 2).sum(-1))
    return float(d[np.triu_indices(len(e), 1)].mean())
