"""A track's log-mel spectrogram as a PNG, for people to look at (the web page's player).

1. Decode the audio as the encoder does (``decode_audio``: mono, 22,050 Hz), any length.
2. Cut it into the model's mel windows (``MelCodec.audio_to_images``: x_res frames each, dB
   relative to each window's peak, floored at −top_db, scaled to [−1, 1]); a trailing partial
   window is dropped, as the model never sees one. A track shorter than one window is padded
   with silence to one window.
3. Lay the windows side by side, low mel bands at the bottom, and colour the values with
   matplotlib's "magma" map (dark = quiet).
"""

from __future__ import annotations

import io

import numpy as np

from riffloop.music._audio import AudioLimits, decode_audio
from riffloop.music._mel import MelCodec, MelConfig


def mel_png(data: bytes, config: MelConfig | None = None) -> tuple[bytes, int, int]:
    """(PNG bytes, width, height) of the audio file ``data``; raises ``InvalidAudio``."""
    from matplotlib import colormaps
    from PIL import Image

    codec = MelCodec(config)
    c = codec.config
    # a track may be one window (1.49 s), shorter than an upload may be
    samples = decode_audio(data, AudioLimits(min_seconds=0.0)).samples
    if samples.shape[0] < c.slice_samples:
        samples = np.pad(samples, (0, c.slice_samples - samples.shape[0]))
    images = codec.audio_to_images(samples)[:, 0].numpy()  # [N, n_mels, x_res] in [-1, 1]
    strip = np.concatenate(list(images), axis=1)[::-1]  # mel band 0 (lowest) at the bottom
    values = (strip + 1.0) / 2.0
    rgba = colormaps["magma"](values, bytes=True)
    buffer = io.BytesIO()
    Image.fromarray(rgba[..., :3]).save(buffer, format="PNG", optimize=True)
    height, width = strip.shape
    return buffer.getvalue(), int(width), int(height)
