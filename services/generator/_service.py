"""The generator: generation requests → tracks (design.md §3), with model hot-swap.

The consumer hands over the generation.requested.v1 records of one poll together (up to
``generation_batch``); the Generate RPC is a batch of one. Per request:

1. ``Dispatcher.dispatch`` (riffloop.loop) draws the kind blindly: Bernoulli(0.25) → the
   baseline z0, else a generation ẑ; the track id and seed are pure functions of the request id.
2. The request runs on one model version V (the current one, or a canary's candidate for its
   share). The inputs' latents are the encoder's ``LatentRecord``s *inverted by V* (one window
   per song, picked by the seed; the encoder stores them when a song is uploaded or V is
   published, and a request waits ``latent_wait_s`` for them); ``merge_latents`` gives z_agg.
3. Generation: x̂_0 = ``decode_latents``(z_agg), then ``generate_long`` (injection with the
   ``InjectionPlan`` of (s, q), window after window), batched: the requests of one (model
   version, plan, length) share one call of each per chunk of ``generation_batch``, each with
   its own seed's noise ε_k, so a track does not depend on its batch-mates. Baseline:
   z0 = argmax_{z ∈ Z_V} Γ(z_agg, z) over V's training index (``riffloop.music.TrainingIndex``,
   stored with V's checkpoint and loaded with it, so it hot-swaps with the model, canary
   included): the base-corpus windows and the generations kept for training, or the
   generation that replaced the input's baseline. Never an upload. A baseline is served as-is
   from the index's stored mel windows, published with its chunk's generations.
4. Griffin-Lim (``MelCodec.track_to_audio``, one track at a time) → WAV at
   ``tracks/<track_id>.wav``, provenance (+ the per-mel-bin mean of the image as the selector's
   embedding) at ``tracks/<track_id>.json``, then tracks.ready.v1.

model.published.v1 → PROMOTE / ROLLBACK: ``ServedModel.serve_only`` (the new version loads aside
and the reference is swapped under a lock, so in-flight requests finish on the old model);
CANARY: ``ServedModel.start_canary`` loads the candidate beside the current model and routes its
share of requests (hash of the request id) to it until the PROMOTE or ROLLBACK that ends it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from riffloop.core import (
    BatchResult,
    ConfigurationError,
    NotFoundError,
    TransientError,
    ValidationError,
    handling,
)
from riffloop.loop import Dispatcher, ReadyDelay, TrackKind
from riffloop.runtime import (
    LATENTS_BUCKET,
    DispatchKeyed,
    LatentRecord,
    OperatorGuarded,
    ServedModel,
    metrics,
    provenance_to_proto,
)
from riffloop.v1 import common_pb2, events_pb2
from riffloop.v1 import generator_service_pb2 as pb
from riffloop.v1 import generator_service_pb2_grpc as pb_grpc

_log = logging.getLogger("riffloop.generator")
_SONG_ID_CHARS = set("0123456789abcdef")


@dataclasses.dataclass(frozen=True, repr=False)
class GeneratorSettings(DispatchKeyed, OperatorGuarded):
    service_name: str = "generator"
    grpc_port: int = 50053
    metrics_port: int = 9103
    baseline_share: float = 0.25
    default_quality: int = 50
    max_quality: int = 1000
    # How long a request waits for its songs' latents (the encoder may still be working; each
    # of the consumer's 3 attempts waits this long before the request is dead-lettered). The
    # requests of one poll that wait share this one deadline, after the ready ones ran. 60 s
    # failed requests of a process stack on a busy 2-core machine, where inverting one 8 s
    # upload took over 3 min.
    latent_wait_s: float = 300.0
    torch_threads: int = 1
    # Track length when a request asks for 0 s, and the longest it may ask for
    # (riffloop.music.TrackLength: overlapping windows, each continuing the last one's tail).
    default_track_seconds: float = 5.9
    max_track_seconds: float = 60.0
    # Requests of one (model version, plan, length) denoised in one UNet batch, and the most
    # generation.requested.v1 records the consumer hands over together.
    generation_batch: int = 16
    # A batch is generated in the consumer thread between two polls. Under load (three process
    # stacks on two cores) 6–16 tracks of 5.94 s took longer than Kafka's default 5 min bound:
    # the broker took the partition away mid-batch, the commit failed and the batch was redone.
    # 30 min, as the trainer; a crashed generator is still noticed by the 10 s session timeout.
    kafka_max_poll_interval_s: float = 1800.0

    def _validate(self) -> None:
        super()._validate()
        if not 0.0 <= self.baseline_share <= 1.0:
            raise ConfigurationError("RIFFLOOP_BASELINE_SHARE must lie in [0, 1]")
        if not 1 <= self.default_quality <= self.max_quality <= 1000:
            raise ConfigurationError("need 1 ≤ RIFFLOOP_DEFAULT_QUALITY ≤ _MAX_QUALITY ≤ 1000")
        if self.latent_wait_s < 0 or self.torch_threads < 1:
            raise ConfigurationError("RIFFLOOP_LATENT_WAIT_S ≥ 0, RIFFLOOP_TORCH_THREADS ≥ 1")
        if not 1 <= self.generation_batch <= 256:
            raise ConfigurationError(
                f"RIFFLOOP_GENERATION_BATCH must lie in [1, 256], got {self.generation_batch}"
            )
        if not 0 < self.default_track_seconds <= self.max_track_seconds <= 600:
            raise ConfigurationError(
                "need 0 < RIFFLOOP_DEFAULT_TRACK_SECONDS ≤ RIFFLOOP_MAX_TRACK_SECONDS ≤ 600"
            )


class LatentsNotReady(TransientError):
    """A request's songs have no latents for its model version yet (the encoder is still
    inverting them): retried, and dead-lettered after the consumer's attempts."""


