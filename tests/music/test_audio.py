"""decode_audio: every format, every rejection code, a fuzz test (audio or InvalidAudio only)."""

from __future__ import annotations

import io
from functools import cache

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from riffloop.music._audio import (
    SAMPLE_RATE,
    AudioErrorCode,
    AudioLimits,
    DecodedAudio,
    InvalidAudio,
    decode_audio,
)

pytestmark = pytest.mark.unit

FORMATS = {  # container → (libsndfile format, subtype)
    "wav": ("WAV", "PCM_16"),
    "flac": ("FLAC", "PCM_16"),
    "ogg": ("OGG", "VORBIS"),
    "mp3": ("MP3", "MPEG_LAYER_III"),
}


def tone(seconds: float = 2.0, rate: int = 44100, channels: int = 2, freq: float = 440.0):
    t = np.arange(int(seconds * rate)) / rate
    mono = 0.4 * np.sin(2 * np.pi * freq * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 2 * t))
    return np.stack([mono] * channels, axis=1).astype(np.float32)


def encode(samples: np.ndarray, rate: int, container: str, subtype: str | None = None) -> bytes:
    fmt, default_subtype = FORMATS.get(container, (container.upper(), None))
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt, subtype=subtype or default_subtype)
    return buf.getvalue()


@cache
def valid_file(container: str) -> bytes:
    return encode(tone(), 44100, container)


def dominant_hz(audio: DecodedAudio) -> float:
    spectrum = np.abs(np.fft.rfft(audio.samples))
    return float(np.argmax(spectrum) * audio.sample_rate / audio.samples.size)


def code_of(data: bytes, limits: AudioLimits | None = None) -> AudioErrorCode:
    with pytest.raises(InvalidAudio) as info:
        decode_audio(data, limits)
    assert info.value.reason  # a human sentence
    return info.value.code


# -- decoding ----------------------------------------------------------------------------------


@pytest.mark.parametrize("container", list(FORMATS))
def test_decodes_each_format_to_mono_22050(container: str) -> None:
    if container == "mp3" and "MP3" not in sf.available_formats():
        pytest.skip("libsndfile without MP3")
    audio = decode_audio(valid_file(container))
    assert audio.source_format == container
    assert audio.sample_rate == SAMPLE_RATE and audio.samples.dtype == np.float32
    assert audio.samples.ndim == 1
    assert audio.source_sample_rate == 44100 and audio.source_channels == 2
    assert audio.duration_s == pytest.approx(2.0, abs=0.06)  # mp3/ogg encoder padding
    assert dominant_hz(audio) == pytest.approx(440.0, abs=2.0)
    assert 0.2 < float(np.abs(audio.samples).max()) < 0.5


# 44,101 and 191,999 Hz: rates whose ratio to 22,050 Hz does not reduce (torchaudio's kernel for
# them was 3.9 GB and more: a 3 s upload at 191,999 Hz got the process killed)
@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44101, 48000, 96000, 191999])
def test_resamples_any_rate_and_keeps_pitch(rate: int) -> None:
    audio = decode_audio(encode(tone(rate=rate, channels=1, freq=1000.0), rate, "wav"))
    assert audio.samples.size == pytest.approx(2 * SAMPLE_RATE, abs=2)
    assert dominant_hz(audio) == pytest.approx(1000.0, abs=2.0)


def test_downmix_is_the_channel_mean() -> None:
    left = tone(channels=1)[:, 0]
    stereo = np.stack([left, 0.5 * left], axis=1)
    audio = decode_audio(encode(stereo, 22050, "wav", "FLOAT"))
    np.testing.assert_allclose(audio.samples, 0.75 * left, atol=1e-6)


# -- every rejection ---------------------------------------------------------------------------


