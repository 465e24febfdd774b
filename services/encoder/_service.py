"""The encoder: uploaded songs → DDIM-inverted latents x_T (design.md §3 "Encode").

songs.uploaded.v1 (or the Encode RPC) → read the audio (claim check), decode to mono at the
model's sample rate, cut into mel windows (``MelCodec.audio_to_images``), keep up to
``max_slices`` evenly spaced windows, ``invert`` them with the served model, store a
``LatentRecord`` at ``latents/<song_id>.pt`` and publish songs.encoded.v1. Idempotent: a song
already encoded is answered from the store.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any

from riffloop.core import (
    ConfigurationError,
    NotFoundError,
    ValidationError,
)
from riffloop.runtime import LATENTS_BUCKET, LatentRecord, ServedModel, ServiceSettings
from riffloop.v1 import common_pb2, events_pb2
from riffloop.v1 import encoder_service_pb2 as pb
from riffloop.v1 import encoder_service_pb2_grpc as pb_grpc

_log = logging.getLogger("riffloop.encoder")


@dataclasses.dataclass(frozen=True, repr=False)
class EncoderSettings(ServiceSettings):
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
    import torchaudio.functional as audio_f

    from riffloop.music import AudioLimits, decode_audio

    decoded = decode_audio(data, AudioLimits(min_seconds=0.0))
    samples = torch.from_numpy(decoded.samples)
    if decoded.sample_rate != sample_rate:
        samples = audio_f.resample(samples, decoded.sample_rate, sample_rate)
    return samples


class Encoder:
    def __init__(self, settings: EncoderSettings, ports: Any, models: ServedModel) -> None:
        self.settings = settings
        self.ports = ports
        self.models = models
        self._lock = threading.Lock()  # one inversion at a time: 2 cores, shared

    def encode(self, song_id: str, audio_ref: common_pb2.ObjectRef | None = None) -> LatentRecord:
        key = LatentRecord.key(song_id)
        if self.ports.objects.exists(LATENTS_BUCKET, key):
            return LatentRecord.from_bytes(self.ports.objects.get(LATENTS_BUCKET, key))
        bucket, obj = (audio_ref.bucket, audio_ref.key) if audio_ref else ("songs", song_id)
        try:
            data = self.ports.objects.get(bucket, obj)
        except NotFoundError:
            raise NotFoundError(f"song {song_id} is not in the object store") from None
        import torch

        from riffloop.music import MelCodec, invert, to_uint8

        model = self.models.get()
        samples = decode_mono(data, model.mel.sample_rate)
        images = MelCodec(model.mel).audio_to_images(samples)
        if images.shape[0] == 0:
            raise ValidationError(
                f"song {song_id} is shorter than one mel window ({model.mel.slice_seconds:.2f} s)"
            )
        n = images.shape[0]
        take = min(n, self.settings.max_slices)
        picks = torch.linspace(0, n - 1, take).round().long().unique()
        images = images[picks]
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
        self.ports.objects.put(LATENTS_BUCKET, key, record.to_bytes())
        return record

    def publish(self, record: LatentRecord) -> events_pb2.SongEncoded:
        ref = self.ports.objects.stat(LATENTS_BUCKET, LatentRecord.key(record.song_id))
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
        self.models.load_current()


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