@dataclasses.dataclass(frozen=True)
class Request:
    request_id: str
    song_ids: tuple[str, ...]
    similarity: float
    quality: int
    seed: int
    user_id: str
    kind: TrackKind | None = None  # None: the dispatcher draws it
    duration_seconds: float = 0.0  # 0: the default track length


def validate_request(settings: GeneratorSettings, request: Request) -> Request:
    if not 1 <= len(request.song_ids) <= 3:
        raise ValidationError(f"song_ids must name 1 to 3 songs, got {len(request.song_ids)}")
    for song_id in request.song_ids:
        if len(song_id) != 64 or not set(song_id) <= _SONG_ID_CHARS:
            raise ValidationError(f"song id {song_id[:80]!r} is not a 64-hex sha256")
    s = request.similarity
    if not (s == s and 0.0 <= s < 1.0):
        raise ValidationError(f"similarity must lie in [0, 1), got {s!r}")
    q = request.quality or settings.default_quality
    if not 1 <= q <= settings.max_quality:
        raise ValidationError(f"quality must lie in 1–{settings.max_quality}, got {q}")
    return dataclasses.replace(request, quality=q)


@dataclasses.dataclass(frozen=True)
class _Job:
    """One prepared request of a batch: its model version, plan, length, z_agg and draw."""

    index: int  # position in the batch
    request: Request
    context: Callable[[], contextlib.AbstractContextManager[None]]
    started: float  # perf_counter when its preparation began
    model: Any
    plan: Any  # riffloop.music.InjectionPlan
    length: Any  # riffloop.music.TrackLength
    inversion_steps: int
    seed: int
    z_agg: Any  # [C, h, w]
    prov: Any  # riffloop.loop.TrackProvenance
    baseline_row: int  # z0's row in the version's training index


