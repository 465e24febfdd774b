"""MelConfig validation and the MelCodec round trip audio → image → audio."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from riffloop.core import ValidationError
from riffloop.music import (
    MelCodec,
    MelConfig,
    grid_from_npy,
    grid_to_npy,
    image_from_uint8,
    to_uint8,
)

pytestmark = pytest.mark.unit

SR = 22050


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _chord(seconds: float, freqs: tuple[float, ...] = (220.0, 440.0, 660.0)) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    audio = sum(0.2 * np.sin(2 * np.pi * f * t) for f in freqs)
    return np.asarray(audio, dtype=np.float32)


def _band_profile(images: torch.Tensor) -> np.ndarray:
    """Time-averaged level per mel band, [N, n_mels]."""
    return images[:, 0].mean(dim=2).numpy()


def test_presets_and_slice_lengths() -> None:
    small = MelConfig.preset(64)
    assert (small.n_mels, small.x_res) == (64, 64)
    # x_res·hop − 1 samples give exactly x_res centred STFT frames (teticio's slice_size).
    assert small.slice_samples == 64 * 512 - 1
    assert small.slice_seconds == pytest.approx(1.486, abs=1e-3)
    assert MelConfig.preset(256).slice_seconds == pytest.approx(5.944, abs=1e-3)
    assert MelConfig.preset(128).slice_samples == 128 * 512 - 1
    with pytest.raises(ValidationError):
        MelConfig.preset(100)


def test_config_dict_round_trip_and_validation() -> None:
    config = MelConfig(n_mels=32, x_res=48, top_db=60.0)
    assert MelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValidationError, match="unknown mel config keys: y_res"):
        MelConfig.from_dict({**config.to_dict(), "y_res": 32})
    with pytest.raises(ValidationError):
        MelConfig(n_mels=0)
    with pytest.raises(ValidationError):
        MelConfig(top_db=-1.0)
    with pytest.raises(ValidationError):
        MelConfig(n_fft=256, hop_length=512)
    with pytest.raises(ValidationError):
        MelConfig(n_fft=64, n_mels=64)


def test_images_have_the_documented_shape_and_range() -> None:
    codec = MelCodec(MelConfig())
    n = codec.config.slice_samples
    audio = _chord(3 * n / SR + 0.5)  # three whole windows and a partial one
    images = codec.audio_to_images(audio)
    assert images.shape == (3, 1, 64, 64)
    assert images.dtype == torch.float32
    assert float(images.min()) >= -1.0 and float(images.max()) <= 1.0
    # Every window's loudest bin is its 0 dB reference, i.e. exactly +1.
    assert torch.allclose(images.amax(dim=(1, 2, 3)), torch.ones(3))
    # The chord's partials are loud, the bands far above them are at the −top_db floor.
    profile = _band_profile(images)[0]
    assert profile[-5:].max() < -0.5 < profile.max()


def test_short_and_silent_audio() -> None:
    codec = MelCodec(MelConfig())
    assert codec.audio_to_images(np.zeros(1000, dtype=np.float32)).shape == (0, 1, 64, 64)
    silent = codec.audio_to_images(np.zeros(codec.config.slice_samples, dtype=np.float32))
    assert torch.equal(silent, -torch.ones_like(silent))


def test_rejects_bad_audio() -> None:
    codec = MelCodec(MelConfig())
    with pytest.raises(ValidationError):
        codec.audio_to_images(np.zeros((2, 40000), dtype=np.float32))
    with pytest.raises(ValidationError):
        codec.audio_to_images(np.zeros(40000, dtype=np.int16))
    bad = np.zeros(40000, dtype=np.float32)
    bad[5] = np.nan
    with pytest.raises(ValidationError):
        codec.audio_to_images(bad)
    with pytest.raises(ValidationError):
        codec.images_to_audio(torch.zeros(2, 1, 32, 64))


def test_round_trip_keeps_the_spectral_shape() -> None:
    codec = MelCodec(MelConfig())
    n = codec.config.slice_samples
    for freqs in ((220.0, 440.0, 660.0), (1000.0, 2500.0)):
        images = codec.audio_to_images(_chord(2 * n / SR, freqs))
        audio = codec.images_to_audio(images)
        assert audio.shape == (2, n) and audio.dtype == np.float32
        assert np.isfinite(audio).all()
        again = codec.audio_to_images(audio.reshape(-1))
        before, after = _band_profile(images), _band_profile(again)
        for a, b in zip(before, after, strict=True):
            # In power (where the partials dominate) the band profiles agree; in dB the
            # Griffin-Lim phase error lifts the −80 dB floor, so compare power.
            power_a, power_b = 10 ** (4 * (a + 1)), 10 ** (4 * (b + 1))  # 10^(dB/10)·const
            assert np.corrcoef(power_a, power_b)[0, 1] > 0.95
            # The three strongest bands (the partials) survive Griffin-Lim.
            assert set(np.argsort(a)[-3:]) == set(np.argsort(b)[-3:])


def test_audio_is_a_function_of_the_image_alone() -> None:
    """Griffin-Lim's random initial phases come from a fixed seed per image: the same image gives
    the same samples whatever the global RNG state or the batch around it (exact regeneration
    from provenance, common random numbers across the demo's arms)."""
    codec = MelCodec(MelConfig())
    n = codec.config.slice_samples
    images = codec.audio_to_images(_chord(3 * n / SR, (330.0, 990.0)))
    torch.manual_seed(1)
    batch = codec.images_to_audio(images)
    torch.manual_seed(2)
    alone = codec.images_to_audio(images[1:2])
    assert np.array_equal(batch[1], alone[0])
    after = torch.rand(1)
    torch.manual_seed(2)
    assert torch.equal(after, torch.rand(1)), "the caller's RNG stream is left untouched"


def test_round_trip_distinguishes_different_sounds() -> None:
    """Guard against a codec that returns the same spectrum whatever it is given."""
    codec = MelCodec(MelConfig())
    n = codec.config.slice_samples
    low = codec.audio_to_images(_chord(n / SR, (220.0,)))
    high = codec.audio_to_images(_chord(n / SR, (3000.0,)))
    low_back = codec.audio_to_images(codec.images_to_audio(low).reshape(-1))
    assert int(_band_profile(low_back)[0].argmax()) < int(_band_profile(high)[0].argmax()) - 10


def test_uint8_convention_of_teticio() -> None:
    levels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    images = image_from_uint8(levels)
    assert float(images.min()) == -1.0 and float(images.max()) == 1.0
    assert torch.equal(to_uint8(images), levels)
    assert torch.equal(to_uint8(torch.tensor([-2.0, 0.0, 2.0])), torch.tensor([0, 128, 255]).byte())
    with pytest.raises(ValidationError):
        image_from_uint8(torch.zeros(3))


def test_a_stored_track_image_round_trips_and_anything_else_is_refused() -> None:
    grid = torch.randint(0, 256, (16, 40), dtype=torch.uint8, generator=torch.Generator())
    assert torch.equal(grid_from_npy(grid_to_npy(grid)), grid)
    for bad in (grid.float(), grid[None]):
        with pytest.raises(ValidationError, match="8-bit"):
            grid_to_npy(bad)
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    floats = io.BytesIO()
    np.save(floats, np.zeros((4, 4), dtype=np.float32))
    for raw in (b"not an array", pickled.getvalue(), floats.getvalue()):
        with pytest.raises(ValidationError):
            grid_from_npy(raw)


def test_track_image_of_one_window_is_that_window_and_its_frames_invert_track_to_audio() -> None:
    codec = MelCodec(MelConfig())
    c = codec.config
    rng = np.random.default_rng(3)
    one = (0.1 * rng.standard_normal(c.slice_samples)).astype(np.float32)
    track = codec.audio_to_track_image(one)
    assert track.shape == (1, c.n_mels, c.x_res)
    assert torch.allclose(track, codec.audio_to_images(one)[0], atol=1e-5)
    # T frames of image → T·hop − 1 samples → T frames again
    image = torch.rand(1, c.n_mels, 150) * 2 - 1
    audio = codec.track_to_audio(image)
    assert codec.audio_to_track_image(audio).shape == (1, c.n_mels, 150)


def test_track_image_keeps_a_level_change_that_windows_hide() -> None:
    codec = MelCodec(MelConfig())
    c = codec.config
    t = np.arange(2 * c.slice_samples + 1) / c.sample_rate
    tone = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    tone[c.slice_samples + 1 :] *= 0.01  # −40 dB in the second window
    windows = codec.audio_to_images(tone)
    # each window is relative to its own peak: both peak at 1 (0 dB)
    assert windows[0].amax() == pytest.approx(1.0) and windows[1].amax() == pytest.approx(1.0)
    track = codec.audio_to_track_image(tone)[0]
    late = track[:, c.x_res + 8 :].amax()
    # −40 dB of an 80 dB range: 1 − 2·40/80 = 0 in image units
    assert float(late) == pytest.approx(0.0, abs=0.05)
    assert torch.equal(
        codec.audio_to_track_image(np.zeros(4000, np.float32)),
        torch.full((1, c.n_mels, 1 + 4000 // c.hop_length), -1.0),
    )
    with pytest.raises(ValidationError):
        codec.audio_to_track_image(np.zeros((2, 10), np.float32))
    with pytest.raises(ValidationError):
        codec.audio_to_track_image(np.array([0.0, np.nan], np.float32))
    with pytest.raises(ValidationError):
        codec.audio_to_track_image(np.zeros(0, np.float32))
