"""Long tracks: windows that continue each other's tails, crossfaded (riffloop.music._long)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from riffloop.core import ValidationError
from riffloop.music import (
    InjectionPlan,
    MelCodec,
    MelConfig,
    ModelConfig,
    MusicDiffusion,
    TrackLength,
    baseline_track,
    baseline_windows,
    continue_window,
    crossfade_windows,
    generate,
    generate_long,
    inject_at_step,
    naive_concatenation,
    seam_flux,
    to_uint8,
    track_noise,
)

torch.set_num_threads(1)

BASE_MODEL = Path(__file__).resolve().parents[2] / "assets" / "base-model"
MEL = MelConfig()  # 64 × 64, hop 512 at 22,050 Hz: one window = 32,767 samples ≈ 1.486 s


@pytest.mark.unit
@pytest.mark.parametrize(
    ("seconds", "windows", "frames", "samples"),
    [
        (0, 5, 256, 131_071),  # the default 5.9 s → 5.94 s, the paper prototype's window
        (5.9, 5, 256, 131_071),
        (30, 27, 1312, 671_743),
        (60, 54, 2608, 1_335_295),
        (MEL.slice_seconds, 1, 64, 32_767),
        (1.486, 1, 64, 32_767),  # the gateway's minimum, within 1 ms of one window
        (1.6, 2, 112, 57_343),
    ],
)
def test_track_length_covers_the_request(
    seconds: float, windows: int, frames: int, samples: int
) -> None:
    length = TrackLength.for_seconds(seconds, MEL)
    assert (length.windows, length.frames, length.samples(MEL.hop_length)) == (
        windows,
        frames,
        samples,
    )
    assert length.seconds(MEL) >= (seconds or 5.9) - 1e-3


@pytest.mark.unit
@pytest.mark.parametrize("seconds", [-1.0, 1.0, 60.5, float("nan"), float("inf"), True])
def test_track_length_outside_one_window_to_the_maximum_is_an_input_error(
    seconds: float,
) -> None:
    with pytest.raises(ValidationError, match="duration"):
        TrackLength.for_seconds(seconds, MEL)


@pytest.mark.unit
def test_crossfade_is_equal_power_and_keeps_the_frame_grid() -> None:
    a = torch.full((1, 1, 4, 8), 0.5)
    joined = crossfade_windows(torch.cat([a, a, a]), overlap=2)
    assert joined.shape == (1, 4, 8 + 2 * 6)
    assert torch.allclose(joined, torch.full_like(joined, 0.5))  # equal levels: no dip, no bump
    b = torch.cat([torch.full((1, 1, 4, 8), -1.0), torch.full((1, 1, 4, 8), 1.0)])
    faded = crossfade_windows(b, overlap=4)[0, 0]
    assert faded[:4].eq(-1).all() and faded[8:].eq(1).all()
    assert bool((faded[4:8].diff() > 0).all())  # monotone through the fade


@pytest.mark.unit
def test_baseline_windows_follow_the_same_source_in_time() -> None:
    ids = ["corpus:p1:piano:30", "corpus:p2:flute:0", "corpus:p1:piano:10", "tone:0"]
    ids += ["corpus:p1:piano:20"]
    images = torch.arange(5, dtype=torch.uint8).reshape(5, 1, 1, 1).expand(5, 1, 2, 4).clone()
    order = baseline_windows(ids, images, row=4, windows=4)[:, 0, 0, 0].tolist()
    assert order == [4, 0, 2, 4]  # windows 20, 30, then wrap to 10, 20
    assert baseline_windows(ids, images, row=3, windows=3)[:, 0, 0, 0].tolist() == [3, 3, 3]
    length = TrackLength(windows=4, x_res=4, overlap=1)
    assert baseline_track(ids, images, 4, length).shape == (1, 1, 2, length.frames)


@pytest.mark.unit
def test_a_track_cuts_into_the_windows_it_was_made_of() -> None:
    length = TrackLength(windows=3, x_res=8, overlap=2)
    frame = torch.arange(length.frames, dtype=torch.float32)
    image = frame.expand(1, 4, length.frames).clone()  # [1, H, T]: each column its frame
    windows = length.windows_of(image)
    assert windows.shape == (3, 1, 4, 8)
    assert windows[:, 0, 0, 0].tolist() == [0.0, 6.0, 12.0]  # k·(W − o)
    assert windows[-1, 0, 0, -1] == length.frames - 1
    with pytest.raises(ValidationError, match="20 frames"):
        length.windows_of(image[..., :-1])


def tiny_model() -> MusicDiffusion:
    cfg = ModelConfig.preset("tiny")
    return MusicDiffusion.create(cfg, mel=MelConfig(n_mels=16, x_res=16), seed=0)


@pytest.mark.unit
def test_first_window_is_the_one_window_track_and_later_windows_continue_its_tail() -> None:
    model = tiny_model()
    shape = tuple(model.image_shape)
    merged = torch.rand((1, 1, 16, 16)) * 2 - 1
    plan = InjectionPlan.from_similarity(0.5, 4)
    length = TrackLength(windows=3, x_res=16, overlap=4)
    noise = track_noise(shape, 3, seed=7)[None]
    image = generate_long(model, merged, plan, length, noise)
    assert image.shape == (1, 1, 16, length.frames)
    single = inject_at_step(model, merged, plan, torch.Generator().manual_seed(7))
    # window 0's frames before the first crossfade are the one-window track of the same seed
    # (clamped to [−1, 1] as every image is before Griffin-Lim)
    assert torch.allclose(image[..., :12], single[..., :12].clamp(-1, 1), atol=1e-6)
    audio = MelCodec(model.mel).track_to_audio(image[0])
    assert audio.shape == (length.samples(model.mel.hop_length),)


@pytest.mark.slow
def test_joins_of_a_long_track_are_no_rougher_than_its_windows() -> None:
    """The committed base model, 7 DDIM steps per window, 3 tracks of 5.9 s (5 windows each):
    the median spectral flux at the joins is no larger than inside the windows; the same
    windows drawn independently and put side by side are far rougher at the joins."""
    torch.manual_seed(0)
    model = MusicDiffusion.from_pretrained(BASE_MODEL)
    shape = tuple(model.image_shape)
    z_agg = torch.randn((1, *shape), generator=torch.Generator().manual_seed(1))
    merged = generate(model, z_agg, 10).expand(3, -1, -1, -1).contiguous()
    plan = InjectionPlan.from_similarity(0.5, 6)  # 12 steps, inject at the 6th: 7 UNet calls
    length = TrackLength.for_seconds(5.9, model.mel)
    noise = torch.stack([track_noise(shape, length.windows, seed) for seed in range(3)])
    long = generate_long(model, merged, plan, length, noise)
    report = seam_flux(long, length)
    assert report.joins == 3 * 8
    assert report.seamless, report
    # naive concatenation: each window injected on its own from its ε_k, no overlap, no fade
    windows = torch.stack(
        [inject_at_step(model, merged, plan, noise=noise[:, k]) for k in range(length.windows)],
        dim=1,
    )
    naive = torch.stack([naive_concatenation(w) for w in windows])
    naive_report = seam_flux(naive, TrackLength(length.windows, length.x_res, overlap=0))
    assert not naive_report.seamless and naive_report.ratio > 3 * report.ratio, naive_report
    assert to_uint8(long).shape == (3, 1, 64, 256)


@pytest.mark.unit
def test_seam_flux_compares_joins_with_the_inside_of_the_windows_not_the_crossfades() -> None:
    """Flux 0.9–1.1 inside the windows, 0.5 inside the crossfades (a blend's smoothing) and the
    windows' median at the joins: the joins are no rougher than the windows (ratio 1), though
    they are rougher than the pooled rest. A step at the joins alone is seen."""
    length = TrackLength(windows=5, x_res=64, overlap=16)
    gen = torch.Generator().manual_seed(0)
    steps = 0.9 + 0.2 * torch.rand((1, 1, length.frames - 1), generator=gen)
    joins = torch.tensor(length.joins()) - 1
    blend = torch.zeros(length.frames - 1, dtype=torch.bool)
    for start in length.window_starts()[1:]:
        blend[start : start + length.overlap - 1] = True  # pairs inside the crossfade
    steps[..., blend] = 0.5
    inside = torch.ones(length.frames - 1, dtype=torch.bool)
    inside[joins] = False
    inside &= ~blend
    steps[..., joins] = steps[..., inside].median()
    image = torch.cat([torch.zeros(1, 1, 1), steps.cumsum(-1)], dim=-1).expand(1, 4, -1)
    report = seam_flux(image, length)
    assert report.ratio == pytest.approx(1.0, abs=1e-5)
    assert report.blend_flux == pytest.approx(0.5)
    assert report.ratio_to_others > 1.02 and report.seamless
    assert report.joins == 2 * (length.windows - 1)

    steps[..., joins] = 2.0
    image = torch.cat([torch.zeros(1, 1, 1), steps.cumsum(-1)], dim=-1).expand(1, 4, -1)
    seamed = seam_flux(image, length)
    assert seamed.ratio > 1.8 and not seamed.seamless


@pytest.mark.unit
def test_continued_window_settings_outside_their_range_are_input_errors() -> None:
    model = tiny_model()
    plan = InjectionPlan.from_similarity(0.5, 4)
    merged = torch.zeros(1, 1, 16, 16)
    noise = torch.randn(1, *model.image_shape)
    tail = torch.zeros(1, *model.image_shape[:-1], 4)
    for bad in ({"hold": 0.0}, {"hold": 1.5}, {"free_fraction": 1.0}, {"free_fraction": -0.1}):
        with pytest.raises(ValidationError, match="hold must lie"):
            continue_window(model, merged, plan, noise, tail, **bad)