class Generator:
    def __init__(self, settings: GeneratorSettings, ports: Any, model: ServedModel) -> None:
        self.settings = settings
        self.ports = ports
        self.model = model
        self.dispatcher = Dispatcher(settings.baseline_share, key=settings.effective_dispatch_key())
        # (song, version) → that version's latents of the song (riffloop.runtime.LatentRecord)
        self._records: dict[tuple[str, str], LatentRecord] = {}
        self._records_lock = threading.Lock()
        self._compute = threading.Lock()  # one generation at a time: 2 shared cores
        self.ready_delay = ReadyDelay()  # baselines ready after generations' delays

    # -- latents ------------------------------------------------------------------------------

    def _record(self, song_id: str, version: str, wait_s: float) -> LatentRecord:
        """The song's latents inverted by ``version`` (the version serving the request). The
        encoder owns inversion and stores them when the song is uploaded or the version is
        published; until then this waits up to ``wait_s``."""
        with self._records_lock:
            cached = self._records.get((song_id, version))
        if cached is not None:
            return cached
        objects = self.ports.objects
        deadline = time.monotonic() + wait_s
        while True:
            try:
                record = LatentRecord.from_bytes(
                    objects.get(LATENTS_BUCKET, LatentRecord.version_key(song_id, version))
                )
                break
            except NotFoundError:
                if not objects.exists("songs", song_id):
                    raise NotFoundError(f"song {song_id} was never uploaded") from None
                if time.monotonic() >= deadline:
                    raise LatentsNotReady(
                        f"song {song_id} has no latents for model {version} yet"
                    ) from None
                time.sleep(0.5)
        if record.model_version != version:
            raise ValidationError(f"latents of {song_id} stored for {version} name another model")
        with self._records_lock:
            self._records[(song_id, version)] = record
        return record

    def forget_unserved(self) -> None:
        """Drop cached latents of versions no longer served (after a swap or a canary's end)."""
        model = self.model.model
        served = {model.version} if model is not None else set()
        if (canary := self.model.canary_version) is not None:
            served.add(canary)
        with self._records_lock:
            for key in [k for k in self._records if k[1] not in served]:
                del self._records[key]

    # -- tracks -------------------------------------------------------------------------------

    def make_track(self, request: Request) -> events_pb2.TrackReady:
        """One request (the Generate RPC, tools): :meth:`make_tracks` of one; raises its error."""
        [result] = self.make_tracks([request])
        if isinstance(result, BaseException):
            raise result
        return result

    def make_tracks(
        self,
        requests: Sequence[Request],
        envelopes: Sequence[events_pb2.Envelope] | None = None,
    ) -> list[events_pb2.TrackReady | Exception]:
        """Each request's TrackReady, or the error that stopped it alone, in order.

        1. Each request is prepared on its own (validation, model version, z_agg, the blind
           draw): an invalid one fails alone. A request whose songs have no latents yet is put
           off, and the others run first; then the put-off ones wait for their latents until
           ``latent_wait_s`` after the call began, one deadline for them all (a request still
           without latents then fails alone, TransientError, and the consumer retries it).
        2. Requests are grouped by (model version object, InjectionPlan, TrackLength, inversion
           steps) and each group runs in chunks of at most ``generation_batch`` requests in
           request order: one ``decode_latents`` and one ``generate_long`` for the chunk's
           generations, each with its own seed's noise ε_0 … ε_{n−1} (``track_noise``), so a
           track does not depend on its batch-mates.
        3. A chunk's tracks are published together (see :meth:`_run_chunk` for the baselines).

        ``envelopes`` (one per request) make each request's event current while its work runs,
        so its logs and its tracks.ready.v1 carry its correlation id.
        """
        if envelopes is not None and len(envelopes) != len(requests):
            raise ValidationError("one envelope per request expected")
        results: list[events_pb2.TrackReady | Exception | None] = [None] * len(requests)
        deadline = time.monotonic() + self.settings.latent_wait_s
        put_off = self._prepare_and_run(requests, range(len(requests)), envelopes, results, None)
        if put_off:  # the requests whose latents were not there yet, now that the rest are done
            self._prepare_and_run(requests, put_off, envelopes, results, deadline)
        missing = [i for i, r in enumerate(results) if r is None]
        assert not missing, missing  # every request was prepared or failed, then run
        return [r for r in results if r is not None]

    def _prepare_and_run(
        self,
        requests: Sequence[Request],
        indices: Sequence[int],
        envelopes: Sequence[events_pb2.Envelope] | None,
        results: list[events_pb2.TrackReady | Exception | None],
        deadline: float | None,
    ) -> list[int]:
        """Prepare ``requests[indices]`` and run them in chunks of their group, filling
        ``results``. ``deadline`` None: a request without latents is not waited for but put
        off (its index returned); else each waits for its latents until ``deadline``."""
        groups: dict[tuple[Any, ...], list[_Job]] = {}
        put_off: list[int] = []
        for i in indices:
            context = _context(envelopes, i)
            wait_s = 0.0 if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                with context():
                    job = self._prepare(i, requests[i], context, wait_s)
            except LatentsNotReady as exc:
                if deadline is None:
                    put_off.append(i)
                else:
                    results[i] = exc
                continue
            except Exception as exc:
                results[i] = exc
                continue
            key = (id(job.model), job.plan, job.length, job.inversion_steps)
            groups.setdefault(key, []).append(job)
        size = self.settings.generation_batch
        for jobs in groups.values():
            for first in range(0, len(jobs), size):
                chunk = jobs[first : first + size]
                for job, result in zip(chunk, self._run_chunk(chunk), strict=True):
                    results[job.index] = result
        return put_off

    def _prepare(
        self, index: int, request: Request, context: Callable[[], Any], wait_s: float
    ) -> _Job:
        """Validate one request, pick its model version and z_agg, draw its kind; its songs'
        latents are waited for up to ``wait_s`` (LatentsNotReady after that)."""
        import torch

        from riffloop.music import InjectionPlan, TrackLength, merge_latents

        started = time.perf_counter()
        request = validate_request(self.settings, request)
        plan = InjectionPlan.from_similarity(request.similarity, request.quality)
        # This request keeps this reference through a hot swap; during a canary its request id
        # decides between the candidate and the current model.
        model = self.model.for_request(request.request_id)
        # n overlapping windows of the model's mel config covering the requested seconds
        length = TrackLength.for_seconds(
            request.duration_seconds,
            model.mel,
            default=self.settings.default_track_seconds,
            maximum=self.settings.max_track_seconds,
        )
        records = [self._record(s, model.version, wait_s) for s in request.song_ids]
        steps = {int(r.inversion_steps) for r in records}
        if len(steps) != 1:
            raise ValidationError(f"the inputs' latents were inverted with {sorted(steps)} steps")
        seed = request.seed or self.dispatcher.generation_seed_for(request.request_id)
        picks = [seed % int(r.latents.shape[0]) for r in records]
        z = torch.stack([r.latents[i] for r, i in zip(records, picks, strict=True)])
        z_agg = merge_latents(z)
        chosen: dict[str, Any] = {}

        def nearest_baseline() -> str:
            # z0 = argmax_{z ∈ Z_V} Γ(z_agg, z), Z_V the training index of the version V serving
            # this request (its base-corpus windows and the generations kept for training, all
            # inverted by V; never an upload), or the generation that replaced the input's
            # baseline (the genetic step): riffloop.music.TrainingIndex.baseline_for.
            index = model.baseline_index
            if index is None:
                raise TransientError(f"model {model.version} has no baseline index")
            pick = index.baseline_for("+".join(sorted(request.song_ids)), z_agg)
            chosen["pick"] = pick
            return str(pick.id)

        prov = self.dispatcher.dispatch(
            request.request_id,
            request.song_ids,
            request.similarity,
            request.quality,
            model.version,
            plan.start_step,
            nearest_baseline,
        )
        if request.kind is not None and request.kind is not prov.kind:
            prov = dataclasses.replace(
                prov,
                kind=request.kind,
                start_step=plan.start_step if request.kind is TrackKind.GENERATED else None,
            )
        prov = dataclasses.replace(prov, seed=seed)
        return _Job(
            index,
            request,
            context,
            started,
            model,
            plan,
            length,
            steps.pop(),
            seed,
            z_agg,
            prov,
            chosen["pick"].row,
        )

    def _generate(self, jobs: Sequence[_Job]) -> Any:
        """Long images ``[B, 1, H, T]`` of one group's ``jobs``: window 0 injected from
        x̂_0(z_agg) with ε_0 (each request's seed's first draw), each later window continuing
        the previous one's tail with ε_k (riffloop.music.generate_long), one batch for all."""
        import torch

        from riffloop.music import decode_latents, generate_long, track_noise

        model, plan, length = jobs[0].model, jobs[0].plan, jobs[0].length
        z_agg = torch.stack([job.z_agg for job in jobs])
        noise = torch.stack(
            [track_noise(tuple(model.image_shape), length.windows, job.seed) for job in jobs]
        )
        with self._compute:
            merged = decode_latents(model, z_agg, jobs[0].inversion_steps)
            return generate_long(
                model, merged, plan, length, noise, top_db=model.mel.top_db, batch_size=len(jobs)
            )

    def _run_chunk(self, chunk: Sequence[_Job]) -> list[events_pb2.TrackReady | Exception]:
        """Make, store and publish one chunk's tracks (one group: same model, plan, length).

        Blindness in time (riffloop.loop.ReadyDelay): every track of a chunk is published at
        the same moment, so a baseline in a chunk with generations takes exactly as long as
        they do. A chunk of baselines alone is held for a duration drawn from recent chunks of
        the same cost — denoising steps per window, windows, and the chunk's size in requests
        (both kinds) — so a lone baseline waits as long as a lone generation, and a chunk of k
        baselines as long as k requests of that cost took together (not k × a per-request
        share of a batch, which would make a lone baseline fast). With no such chunk timed
        yet, the generations are run anyway and discarded, which times the first one.
        """
        from riffloop.music import MelCodec, baseline_track

        started = time.perf_counter()
        model, plan, length = chunk[0].model, chunk[0].plan, chunk[0].length
        cost = (plan.total_steps - plan.start_step, length.windows, len(chunk))
        generated = [job for job in chunk if job.prov.kind is TrackKind.GENERATED]
        images: dict[int, Any] = {}
        hold: float | None = None
        try:
            if generated:
                for job, image in zip(generated, self._generate(generated), strict=True):
                    images[job.index] = image[None]
            else:
                hold = self.ready_delay.draw(cost)
                if hold is None:
                    self._generate(chunk)
        except Exception as exc:  # the chunk's one computation: every request of it failed
            return [exc] * len(chunk)
        results: dict[int, events_pb2.TrackReady | Exception] = {}
        codec = MelCodec(model.mel)
        for job in chunk:
            try:
                with job.context():
                    if job.index not in images:
                        # the stored training windows from z0 on, joined like a generation:
                        # same frames, same WAV size (riffloop.music.baseline_track)
                        index = model.baseline_index
                        images[job.index] = baseline_track(
                            index.ids, index.images, job.baseline_row, length, model.mel.top_db
                        )
                    results[job.index] = self._store(job, images[job.index], codec)
            except Exception as exc:
                results[job.index] = exc
        elapsed = time.perf_counter() - started
        if generated or hold is None:
            self.ready_delay.record(cost, elapsed)
        elif hold > elapsed:
            time.sleep(hold - elapsed)  # (no CPU: the compute lock is free meanwhile)
        for job in chunk:
            ready = results[job.index]
            if isinstance(ready, Exception):
                continue
            try:
                with job.context():
                    self.ports.publish("tracks.ready.v1", job.prov.track_id, ready)
            except Exception as exc:
                results[job.index] = exc
                continue
            metrics.TRACKS_GENERATED.labels(str(job.prov.kind)).inc()
            metrics.GENERATION_SECONDS.observe(time.perf_counter() - job.started)
        return [results[job.index] for job in chunk]

    def _store(self, job: _Job, image: Any, codec: Any) -> events_pb2.TrackReady:
        """Griffin-Lim of one long image ``[1, 1, H, T]`` (one track at a time: the phases are
        seeded per image, so a track's audio does not depend on its batch-mates) → WAV and the
        provenance sidecar in ``tracks``; the TrackReady to publish."""
        import soundfile

        from riffloop.music import grid_to_npy, to_uint8

        model, prov, request = job.model, job.prov, job.request
        with self._compute:
            audio = codec.track_to_audio(image[0])
        wav = io.BytesIO()
        soundfile.write(wav, audio, model.mel.sample_rate, format="WAV", subtype="PCM_16")
        duration = len(audio) / model.mel.sample_rate
        audio_ref = self.ports.objects.put(
            "tracks", f"{prov.track_id}.wav", wav.getvalue(), content_type="audio/wav"
        )
        # The whole mel image the listener heard (8-bit [H, T], .npy), for a trainer that learns
        # from every window of a kept track (RIFFLOOP_TRAIN_WINDOWS=all, ReleaseCycle)
        mel_key = f"{prov.track_id}.mel.npy"
        grid = to_uint8(image)[0, 0]
        self.ports.objects.put(
            "tracks", mel_key, grid_to_npy(grid), content_type="application/octet-stream"
        )
        sidecar = {
            "provenance": json.loads(prov.to_json()),
            "request_id": request.request_id,
            "user_id": request.user_id,
            "clip_seconds": duration,
            "total_steps": job.plan.total_steps,
            "windows": job.length.windows,
            "window_overlap": job.length.overlap,
            "mel_key": mel_key,
            "embedding": [float(v) for v in image[0, 0].mean(dim=-1)],
            # The track's first window (8-bit), the trainer's target when it is selected.
            "image_uint8": grid[:, : model.mel.x_res].tolist(),
        }
        self.ports.objects.put(
            "tracks",
            f"{prov.track_id}.json",
            json.dumps(sidecar).encode(),
            content_type="application/json",
        )
        return events_pb2.TrackReady(
            track_id=prov.track_id,
            audio=audio_ref.to_proto(),
            provenance=provenance_to_proto(
                prov, request_id=request.request_id, total_steps=job.plan.total_steps
            ),
            user_id=request.user_id,
            duration_seconds=duration,
        )

    # -- events -------------------------------------------------------------------------------

    def on_generation_requests(self, envelopes: Sequence[events_pb2.Envelope]) -> BatchResult:
        """generation.requested.v1, the records of one poll together (:meth:`make_tracks`); the
        consumer retries or dead-letters each failed request alone, with its own error."""
        results = self.make_tracks([_request_of(e) for e in envelopes], envelopes)
        return BatchResult(
            {
                str(e.event_id): result
                for e, result in zip(envelopes, results, strict=True)
                if isinstance(result, Exception)
            }
        )

    def on_model_published(self, envelope: events_pb2.Envelope) -> None:
        event = envelope.model_published
        if event.action == common_pb2.MODEL_ACTION_UNSPECIFIED:
            raise ValidationError(f"model.published for {event.version} names no action")
        if event.action == common_pb2.MODEL_ACTION_CANARY:
            if not 0.0 < event.canary_share < 1.0:
                raise ValidationError(
                    f"canary for {event.version} needs a share in (0, 1), got {event.canary_share}"
                )
            marker = self.model.store.canary()
            if marker is None or marker.get("version") != event.version:
                # a canary that has ended since (a replay after a restart): its decision
                # follows in the topic, which is one partition, and the marker is gone
                _log.info("stale canary event skipped", extra={"model_version": event.version})
                return
            self.model.start_canary(event.version, event.canary_share)
            self.model.drop_ended_canary()  # decided while the candidate loaded
            return
        # PROMOTE or ROLLBACK: serve what models/CURRENT names now (the trainer writes it
        # before it announces), not the event's version, which a late or replayed event names
        self.model.load_current()
        self.forget_unserved()


