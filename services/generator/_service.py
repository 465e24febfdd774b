"""The generator: generation requests → tracks (design.md §3), with model hot-swap.

Per request (generation.requested.v1 or the Generate RPC):

1. ``Dispatcher.dispatch`` (riffloop.loop) draws the kind blindly: Bernoulli(0.25) → the
   baseline z0, else a generation ẑ; the track id and seed are pure functions of the request id.
2. The inputs' latents come from the encoder's ``LatentRecord``s (one window per song, picked by
   the seed); ``merge_latents`` gives z_agg.
3. Generation: x̂_0 = ``decode_latents``(z_agg), then ``inject_at_step`` with the
   ``InjectionPlan`` of (s, q). Baseline: z0 = argmax_z Γ(z_agg, z) over the windows of the other
   encoded songs (Γ = cosine similarity of latents, ``riffloop.music.BaselineIndex``, extended as
   songs are encoded), served as-is from its stored mel window.
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
from riffloop.loop import Dispatcher, TrackKind
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

    def _validate(self) -> None:
        super()._validate()
        if not 0.0 <= self.baseline_share <= 1.0:
            raise ConfigurationError("RIFFLOOP_BASELINE_SHARE must lie in [0, 1]")
        if not 1 <= self.default_quality <= self.max_quality <= 1000:
            raise ConfigurationError("need 1 ≤ RIFFLOOP_DEFAULT_QUALITY ≤ _MAX_QUALITY ≤ 1000")
        if self.latent_wait_s < 0 or self.torch_threads < 1:
            raise ConfigurationError("RIFFLOOP_LATENT_WAIT_S ≥ 0, RIFFLOOP_TORCH_THREADS ≥ 1")


@dataclasses.dataclass(frozen=True)
class Request:
    request_id: str
    song_ids: tuple[str, ...]
    similarity: float
    quality: int
    seed: int
    user_id: str
    kind: TrackKind | None = None  # None: the dispatcher draws it


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
        self._records: dict[str, LatentRecord] = {}
        self._records_lock = threading.Lock()
        # z0 candidates: every encoded window, vectorised (riffloop.music.BaselineIndex).
        self._index: Any = None  # riffloop.music.BaselineIndex once a song is loaded
        self._compute = threading.Lock()  # one generation at a time: 2 shared cores

    # -- latents ------------------------------------------------------------------------------

    def _record(self, song_id: str, wait_s: float) -> LatentRecord:
        with self._records_lock:
            cached = self._records.get(song_id)
        if cached is not None:
            return cached
        deadline = time.monotonic() + wait_s
        while True:
            try:
                record = LatentRecord.from_bytes(
                    self.ports.objects.get(LATENTS_BUCKET, LatentRecord.key(song_id))
                )
                break
            except NotFoundError:
                if not self.ports.objects.exists("songs", song_id):
                    raise NotFoundError(f"song {song_id} was never uploaded") from None
                if time.monotonic() >= deadline:
                    raise TransientError(f"song {song_id} is not encoded yet") from None
                time.sleep(0.5)
        with self._records_lock:
            if song_id in self._records:  # another thread loaded it meanwhile
                return self._records[song_id]
            self._records[song_id] = record
            self._index_song(record)
        return record

    def _index_song(self, record: LatentRecord) -> None:
        """Add a song's windows to the baseline index (ids ``<song>#<window>``); lock held."""
        from riffloop.music import BaselineIndex

        ids = [f"{record.song_id}#{j}" for j in range(int(record.latents.shape[0]))]
        try:
            if self._index is None:
                self._index = BaselineIndex(record.latents, ids)
            else:
                self._index.extend(record.latents, ids)
        except ValidationError as exc:  # e.g. encoded for another mel resolution: not comparable
            _log.warning(
                "song not indexed for baselines",
                extra={"song_id": record.song_id, "why": exc.reason},
            )

    def known_records(self) -> list[LatentRecord]:
        """Every encoded song (the baseline's candidates), loaded once and cached."""
        for key in self.ports.objects.list(LATENTS_BUCKET):
            song_id = key.removesuffix(".pt")
            with self._records_lock:
                known = song_id in self._records
            if not known:
                self._record(song_id, 0.0)
        with self._records_lock:
            return list(self._records.values())

    def on_song_encoded(self, envelope: events_pb2.Envelope) -> None:
        self._record(envelope.song_encoded.song_id, 0.0)

    # -- one track ----------------------------------------------------------------------------

    def make_track(self, request: Request) -> events_pb2.TrackReady:
        import soundfile
        import torch

        from riffloop.music import (
            InjectionPlan,
            MelCodec,
            decode_latents,
            image_from_uint8,
            inject_at_step,
            merge_latents,
            to_uint8,
        )

        request = validate_request(self.settings, request)
        plan = InjectionPlan.from_similarity(request.similarity, request.quality)
        started = time.perf_counter()
        # This request keeps this reference through a hot swap; during a canary its request id
        # decides between the candidate and the current model.
        model = self.model.for_request(request.request_id)
        records = [self._record(s, self.settings.latent_wait_s) for s in request.song_ids]
        seed = request.seed or self.dispatcher.generation_seed_for(request.request_id)
        picks = [seed % int(r.latents.shape[0]) for r in records]
        z = torch.stack([r.latents[i] for r, i in zip(records, picks, strict=True)])
        z_agg = merge_latents(z)
        chosen: dict[str, Any] = {}

        def nearest_baseline() -> str:
            # z0 = argmax_z Γ(z_agg, z), Γ = cosine similarity, over the other songs' windows
            # (the request's own songs only when nothing else is encoded yet). Asking for one
            # more neighbour than the request's own windows guarantees a foreign one if any.
            self.known_records()
            own = set(request.song_ids)
            k = 1 + sum(int(r.latents.shape[0]) for r in records)
            with self._records_lock:
                index = self._index
                if index is None:
                    raise TransientError("no encoded song is indexed for baselines yet")
                neighbours = index.nearest(z_agg, k=min(k, len(index)))
            best = next((n for n in neighbours if n.id.split("#")[0] not in own), neighbours[0])
            song_id, window = best.id.split("#")
            chosen["record"], chosen["window"] = self._records[song_id], int(window)
            return best.id

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
        if prov.kind is TrackKind.BASELINE:
            record, window = chosen["record"], chosen["window"]
            image = image_from_uint8(record.images[window : window + 1])
        else:
            steps = records[0].inversion_steps
            with self._compute:
                merged = decode_latents(model, z_agg[None], steps)
                generator = torch.Generator().manual_seed(seed)
                image = inject_at_step(model, merged, plan, generator)
        with self._compute:
            audio = MelCodec(model.mel).images_to_audio(image)[0]
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
            "embedding": [float(v) for v in image[0, 0].mean(dim=-1)],
            # The window itself (8-bit), the trainer's target when this track is selected.
            "image_uint8": to_uint8(image)[0, 0].tolist(),
        }
        self.ports.objects.put(
            "tracks",
            f"{prov.track_id}.json",
            json.dumps(sidecar).encode(),
            content_type="application/json",
        )
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
