"""The encoder: uploaded songs → DDIM-inverted latents x_T (design.md §3 "Encode").

songs.uploaded.v1 (or the Encode RPC) → read the audio (claim check), decode to mono at the
model's sample rate, cut into mel windows (``MelCodec.audio_to_images``), keep up to
``max_slices`` evenly spaced windows, ``invert`` them with the served model, store a
``LatentRecord`` at ``latents/<song_id>/<version>.pt`` and, once, the song's windows at
``latents/<song_id>.pt``, and publish songs.encoded.v1. Idempotent: a song already encoded is
answered from the store.

Latents belong to a model version (riffloop.runtime.LatentRecord). The encoder owns inversion:
during a canary an upload is inverted by the candidate too, and model.published (or the timer,
``model_poll_s``) makes ``keep_latents`` invert every known song's stored windows for each
version the generators serve (``models/CURRENT`` and ``models/CANARY``). A generator that
needs a song's latents for its version waits for them (``latent_wait_s``).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from typing import Any

from riffloop.core import (
    ConfigurationError,
    NotFoundError,
    ValidationError,
)
from riffloop.runtime import LATENTS_BUCKET, LatentRecord, OperatorGuarded, ServedModel
from riffloop.v1 import common_pb2, events_pb2
from riffloop.v1 import encoder_service_pb2 as pb
from riffloop.v1 import encoder_service_pb2_grpc as pb_grpc

_log = logging.getLogger("riffloop.encoder")


@dataclasses.dataclass(frozen=True, repr=False)
class EncoderSettings(OperatorGuarded):
    service_name: str = "encoder"
    grpc_port: int = 50052
    metrics_port: int = 9102
    inversion_steps: int = 50
    max_slices: int = 4
    torch_threads: int = 1

    def _validate(self) -> None:
        super()._validate()
        if not 1 <= self.inversion_steps <= 1000:
            raise ConfigurationError("RIFFLOOP_INVERSION_STEPS must lie in 1–1000")
        if not 1 <= self.max_slices <= 64:
            raise ConfigurationError("RIFFLOOP_MAX_SLICES must lie in 1–64")
        if self.torch_threads < 1:
            raise ConfigurationError("RIFFLOOP_TORCH_THREADS must be at least 1")


def decode_mono(data: bytes, sample_rate: int) -> Any:
    """Audio bytes → mono float32 samples at ``sample_rate`` (``riffloop.music.decode_audio``)."""
    import torch

    from riffloop.music import AudioLimits, decode_audio, resample

    decoded = decode_audio(data, AudioLimits(min_seconds=0.0))
    samples = decoded.samples
    if decoded.sample_rate != sample_rate:
        samples = resample(samples, decoded.sample_rate, sample_rate)
    return torch.from_numpy(samples)


class Encoder:
    def __init__(self, settings: EncoderSettings, ports: Any, models: ServedModel) -> None:
        self.settings = settings
        self.ports = ports
        self.models = models
        self._lock = threading.Lock()  # one inversion at a time: 2 cores, shared
        # A served version other than the current one (a running canary's candidate), loaded
        # to invert songs for the generators that serve it; at most one is held.
        self._other: tuple[str, Any] | None = None
        self._other_lock = threading.Lock()
        self._done: set[tuple[str, str]] = set()  # (song, version) known to be stored
        self.wake = threading.Event()  # set by model.published: reconcile now, not at the timer

    # -- versions -----------------------------------------------------------------------------

    def served_versions(self) -> list[str]:
        """What the generators serve now: ``models/CURRENT``'s version and a running canary's."""
        store = self.models.store
        versions = []
        for marker in (store.current(), store.canary()):
            if marker is not None and marker.get("version") not in versions:
                versions.append(str(marker["version"]))
        return versions

    def _model(self, version: str) -> Any:
        held = self.models.get()
        if held.version == version:
            return held
        with self._other_lock:
            if self._other is None or self._other[0] != version:
                model = self.models.store.load(version)
                model.unet.eval()
                self._other = (version, model)
            return self._other[1]

    # -- inversion ----------------------------------------------------------------------------

    def encode(self, song_id: str, audio_ref: common_pb2.ObjectRef | None = None) -> LatentRecord:
        """The song's latents under the current version (and a running canary's, stored too).
        The first encoding cuts the song into windows and stores them with the latents
        (``LatentRecord.key``); later versions invert those windows (``invert_for``)."""
        key = LatentRecord.key(song_id)
        if self.ports.objects.exists(LATENTS_BUCKET, key):
            song = LatentRecord.from_bytes(self.ports.objects.get(LATENTS_BUCKET, key))
        else:
            song = self._first_encoding(song_id, audio_ref)
        current = self.models.get().version
        record = self.invert_for(song, current)
        for version in self.served_versions():
            if version != current:
                self.invert_for(song, version)
        return record

    def _first_encoding(self, song_id: str, audio_ref: common_pb2.ObjectRef | None) -> LatentRecord:
        bucket, obj = (audio_ref.bucket, audio_ref.key) if audio_ref else ("songs", song_id)
        try:
            data = self.ports.objects.get(bucket, obj)
        except NotFoundError:
            raise NotFoundError(f"song {song_id} is not in the object store") from None
        import torch

        from riffloop.music import MelCodec, invert, to_uint8

        model = self.models.get()
        samples = decode_mono(data, model.mel.sample_rate)
        codec = MelCodec(model.mel)
        n = codec.count_windows(samples.shape[0])
        if n == 0:
            raise ValidationError(
                f"song {song_id} is shorter than one mel window ({model.mel.slice_seconds:.2f} s)"
            )
        take = min(n, self.settings.max_slices)
        picks = torch.linspace(0, n - 1, take).round().long().unique()
        # Each window's image is its own (a window's mel, in dB of its own maximum): only the
        # picked windows are turned into images (all windows of a 600 s song: 500 MiB at the
        # 256 preset; the 4 picked: 26 MiB).
        size = model.mel.slice_samples
        images = codec.audio_to_images(
            torch.cat([samples[i * size : (i + 1) * size] for i in picks.tolist()])
        )
        with self._lock:
            latents = invert(model, images, self.settings.inversion_steps)
        record = LatentRecord(
            song_id=song_id,
            latents=latents.contiguous(),
            images=to_uint8(images).contiguous(),
            model_version=model.version,
            mel=model.mel.to_dict(),
            inversion_steps=self.settings.inversion_steps,
        )
        data = record.to_bytes()
        # the version's key first: the song key, written last, says the song is encoded
        self.ports.objects.put(
            LATENTS_BUCKET, LatentRecord.version_key(song_id, model.version), data
        )
        self.ports.objects.put(LATENTS_BUCKET, LatentRecord.key(song_id), data)
        self._done.add((song_id, model.version))
        return record

    def invert_for(self, song: LatentRecord, version: str) -> LatentRecord:
        """The song's latents under ``version``: read when stored, else its stored windows
        inverted by that version (x_T = DDIM⁻¹_V(x_0), ``inversion_steps`` steps)."""
        key = LatentRecord.version_key(song.song_id, version)
        objects = self.ports.objects
        if objects.exists(LATENTS_BUCKET, key):
            self._done.add((song.song_id, version))
            return LatentRecord.from_bytes(objects.get(LATENTS_BUCKET, key))
        if song.model_version == version:  # a first encoding stored before versioned keys
            record = song
        else:
            from riffloop.music import image_from_uint8, invert

            model = self._model(version)
            if model.mel.to_dict() != song.mel:
                raise ValidationError(
                    f"song {song.song_id} was cut for another mel config than {version}'s"
                )
            with self._lock:
                latents = invert(
                    model, image_from_uint8(song.images), self.settings.inversion_steps
                )
            record = dataclasses.replace(
                song,
                latents=latents.contiguous(),
                model_version=version,
                inversion_steps=self.settings.inversion_steps,
            )
        objects.put(LATENTS_BUCKET, key, record.to_bytes())
        self._done.add((song.song_id, version))
        return record

    def reconcile(self, stop: threading.Event | None = None) -> int:
        """Latents under every served version for every encoded song that lacks them; returns
        how many were stored. A song that cannot be inverted is logged and skipped."""
        if not self.models.ready:
            return 0
        stored = 0
        versions = self.served_versions()
        with self._other_lock:
            if self._other is not None and self._other[0] not in versions:
                self._other = None  # the canary ended: its candidate is not needed any more
        for done in [d for d in list(self._done) if d[1] not in versions]:
            self._done.discard(done)  # versions no longer served
        objects = self.ports.objects
        for key in LatentRecord.song_keys(objects):
            song_id = key.removesuffix(".pt")
            song: LatentRecord | None = None
            for version in versions:
                if stop is not None and stop.is_set():
                    return stored
                if (song_id, version) in self._done:
                    continue
                if objects.exists(LATENTS_BUCKET, LatentRecord.version_key(song_id, version)):
                    self._done.add((song_id, version))
                    continue
                song = song or LatentRecord.from_bytes(objects.get(LATENTS_BUCKET, key))
                try:
                    self.invert_for(song, version)
                except (ValidationError, NotFoundError) as exc:
                    _log.warning(
                        "song not inverted for a version",
                        extra={"song_id": song_id, "model_version": version, "why": str(exc)},
                    )
                    continue
                stored += 1
        if stored:
            _log.info("latents inverted for served versions", extra={"songs": stored})
        return stored

    def publish(self, record: LatentRecord) -> events_pb2.SongEncoded:
        ref = self.ports.objects.stat(
            LATENTS_BUCKET, LatentRecord.version_key(record.song_id, record.model_version)
        )
        payload = events_pb2.SongEncoded(
            song_id=record.song_id,
            latent=ref.to_proto(),
            mel_config=common_pb2.MelConfig(**record.mel),
            model_version=record.model_version,
            slice_count=int(record.latents.shape[0]),
            inversion_steps=record.inversion_steps,
        )
        self.ports.publish("songs.encoded.v1", record.song_id, payload)
        return payload

    def on_song_uploaded(self, envelope: events_pb2.Envelope) -> None:
        uploaded = envelope.song_uploaded
        self.publish(self.encode(uploaded.song_id, uploaded.audio))

    def on_model_published(self, envelope: events_pb2.Envelope) -> None:
        """Serve the current version, then have the latents worker invert every known song for
        the versions now served (a new current one, or a canary's candidate)."""
        self.models.load_current()
        self.wake.set()


def keep_latents(encoder: Encoder, poll_s: float) -> Callable[[threading.Event], None]:
    """A ``LoopWorker`` body: ``reconcile`` at once when model.published wakes it, else every
    ``poll_s`` (the event reaches one replica; the markers are the truth for all)."""

    def body(stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                encoder.reconcile(stop)
            except Exception:
                _log.exception("inverting songs for the served versions failed; retrying")
            # wait for the wake-up or the timer, looking at ``stop`` every 0.2 s
            waited = 0.0
            while waited < poll_s and not stop.is_set() and not encoder.wake.wait(0.2):
                waited += 0.2
            encoder.wake.clear()

    return body


class EncoderServicer(pb_grpc.EncoderServiceServicer):
    def __init__(self, encoder: Encoder) -> None:
        self.encoder = encoder

    def Encode(self, request: pb.EncodeRequest, context: Any) -> pb.EncodeResponse:
        song_id = request.song_id
        if len(song_id) != 64 or any(c not in "0123456789abcdef" for c in song_id):
            raise ValidationError("song_id must be the 64-hex sha256 returned by UploadSong")
        payload = self.encoder.publish(self.encoder.encode(song_id))
        return pb.EncodeResponse(
            song_id=payload.song_id,
            latent=payload.latent,
            mel_config=payload.mel_config,
            model_version=payload.model_version,
            slice_count=payload.slice_count,
            inversion_steps=payload.inversion_steps,
        )
