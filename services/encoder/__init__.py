"""The encoder service: songs → DDIM-inverted latents (``python -m services.encoder``)."""

from services.encoder._build import build
from services.encoder._service import (
    Encoder,
    EncoderServicer,
    EncoderSettings,
    decode_mono,
)

__all__ = ["Encoder", "EncoderServicer", "EncoderSettings", "build", "decode_mono"]
