"""riffloop.music.mel_png: the picture of a track the web page shows beside its player."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile
from PIL import Image

from riffloop.music import InvalidAudio, MelConfig, mel_png

pytestmark = pytest.mark.unit


def _wav(seconds: float, freq: float = 440.0, rate: int = 22050) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buffer = io.BytesIO()
    soundfile.write(
        buffer, (0.3 * np.sin(2 * np.pi * freq * t)).astype("float32"), rate, format="WAV"
    )
    return buffer.getvalue()


def test_one_column_block_per_mel_window_low_bands_at_the_bottom() -> None:
    config = MelConfig()
    windows = 4
    png, width, height = mel_png(_wav(windows * config.slice_seconds + 0.2), config)
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.size == (width, height)
    assert (width, height) == (windows * config.x_res, config.n_mels)
    # a 440 Hz tone: its energy sits in the lower bands, so the bottom rows are the brightest
    pixels = np.asarray(image.convert("L"), dtype=float)
    assert pixels[height // 2 :].mean() > pixels[: height // 4].mean()


def test_a_track_shorter_than_a_window_still_has_a_picture() -> None:
    _, width, height = mel_png(_wav(0.5))
    assert (width, height) == (MelConfig().x_res, MelConfig().n_mels)


def test_bytes_that_are_not_audio_are_refused() -> None:
    with pytest.raises(InvalidAudio):
        mel_png(b"not audio" * 100)
