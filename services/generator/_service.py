"""The generator: generation requests → tracks (design.md §3), with model hot-swap.

Per request (generation.requested.v1 or the Generate RPC):

1. ``Dispatcher.dispatch`` (riffloop.loop) draws the kind blindly: Bernoulli(0.25) → the
   baseline z0, else a generation ẑ; the track id and seed are pure functions of the request id.
2. The request runs on one model version V (the current one, or a canary's candidate for its
   share). The inputs' latents are the encoder's ``LatentRecord``s *inverted by V* (one window
   per song, picked by the seed; the encoder stores them when a song is uploaded or V is
   published, and a request waits ``latent_wait_s`` for them); ``merge_latents`` gives z_agg.
3. Generation: x̂_0 = ``decode_latents``(z_agg), then ``inject_at_step`` with the
   ``InjectionPlan`` of (s, q). Baseline: z0 = argmax_{z ∈ Z_V} Γ(z_agg, z) over V's training
   index (``riffloop.music.TrainingIndex``, stored with V's checkpoint and loaded with it, so it
   hot-swaps with the model, canary included): the base-corpus windows and the generations
   kept for training, or the generation that replaced the input's baseline. Never an upload.
   A baseline is served as-is from the index's stored mel window.
4. Griffin-Lim (``MelCodec.images_to_audio``) → WAV at ``tracks/<track_id>.wav``, provenance
   (+ the per-mel-bin mean of the image as the selector's embedding) at
   ``tracks/<track_id>.json``, then tracks.ready.v1.

model.published.v1 → PROMOTE / ROLLBACK: ``ServedModel.serve_only`` (the new version loads aside
and the reference is swapped under a lock, so in-flight requests finish on the old model);
CANARY: ``ServedModel.start_canary`` loads the candidate beside the current model and routes its
share of requests (hash of the request id) to it until the PROMOTE or ROLLBACK that ends it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import threading
import time
from typing import Any

from riffloop.core import ConfigurationError, NotFoundError, TransientError, ValidationError
from riffloop.loop import Dispatcher, ReadyDelay, TrackKind
from riffloop.runtime import (
    LATENTS_BUCKET,
    DispatchKeyed,
    LatentRecord,
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
class GeneratorSettings(DispatchKeyed):
    service_name: str = "generator"
    grpc_port: int = 50053
    metrics_port: int = 9103
    baseline_share: float = 0.25
    default_quality: int = 50
    max_quality: int = 1000
    # How long a request waits for its songs' latents (the encoder may still be working).
    latent_wait_s: float = 60.0
    torch_threads: int = 1
    # Track length when a request asks for 0 s, and the longest it may ask for
    # (riffloop.music.TrackLength: overlapping windows, each continuing the last one's tail).
    default_track_seconds: float = 5.9
    max_track_seconds: float = 60.0

    def _validate(self) -> None:
        super()._validate()
        if not 0.0 <= self.baseline_share <= 1.0:
            raise ConfigurationError("RIFFLOOP_BASELINE_SHARE must lie in [0, 1]")
        if not 1 <= self.default_quality <= self.max_quality <= 1000:
            raise ConfigurationError("need 1 ≤ RIFFLOOP_DEFAULT_QUALITY ≤ _MAX_QUALITY ≤ 1000")
        if self.latent_wait_s < 0 or self.torch_threads < 1:
            raise ConfigurationError("RIFFLOOP_LATENT_WAIT_S ≥ 0, RIFFLOOP_TORCH_THREADS ≥ 1")
        if not 0 < self.default_track_seconds <= self.max_track_seconds <= 600:
            raise ConfigurationError(
                "need 0 < RIFFLOOP_DEFAULT_TRACK_SECONDS ≤ RIFFLOOP_MAX_TRACK_SECONDS ≤ 600"
            )


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
                    raise TransientError(
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

    # -- one track ----------------------------------------------------------------------------

    def make_track(self, request: Request) -> events_pb2.TrackReady:
        import soundfile
        import torch

        from riffloop.music import (
            InjectionPlan,
            MelCodec,
            TrackLength,
            baseline_track,
            decode_latents,
            generate_long,
            merge_latents,
            to_uint8,
            track_noise,
        )

        request = validate_request(self.settings, request)
        plan = InjectionPlan.from_similarity(request.similarity, request.quality)
        started = time.perf_counter()
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
        records = [
            self._record(s, model.version, self.settings.latent_wait_s) for s in request.song_ids
        ]
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

        def generate() -> Any:
            # window 0 injected from x̂_0(z_agg) with ε_0 (the seed's first draw), each later
            # window continuing the previous one's tail with ε_k (riffloop.music.generate_long)
            with self._compute:
                merged = decode_latents(model, z_agg[None], records[0].inversion_steps)
                noise = track_noise(tuple(model.image_shape), length.windows, seed)[None]
                return generate_long(model, merged, plan, length, noise, top_db=model.mel.top_db)

        # Blindness in time (riffloop.loop.ReadyDelay): a baseline is held until a duration
        # drawn from recent generations of the same cost (steps run per window, windows) has
        # passed; with none timed yet, the generation is run anyway and discarded.
        cost = (plan.total_steps - plan.start_step, length.windows)
        hold: float | None = None
        if prov.kind is TrackKind.BASELINE:
            # the stored training windows from z0 on, joined like a generation: same frames,
            # same WAV size (riffloop.music.baseline_track)
            index = model.baseline_index
            image = baseline_track(
                index.ids, index.images, chosen["pick"].row, length, model.mel.top_db
            )
            hold = self.ready_delay.draw(cost)
            if hold is None:
                generate()
        else:
            image = generate()
        with self._compute:
            audio = MelCodec(model.mel).track_to_audio(image[0])
        wav = io.BytesIO()
        soundfile.write(wav, audio, model.mel.sample_rate, format="WAV", subtype="PCM_16")
        duration = len(audio) / model.mel.sample_rate
        audio_ref = self.ports.objects.put(
            "tracks", f"{prov.track_id}.wav", wav.getvalue(), content_type="audio/wav"
        )
        sidecar = {
            "provenance": json.loads(prov.to_json()),
            "request_id": request.request_id,
            "user_id": request.user_id,
            "clip_seconds": duration,
            "total_steps": plan.total_steps,
            "windows": length.windows,
            "embedding": [float(v) for v in image[0, 0].mean(dim=-1)],
            # The track's first window (8-bit), the trainer's target when it is selected.
            "image_uint8": to_uint8(image[..., : model.mel.x_res])[0, 0].tolist(),
        }
        self.ports.objects.put(
            "tracks",
            f"{prov.track_id}.json",
            json.dumps(sidecar).encode(),
            content_type="application/json",
        )
        elapsed = time.perf_counter() - started
        if prov.kind is TrackKind.GENERATED:
            self.ready_delay.record(cost, elapsed)
        elif hold is not None and hold > elapsed:
            time.sleep(hold - elapsed)  # (no CPU: the compute lock is free meanwhile)
        ready = events_pb2.TrackReady(
            track_id=prov.track_id,
            audio=audio_ref.to_proto(),
            provenance=provenance_to_proto(
                prov, request_id=request.request_id, total_steps=plan.total_steps
            ),
            user_id=request.user_id,
            duration_seconds=duration,
        )
        self.ports.publish("tracks.ready.v1", prov.track_id, ready)
        metrics.TRACKS_GENERATED.labels(str(prov.kind)).inc()
        metrics.GENERATION_SECONDS.observe(time.perf_counter() - started)
        return ready

    # -- events -------------------------------------------------------------------------------

    def on_generation_requested(self, envelope: events_pb2.Envelope) -> None:
        event = envelope.generation_requested
        self.make_track(
            Request(
                request_id=event.request_id,
                song_ids=tuple(event.song_ids),
                similarity=event.similarity,
                quality=event.quality,
                seed=event.seed,
                user_id=event.user_id,
                duration_seconds=event.duration_seconds,
            )
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