def test_rejections_have_codes() -> None:
    wav = valid_file("wav")
    float_wav = encode(tone(channels=1), 44100, "wav", "FLOAT")
    nan = tone(channels=1)
    nan[1000, 0] = np.nan
    cases = {
        AudioErrorCode.EMPTY: [b""],
        AudioErrorCode.TOO_LARGE: [],
        AudioErrorCode.NOT_AUDIO: [
            b"\x89PNG\r\n\x1a\n" + b"\x00" * 100,
            b"hello, this is a text file, not a song",
            b"%PDF-1.7 ...",
            bytes(range(256)),
        ],
        AudioErrorCode.UNSUPPORTED_FORMAT: [
            encode(tone(), 44100, "AIFF", "PCM_16"),
            encode(tone(), 44100, "AU", "PCM_16"),
            b"\x00\x00\x00\x20ftypM4A " + b"\x00" * 64,
            encode(tone(rate=2000, channels=1), 2000, "wav"),  # below 4 kHz
        ],
        AudioErrorCode.TRUNCATED: [wav[:10], wav[: len(wav) // 2], valid_file("flac")[:4000]],
        AudioErrorCode.NON_FINITE: [encode(nan, 44100, "wav", "FLOAT")],
        AudioErrorCode.SILENT: [
            encode(np.zeros((44100 * 2, 1), np.float32), 44100, "wav"),
            encode(np.stack([tone(channels=1)[:, 0], -tone(channels=1)[:, 0]], 1), 44100, "wav"),
        ],
        AudioErrorCode.TOO_SHORT: [encode(tone(seconds=0.5), 44100, "wav")],
        AudioErrorCode.CORRUPT: [b"RIFF" + (204).to_bytes(4, "little") + b"WAVE" + b"\x00" * 200],
    }
    if "MP3" in sf.available_formats():
        mp3 = valid_file("mp3")
        cases[AudioErrorCode.TRUNCATED].append(mp3[: len(mp3) // 2])
    for code, datas in cases.items():
        for data in datas:
            assert code_of(data) == code, (code, data[:16])
    assert code_of(float_wav, AudioLimits(max_bytes=1000)) == AudioErrorCode.TOO_LARGE
    assert code_of(wav, AudioLimits(max_seconds=1.0, min_seconds=0.1)) == AudioErrorCode.TOO_LONG
    assert code_of(wav, AudioLimits(min_seconds=3.0)) == AudioErrorCode.TOO_SHORT
    assert code_of(wav, AudioLimits(max_decoded_values=1000)) == AudioErrorCode.TOO_LARGE


def test_invalid_audio_is_a_validation_error() -> None:
    from riffloop.core import ValidationError

    with pytest.raises(ValidationError) as info:
        decode_audio(b"")
    assert info.value.grpc_code == "INVALID_ARGUMENT"


# -- fuzz --------------------------------------------------------------------------------------


def _outcome(data: bytes) -> None:
    """The property: audio that satisfies the contract, or InvalidAudio — nothing else."""
    try:
        audio = decode_audio(data, AudioLimits(min_seconds=0.0, max_seconds=60.0))
    except InvalidAudio as exc:
        assert isinstance(exc.code, AudioErrorCode)
        return
    assert audio.samples.dtype == np.float32 and audio.samples.ndim == 1
    assert np.isfinite(audio.samples).all()
    assert audio.sample_rate == SAMPLE_RATE and audio.duration_s <= 60.0


def _containers() -> list[str]:
    return [c for c in FORMATS if c != "mp3" or "MP3" in sf.available_formats()]


FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@given(st.binary(max_size=4096))
@FUZZ
def test_fuzz_random_bytes(data: bytes) -> None:
    _outcome(data)


@given(
    st.sampled_from(_containers()),
    st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), min_size=1, max_size=8),
)
@FUZZ
def test_fuzz_mutated_headers(container: str, edits: list[tuple[int, int]]) -> None:
    data = bytearray(valid_file(container))
    for pos, value in edits:
        data[pos % len(data)] = value
    _outcome(bytes(data))


@given(st.sampled_from(_containers()), st.floats(0.0, 1.0))
@FUZZ
def test_fuzz_truncations(container: str, keep: float) -> None:
    data = valid_file(container)
    _outcome(data[: int(len(data) * keep)])


@given(
    st.sampled_from(_containers()),
    st.integers(0, 10_000),
    st.binary(min_size=1, max_size=64),
)
@FUZZ
def test_fuzz_spliced_garbage(container: str, at: int, garbage: bytes) -> None:
    data = valid_file(container)
    at %= len(data)
    _outcome(data[:at] + garbage + data[at + len(garbage) :])


# -- declared vs decoded length ----------------------------------------------------------------


def _ogg_crc(page: bytes) -> int:
    """The Ogg page checksum: CRC-32, polynomial 0x04C11DB7, not reflected, initial value 0."""
    crc = 0
    for byte in page:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else crc << 1
            crc &= 0xFFFFFFFF
    return crc


def with_last_granule(ogg: bytes, granule: int) -> bytes:
    """The same OGG with its last page's granule position (the length libsndfile declares) set
    to ``granule`` and the page checksum redone: what a Vorbis encoder that pads the end writes."""
    start = ogg.rindex(b"OggS")
    segments = ogg[start + 26]
    length = 27 + segments + sum(ogg[start + 27 : start + 27 + segments])
    assert start + length == len(ogg)
    page = bytearray(ogg[start:])
    page[6:14] = granule.to_bytes(8, "little", signed=True)
    page[22:26] = bytes(4)
    page[22:26] = _ogg_crc(bytes(page)).to_bytes(4, "little")
    return ogg[:start] + bytes(page)


def declared_and_decoded(data: bytes) -> tuple[int, int]:
    with sf.SoundFile(io.BytesIO(data)) as handle:
        return handle.frames, handle.read(dtype="float32", always_2d=True).shape[0]


def test_ogg_declaring_a_little_more_than_decodes_is_accepted_at_its_decoded_length() -> None:
    """Players ignore Vorbis end padding: a header 104 frames past the decodable samples (as in
    3 of 287 Debian music-package files) is audio of the decoded length, not a cut-off file."""
    ogg = valid_file("ogg")
    decodable = declared_and_decoded(with_last_granule(ogg, 10**6))[1]  # all the packets yield
    padded = with_last_granule(ogg, decodable + 104)
    assert declared_and_decoded(padded) == (decodable + 104, decodable)
    audio = decode_audio(padded)
    assert audio.samples.size == pytest.approx(decodable * SAMPLE_RATE / 44100, abs=2)
    assert dominant_hz(audio) == pytest.approx(440.0, abs=2.0)
    # one largest Vorbis block is the bound; past it the file is refused with its reason
    assert decode_audio(with_last_granule(ogg, decodable + 8192)).samples.size
    with pytest.raises(InvalidAudio, match=r"cut off: \d+ of \d+ frames") as info:
        decode_audio(with_last_granule(ogg, decodable + 8193))
    assert info.value.code == AudioErrorCode.TRUNCATED
    with pytest.raises(InvalidAudio) as info:
        decode_audio(with_last_granule(ogg, 4 * decodable))
    assert info.value.code == AudioErrorCode.TRUNCATED


@pytest.mark.parametrize("container", ["wav", "flac"])
@pytest.mark.parametrize("cut", [1, 4, 100, 2000])
def test_wav_and_flac_stay_exact_a_few_bytes_short_is_truncated(container: str, cut: int) -> None:
    """WAV and FLAC headers count every frame: the OGG tolerance must not hide a cut tail."""
    assert code_of(valid_file(container)[:-cut]) == AudioErrorCode.TRUNCATED