def _request_of(envelope: events_pb2.Envelope) -> Request:
    event = envelope.generation_requested
    return Request(
        request_id=event.request_id,
        song_ids=tuple(event.song_ids),
        similarity=event.similarity,
        quality=event.quality,
        seed=event.seed,
        user_id=event.user_id,
        duration_seconds=event.duration_seconds,
    )


def _context(
    envelopes: Sequence[events_pb2.Envelope] | None, i: int
) -> Callable[[], contextlib.AbstractContextManager[None]]:
    """Request i's event made current (its ids in logs and events), or nothing (an RPC)."""
    if envelopes is None:
        return contextlib.nullcontext
    envelope = envelopes[i]
    return lambda: handling(envelope)


class GeneratorServicer(pb_grpc.GeneratorServiceServicer):
    def __init__(self, generator: Generator) -> None:
        self.generator = generator

    def Generate(self, request: pb.GeneratorServiceGenerateRequest, context: Any) -> Any:
        kinds = {
            common_pb2.TRACK_KIND_UNSPECIFIED: None,
            common_pb2.TRACK_KIND_GENERATED: TrackKind.GENERATED,
            common_pb2.TRACK_KIND_BASELINE: TrackKind.BASELINE,
        }
        if request.kind not in kinds:
            raise ValidationError(f"unknown track kind {request.kind}")
        if request.seed < 0:
            raise ValidationError("seed must not be negative")
        import uuid

        ready = self.generator.make_track(
            Request(
                request_id=uuid.uuid4().hex,
                song_ids=tuple(request.song_ids),
                similarity=request.similarity,
                quality=request.quality,
                seed=request.seed,
                user_id=request.user_id or "tool",
                kind=kinds[request.kind],
                duration_seconds=request.duration_seconds,
            )
        )
        return pb.GeneratorServiceGenerateResponse(
            track_id=ready.track_id,
            audio=ready.audio,
            provenance=ready.provenance,
            duration_seconds=ready.duration_seconds,
        )

    def CurrentModel(self, request: Any, context: Any) -> pb.CurrentModelResponse:
        served = self.generator.model
        model = served.get()
        response = pb.CurrentModelResponse(
            version=model.version,
            parent_version=model.parent or "",
            checkpoint=served.store.checkpoint_ref(model.version).to_proto(),
            parameter_count=int(model.num_parameters()),
        )
        response.loaded_at.FromNanoseconds(int(served.loaded_at * 1e9))
        with served.lock:
            canary = served.canary
        if canary is not None:
            router, candidate = canary
            response.canary_version, response.canary_share = candidate.version, router.share
        return response
