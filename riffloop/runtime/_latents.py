"""The encoder's output as stored in the ``latents`` bucket (``<song_id>.pt``), read by the
generator: the DDIM-inverted latents x_T of up to ``max_slices`` mel windows of a song, the
windows themselves (8-bit, so a baseline can be served as-is), and how they were made.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any

from riffloop.core import ValidationError

LATENTS_BUCKET = "latents"


@dataclasses.dataclass(frozen=True)
class LatentRecord:
    song_id: str
    latents: Any  # torch.Tensor [N, C, h, w] float32, x_T per window
    images: Any  # torch.Tensor [N, 1, n_mels, x_res] uint8 (riffloop.music.to_uint8)
    model_version: str
    mel: dict[str, Any]  # riffloop.music.MelConfig.to_dict()
    inversion_steps: int

    @staticmethod
    def key(song_id: str) -> str:
        return f"{song_id}.pt"

    def to_bytes(self) -> bytes:
        import torch

        buffer = io.BytesIO()
        torch.save(dataclasses.asdict(self), buffer)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> LatentRecord:
        import torch

        try:
            raw = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            return cls(**raw)
        except (RuntimeError, TypeError, KeyError, EOFError) as exc:
            raise ValidationError(f"latent record does not load ({exc})") from None
