"""The encoder's output as stored in the ``latents`` bucket, read by the generator: the
DDIM-inverted latents x_T of up to ``max_slices`` mel windows of a song, the windows themselves
(8-bit), and how they were made.

Latents belong to a model version: x_T inverted by version P means nothing to version V. So a
record is keyed by (song, version):

- ``<song_id>/<version>.pt`` (``version_key``): the song's latents inverted by ``version``. The
  generator serving V reads only these (a canary's share reads the candidate's). The encoder
  owns inversion: it writes them for the current version (and a running canary's) when a song
  is uploaded, and for every known song when a version is published (``model.published``),
  reconciling with ``models/CURRENT`` and ``models/CANARY`` on a timer.
- ``<song_id>.pt`` (``key``): the song's first encoding, written once. It marks the song as
  encoded (the gateway checks it) and holds the song's windows, which do not depend on the
  version: re-inversions start from them, and the trainer replays them.
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
    model_version: str  # the version that inverted ``latents``
    mel: dict[str, Any]  # riffloop.music.MelConfig.to_dict()
    inversion_steps: int

    @staticmethod
    def key(song_id: str) -> str:
        """The song's first encoding (its windows; the marker that it is encoded)."""
        return f"{song_id}.pt"

    @staticmethod
    def version_key(song_id: str, model_version: str) -> str:
        """The song's latents inverted by ``model_version``."""
        return f"{song_id}/{model_version}.pt"

    @staticmethod
    def song_keys(objects: Any) -> list[str]:
        """The first-encoding key of every encoded song (one per song, no per-version key)."""
        return [k for k in objects.list(LATENTS_BUCKET) if "/" not in k and k.endswith(".pt")]

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
