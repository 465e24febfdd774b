"""Long tracks (issue 25): a 30 s track's mel sheet; long tracks measured against single windows.

    .venv/bin/python scripts/long_tracks.py sheet   [--seconds 30] [--seed 1] [--threads 2]
    .venv/bin/python scripts/long_tracks.py figures [--seconds 5.9] [--inputs 8] [--seeds 2]

Inputs are fluidsynth renders of *held-out* corpus pieces (``riffloop.music.build_corpus`` renders
each chorale with one General MIDI instrument; the base model never trained on these pieces),
their first ``--upload-seconds`` uploaded as FLAC, two per instrument (piano, organ, strings,
flute) for 8 inputs.

``sheet`` runs the encoder and the generator services in this process on in-memory ports (the
code a running stack runs: ``Encoder.encode`` → ``Generator.make_track`` with
``duration_seconds``), reads the served WAV back from the object store, and draws
``docs/results/long-track-30s-mel.png``: the input's mel, the served track's mel (the WAV's,
after Griffin-Lim, with every window's start and crossfade marked) and its spectral flux per frame.

``figures`` generates, for each input, long tracks (``--seeds`` of ``--seconds``) and single
windows (one window each, 1.49 s) with the functions ``make_track`` calls (``invert``,
``merge_latents``, ``decode_latents``, ``track_noise``, ``generate_long``), batched across
requests; one request is also served through the service path and compared with its batched
twin. It prints, with 95 % bootstrap intervals over inputs (the inputs are resampled with
replacement, 2000 times, seeded):

1. spectral flux at the joins / inside the windows (``seam_flux``: median at the joins over the
   median of the pairs inside one window, outside the crossfades, per input), next to the same
   ratio for the input's own render at the same frames (a seamless recording) and for the single
   windows butted together (hard cuts); also against every other pair (crossfades included),
   the crossfades' own flux, and the flux profile around the joins;
2. the spectral flatness of the long tracks' windows, of the single windows and of the corpus;
3. the Fréchet distance in the quality embedding (``AudioEmbedding``) of the long tracks'
   windows (consecutive 64-frame cuts of the served image, ``--windows-per-input`` per input,
   evenly spread over the track) and of as many single windows, each to the held-out corpus
   windows of the other pieces; the floor is the FD of the same number of corpus windows drawn
   the same way (``--inputs`` other held-out renders, ``--windows-per-input`` windows each).

Every random draw is seeded (``--seed``); the load average is printed at the start and the end.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from riffloop.core import RiffloopError, ValidationError  # noqa: E402
from riffloop.music import (  # noqa: E402
    INSTRUMENTS,
    AudioEmbedding,
    AudioLimits,
    CorpusSplit,
    InjectionPlan,
    MelCodec,
    MusicDiffusion,
    TrackLength,
    decode_audio,
    decode_latents,
    frechet_distance,
    generate_long,
    invert,
    load_corpus,
    merge_latents,
    naive_concatenation,
    seam_flux,
    spectral_flatness,
    spectral_flux,
    track_noise,
)
from riffloop.music._corpus import corpus_dir  # noqa: E402

INVERSION_STEPS = 50  # EncoderSettings.inversion_steps
MAX_SLICES = 4  # EncoderSettings.max_slices
# Request seeds. make_track serves the window seed mod #windows of an input's stored latents (4
# for these uploads): seeds ≡ 1 (mod 4) make every long track and every single window of an input
# start from the same merged input x̂_0, so the two arms differ only in how they are windowed.
# Long tracks take 1, 5, 9, …; single windows 1001, 1005, … (never a long track's ε).
SEED_STRIDE = MAX_SLICES
LONG_SEED_BASE = 1
SINGLE_SEED_BASE = 1001


def load_line(label: str) -> str:
    one, five, fifteen = os.getloadavg()
    cpus = os.cpu_count()
    return f"load average {label}: {one:.2f} {five:.2f} {fifteen:.2f} (1/5/15 min; {cpus} CPUs)"


# -- inputs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Input:
    piece: str
    instrument: str
    path: Path

    @property
    def name(self) -> str:
        return f"{self.piece.split('/')[-1].removesuffix('.mxl')}/{self.instrument}"


def heldout_inputs(heldout: CorpusSplit, count: int, min_seconds: float) -> list[Input]:
    """``count`` held-out renders of distinct pieces, taking turns over the instruments (so 8
    gives 2 per instrument), each render at least ``min_seconds`` long; pieces by name."""
    audio_dir = corpus_dir() / "audio"
    pairs = sorted(
        {(heldout.piece_ids[p], heldout.instrument_names[i])
         for p, i in zip(heldout.pieces.tolist(), heldout.instruments.tolist(), strict=True)}
    )  # fmt: skip
    by_instrument: dict[str, list[Input]] = {name: [] for name in INSTRUMENTS}
    for piece, instrument in pairs:
        stem = piece.replace("/", "__").replace(" ", "_")
        path = audio_dir / f"{stem}__{instrument}.flac"
        if path.is_file() and soundfile.info(str(path)).duration >= min_seconds:
            by_instrument[instrument].append(Input(piece, instrument, path))
    chosen: list[Input] = []
    used: set[str] = set()
    while len(chosen) < count:
        before = len(chosen)
        for instrument in INSTRUMENTS:
            free = [i for i in by_instrument[instrument] if i.piece not in used]
            if free and len(chosen) < count:
                chosen.append(free[0])
                used.add(free[0].piece)
        if len(chosen) == before:
            raise ValidationError(
                f"only {len(chosen)} held-out renders of distinct pieces are ≥ {min_seconds:g} s "
                f"(renders in {audio_dir}: bin/riffloop setup builds them)"
            )
    return chosen


def upload_bytes(item: Input, seconds: float, sample_rate: int) -> bytes:
    """The render's first ``seconds`` as FLAC (what a user would upload)."""
    audio, rate = soundfile.read(item.path, dtype="float32")
    if rate != sample_rate or audio.ndim != 1:
        raise ValidationError(f"{item.path}: expected mono {sample_rate} Hz, got {rate} Hz")
    buffer = io.BytesIO()
    soundfile.write(buffer, audio[: int(seconds * rate)], rate, format="FLAC")
    return buffer.getvalue()


def decoded(data: bytes, sample_rate: int) -> np.ndarray:
    """Upload bytes → mono samples, as the encoder decodes them (``decode_mono``)."""
    out = decode_audio(data, AudioLimits(min_seconds=0.0))
    if out.sample_rate != sample_rate:
        raise ValidationError(f"upload at {out.sample_rate} Hz, the model's {sample_rate} Hz")
    return np.asarray(out.samples, dtype=np.float32)


# -- the service path (in-process encoder + generator on in-memory ports) -------------------------


class InProcessStack:
    """The encoder and generator services on in-memory ports, serving ``model``."""

    def __init__(self, model: MusicDiffusion) -> None:
        from riffloop.core import MemoryEventBus, MemoryKeyValueStore, MemoryObjectStore
        from riffloop.runtime import ModelStore, Ports, ServedModel
        from services.encoder import Encoder, EncoderSettings
        from services.generator import Generator, GeneratorSettings

        self.ports = Ports(
            "long-tracks", MemoryEventBus(), MemoryObjectStore(), MemoryKeyValueStore()
        )
        self.ports.prepare()
        store = ModelStore(self.ports.objects)
        store.publish(model)
        store.set_current(model.version)
        self.encoder = Encoder(
            EncoderSettings(inversion_steps=INVERSION_STEPS, max_slices=MAX_SLICES),
            self.ports,
            ServedModel(ModelStore(self.ports.objects), "encoder", canaries=False),
        )
        self.generator = Generator(
            GeneratorSettings(latent_wait_s=0.0, max_track_seconds=60.0),
            self.ports,
            ServedModel(ModelStore(self.ports.objects), "generator"),
        )
        if not (self.encoder.models.load_current() and self.generator.model.load_current()):
            raise ValidationError("the in-process services could not load the model")

    def upload(self, data: bytes) -> str:
        song_id = hashlib.sha256(data).hexdigest()
        self.ports.objects.put("songs", song_id, data)
        self.encoder.encode(song_id)
        return song_id

    def serve(
        self, song_id: str, *, seconds: float, seed: int, similarity: float, quality: int = 0
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """A generated (never baseline) track: its WAV samples and its sidecar."""
        from riffloop.loop import TrackKind
        from services.generator._service import Request

        request = Request(
            f"long-{seed}", (song_id,), similarity, quality, seed, "long-tracks",
            kind=TrackKind.GENERATED, duration_seconds=seconds,
        )  # fmt: skip
        ready = self.generator.make_track(request)
        wav = self.ports.objects.get("tracks", f"{ready.track_id}.wav")
        sidecar = json.loads(self.ports.objects.get("tracks", f"{ready.track_id}.json"))
        samples, _ = soundfile.read(io.BytesIO(wav), dtype="float32")
        return samples, sidecar


# -- the batched path (the functions make_track calls, batched across requests) -------------------


@dataclass(frozen=True)
class EncodedSong:
    """An upload as the encoder stores it: ``count`` evenly spaced windows, of which the
    DDIM-inverted latents of those some request uses (``latents[w]``, ``[C, h, w]``)."""

    count: int
    latents: dict[int, torch.Tensor]


def encode_upload(model: MusicDiffusion, samples: np.ndarray, seeds: list[int]) -> EncodedSong:
    """``Encoder._first_encoding``: windows, up to MAX_SLICES evenly spaced, DDIM-inverted
    (each window independently: only the ones the ``seeds`` pick are inverted here)."""
    images = MelCodec(model.mel).audio_to_images(samples)
    if images.shape[0] == 0:
        raise ValidationError("upload shorter than one mel window")
    n = images.shape[0]
    picks = torch.linspace(0, n - 1, min(n, MAX_SLICES)).round().long().unique()
    needed = sorted({seed % len(picks) for seed in seeds})
    latents = invert(model, images[picks[needed]], INVERSION_STEPS)
    return EncodedSong(len(picks), dict(zip(needed, latents, strict=True)))


def generate_tracks(
    model: MusicDiffusion,
    songs: list[EncodedSong],
    requests: list[tuple[int, int]],
    plan: InjectionPlan,
    length: TrackLength,
    merged_cache: dict[tuple[int, int], torch.Tensor],
) -> torch.Tensor:
    """One track per request (input index, seed), as ``make_track`` makes it: the input's
    window seed mod #windows, z_agg = merge_latents, x̂_0 = decode_latents, ε_k =
    track_noise(seed). x̂_0 depends only on (input, window): each is decoded once
    (``merged_cache``)."""
    seeds = [seed for _, seed in requests]
    keys = [(i, seed % songs[i].count) for i, seed in requests]
    missing = sorted({k for k in keys if k not in merged_cache})
    if missing:
        z_agg = torch.stack([merge_latents(songs[i].latents[w][None]) for i, w in missing])
        for key, image in zip(missing, decode_latents(model, z_agg, INVERSION_STEPS), strict=True):
            merged_cache[key] = image
    merged = torch.stack([merged_cache[k] for k in keys])
    shape = tuple(model.image_shape)
    noise = torch.stack([track_noise(shape, length.windows, seed) for seed in seeds])
    return generate_long(model, merged, plan, length, noise, top_db=model.mel.top_db)


# -- statistics -----------------------------------------------------------------------------------


def bootstrap(groups: int, statistic: Any, *, draws: int, seed: int) -> tuple[float, float, float]:
    """statistic(all group indices) and its 95 % percentile interval over ``draws`` resamples of
    the groups (inputs) with replacement."""
    rng = np.random.default_rng(seed)
    point = float(statistic(np.arange(groups)))
    values = [float(statistic(rng.integers(0, groups, groups))) for _ in range(draws)]
    low, high = np.percentile(values, [2.5, 97.5])
    return point, float(low), float(high)


def jackknife(groups: int, statistic: Any) -> tuple[float, float, float]:
    """statistic(all groups) ± 1.96 jackknife standard errors, leaving out one group at a time:
    SE² = (n − 1)/n · Σ_i (θ_(−i) − θ̄)²."""
    point = float(statistic(np.arange(groups)))
    loo = np.array([statistic(np.delete(np.arange(groups), i)) for i in range(groups)], float)
    se = math.sqrt((groups - 1) / groups * float(((loo - loo.mean()) ** 2).sum()))
    return point, point - 1.96 * se, point + 1.96 * se


def fmt(ci: tuple[float, float, float], digits: int = 3) -> str:
    point, low, high = ci
    return f"{point:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


# -- sheet ----------------------------------------------------------------------------------------


def cmd_sheet(args: argparse.Namespace) -> int:
    print(load_line("at start"), flush=True)
    started = time.perf_counter()
    model = MusicDiffusion.from_pretrained(args.model)
    heldout = load_corpus(corpus_dir() / f"mel-{model.mel.n_mels}x{model.mel.x_res}", "heldout")
    length = TrackLength.for_seconds(args.seconds, model.mel, maximum=60.0)
    upload_seconds = max(args.upload_seconds, length.seconds(model.mel))
    inputs = heldout_inputs(heldout, 8, upload_seconds)
    item = next((i for i in inputs if i.name == args.input), None) if args.input else inputs[0]
    if item is None:
        names = ", ".join(i.name for i in inputs)
        raise ValidationError(f"--input {args.input!r} is not one of the inputs: {names}")
    data = upload_bytes(item, upload_seconds, model.mel.sample_rate)
    stack = InProcessStack(model)
    song_id = stack.upload(data)
    print(
        f"input {item.name} ({item.path.name}): first {upload_seconds:.1f} s uploaded", flush=True
    )
    samples, sidecar = stack.serve(
        song_id, seconds=args.seconds, seed=args.seed, similarity=args.similarity
    )
    served_s = len(samples) / model.mel.sample_rate
    print(
        f"served {served_s:.2f} s: {sidecar['windows']} windows of "
        f"{model.mel.slice_seconds:.2f} s, "
        f"{sidecar['total_steps']} DDIM steps (s = {args.similarity}), seed {args.seed}, "
        f"in {time.perf_counter() - started:.0f} s",
        flush=True,
    )
    args.wav.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(args.wav, samples, model.mel.sample_rate, subtype="PCM_16")
    codec = MelCodec(model.mel)
    track = codec.audio_to_track_image(samples)
    source = codec.audio_to_track_image(decoded(data, model.mel.sample_rate))
    source = source[..., : track.shape[-1]]
    report = seam_flux(track, length)
    print(
        f"served WAV's mel: median flux at the {len(length.joins())} joins {report.join_flux:.4f}, "
        f"inside the windows {report.window_flux:.4f} (ratio {report.ratio:.2f}), inside the "
        f"crossfades {report.blend_flux:.4f}; "
        f"flatness track {float(spectral_flatness(track[None]).mean()):.4f}, "
        f"input {float(spectral_flatness(source[None]).mean()):.4f}"
    )
    # Every window starts from the same merged input x̂_0 at t*: a track that repeated it would
    # show flux correlated with itself at the window step W − o (the input: no such peak)
    step = length.x_res - length.overlap
    print(
        f"flux autocorrelation at the window step ({step} frames): track "
        f"{autocorrelation(spectral_flux(track)[0], step):.3f}, input "
        f"{autocorrelation(spectral_flux(source)[0], step):.3f}; at half the step: track "
        f"{autocorrelation(spectral_flux(track)[0], step // 2):.3f}, input "
        f"{autocorrelation(spectral_flux(source)[0], step // 2):.3f}"
    )
    draw_sheet(track, source, length, model, args, item, report.ratio)
    print(f"wrote {args.wav} and {args.out}")
    print(f"wall {time.perf_counter() - started:.0f} s; {load_line('at end')}")
    return 0


def autocorrelation(series: torch.Tensor, lag: int) -> float:
    """Pearson correlation of a series with itself ``lag`` steps later."""
    x = series.to(torch.float64)
    return float(torch.corrcoef(torch.stack([x[:-lag], x[lag:]]))[0, 1])


def draw_sheet(
    track: torch.Tensor,
    source: torch.Tensor,
    length: TrackLength,
    model: MusicDiffusion,
    args: argparse.Namespace,
    item: Input,
    ratio: float,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hop_s = model.mel.hop_length / model.mel.sample_rate
    frames = track.shape[-1]
    extent = (0.0, frames * hop_s, 0.0, float(model.mel.n_mels))
    fig, axes = plt.subplots(
        3, 1, figsize=(18, 7.5), sharex=True, gridspec_kw={"height_ratios": [3, 3, 1.6]}
    )
    panels = (
        (source, f"input: {item.name} (fluidsynth render, first {source.shape[-1] * hop_s:.0f} s)"),
        (track, f"served track: {length.windows} windows, seed {args.seed}, s = {args.similarity}"),
    )
    for ax, (image, title) in zip(axes[:2], panels, strict=True):
        ax.imshow(
            image[0].numpy(), origin="lower", aspect="auto", cmap="magma", vmin=-1, vmax=1,
            extent=extent, interpolation="nearest",
        )  # fmt: skip
        ax.set_ylabel("mel band")
        ax.set_title(title, fontsize=10, loc="left")
    for start in length.window_starts()[1:]:
        # window k starts at a solid line; its crossfade with window k − 1 ends at the dashed one
        for ax in axes[1:]:
            ax.axvline(start * hop_s, color="cyan", lw=0.7)
            ax.axvline((start + length.overlap) * hop_s, color="cyan", lw=0.7, ls="--")
        axes[2].axvspan(start * hop_s, (start + length.overlap) * hop_s, color="cyan", alpha=0.25)
    flux = spectral_flux(track)[0].numpy()
    axes[2].plot((np.arange(len(flux)) + 1) * hop_s, flux, lw=0.7, color="black")
    axes[2].set_ylabel("flux")
    axes[2].set_xlabel(
        f"seconds (cyan: each window's start, solid, and the end of its {length.overlap}-frame "
        f"crossfade, dashed; "
        f"median flux at the joins / inside the windows {ratio:.2f})"
    )
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    plt.close(fig)


# -- figures --------------------------------------------------------------------------------------


def join_profile(images: torch.Tensor, length: TrackLength) -> dict[int, float]:
    """Median flux of the frame pair ending p frames after each crossfade's first frame
    (p = 0 and p = o are the joins), over every join of every track, each track's flux divided
    by its median inside the windows: where along a join any excess sits."""
    flux = spectral_flux(images[:, 0])  # [B, T − 1], pair i = frames (i, i + 1)
    norm = torch.tensor([seam_flux(image[None], length).window_flux for image in images])
    rel = flux / norm.to(flux.dtype)[:, None]
    starts = length.window_starts()[1:]
    return {
        p: float(torch.stack([rel[:, s + p - 1] for s in starts]).median())
        for p in range(-2, length.overlap + 3)
    }


def cut_windows(image: torch.Tensor, x_res: int) -> torch.Tensor:
    """A long image ``[1, H, T]`` → its ⌊T/W⌋ consecutive W-frame windows ``[n, 1, H, W]``."""
    n = image.shape[-1] // x_res
    return image[..., : n * x_res].reshape(1, image.shape[-2], n, x_res).permute(2, 0, 1, 3)


def cmd_figures(args: argparse.Namespace) -> int:
    for name in ("inputs", "seeds", "windows_per_input", "bootstrap", "floor_draws"):
        if getattr(args, name) < 1:
            raise ValidationError(f"--{name.replace('_', '-')} must be at least 1")
    if args.inputs < 8:
        print("note: fewer than 8 inputs; the intervals will be wide", file=sys.stderr)
    print(load_line("at start"), flush=True)
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    model = MusicDiffusion.from_pretrained(args.model)
    mel = model.mel
    heldout = load_corpus(corpus_dir() / f"mel-{mel.n_mels}x{mel.x_res}", "heldout")
    if heldout.mel != mel:
        raise ValidationError("the corpus was made with another mel config than the model's")
    embedding = AudioEmbedding.load(args.embedding)
    length = TrackLength.for_seconds(args.seconds, mel, maximum=60.0)
    if length.windows < 2:
        raise ValidationError("--seconds must ask for more than one window")
    single = TrackLength.for_seconds(mel.slice_seconds, mel)
    plan = InjectionPlan.from_similarity(args.similarity, args.quality)
    upload_seconds = max(args.upload_seconds, length.seconds(mel))
    inputs = heldout_inputs(heldout, args.inputs, upload_seconds)
    cuts_per_track = length.frames // mel.x_res
    if args.windows_per_input > args.seeds * cuts_per_track:
        raise ValidationError(
            f"--windows-per-input {args.windows_per_input} exceeds the {args.seeds} × "
            f"{cuts_per_track} windows the long tracks of one input hold"
        )
    print(
        f"{len(inputs)} inputs: {', '.join(i.name for i in inputs)}\n"
        f"long tracks: {args.seeds} per input × {length.seconds(mel):.2f} s ({length.windows} "
        f"windows, overlap {length.overlap} frames); single windows: {args.windows_per_input} "
        f"per input; s = {args.similarity}, q = {args.quality} → {plan.total_steps} DDIM steps, "
        f"{plan.denoising_steps} per window; {torch.get_num_threads()} torch threads",
        flush=True,
    )
    uploads = [upload_bytes(i, upload_seconds, mel.sample_rate) for i in inputs]
    songs = [decoded(d, mel.sample_rate) for d in uploads]
    t0 = time.perf_counter()
    long_seeds = [LONG_SEED_BASE + SEED_STRIDE * k for k in range(args.seeds)]
    single_seeds = [SINGLE_SEED_BASE + SEED_STRIDE * k for k in range(args.windows_per_input)]
    latents = [encode_upload(model, s, long_seeds + single_seeds) for s in songs]
    print(f"  encoded {len(inputs)} uploads in {time.perf_counter() - t0:.0f} s", flush=True)

    pairs = [(i, s) for i in range(len(inputs)) for s in long_seeds]
    t0 = time.perf_counter()
    merged_cache: dict[tuple[int, int], torch.Tensor] = {}
    long_images = generate_tracks(model, latents, pairs, plan, length, merged_cache)  # [B, 1, H, T]
    print(f"  {len(pairs)} long tracks in {time.perf_counter() - t0:.0f} s", flush=True)
    single_pairs = [(i, s) for i in range(len(inputs)) for s in single_seeds]
    t0 = time.perf_counter()
    single_images = generate_tracks(
        model, latents, single_pairs, plan, single, merged_cache
    )  # [B, 1, H, W]
    print(f"  {len(single_pairs)} single windows in {time.perf_counter() - t0:.0f} s", flush=True)

    # 1. seams, per input (its tracks pooled), with the render and hard cuts as references
    n_in = len(inputs)
    per = args.seeds
    codec = MelCodec(mel)
    seam_long, seam_render, seam_cut = [], [], []
    hard = TrackLength(windows=args.windows_per_input, x_res=mel.x_res, overlap=0)
    for i in range(n_in):
        seam_long.append(seam_flux(long_images[i * per : (i + 1) * per], length))
        render = codec.audio_to_track_image(songs[i][: length.samples(mel.hop_length)])
        seam_render.append(seam_flux(render, length))
        own = single_images[i * args.windows_per_input : (i + 1) * args.windows_per_input]
        seam_cut.append(seam_flux(naive_concatenation(own), hard))

    def ratio_of(reports: list[Any]) -> Any:
        return lambda idx: np.mean([reports[k].ratio for k in idx])

    boot = {"draws": args.bootstrap, "seed": args.seed}
    seams = {
        "long tracks (joins vs inside the windows)": bootstrap(n_in, ratio_of(seam_long), **boot),
        "input render, same frames": bootstrap(n_in, ratio_of(seam_render), **boot),
        "single windows butted together": bootstrap(n_in, ratio_of(seam_cut), **boot),
    }
    # the earlier reference (every other pair, crossfades included) and the flux profile
    seams_all = bootstrap(
        n_in, lambda idx: np.mean([seam_long[k].ratio_to_others for k in idx]), **boot
    )
    blend = bootstrap(
        n_in,
        lambda idx: np.mean([seam_long[k].blend_flux / seam_long[k].window_flux for k in idx]),
        **boot,
    )
    profile = join_profile(long_images, length)
    seam_means = bootstrap(
        n_in,
        lambda idx: np.mean([seam_long[k].join_mean / seam_long[k].window_mean for k in idx]),
        **boot,
    )

    # 2–3. the long tracks' windows vs single windows: flatness and FD to held-out corpus windows
    cuts = []
    for i in range(n_in):
        windows = torch.cat([cut_windows(long_images[i * per + s], mel.x_res) for s in range(per)])
        pick = torch.linspace(0, windows.shape[0] - 1, args.windows_per_input).round().long()
        cuts.append(windows[pick])
    long_windows = torch.stack(cuts)  # [inputs, k, 1, H, W]
    single_windows = single_images.reshape(n_in, args.windows_per_input, *single_images.shape[1:])
    feats_long = embedding.embed(long_windows.flatten(0, 1)).reshape(
        n_in, args.windows_per_input, -1
    )
    feats_single = embedding.embed(single_windows.flatten(0, 1)).reshape(
        n_in, args.windows_per_input, -1
    )
    flat_long = spectral_flatness(long_windows.flatten(0, 1), top_db=mel.top_db).reshape(n_in, -1)
    flat_single = spectral_flatness(single_windows.flatten(0, 1), top_db=mel.top_db).reshape(
        n_in, -1
    )
    # the reference: held-out windows of every piece that is not an input
    input_pieces = {heldout.piece_ids.index(i.piece) for i in inputs}
    keep = torch.tensor([int(p) not in input_pieces for p in heldout.pieces])
    ref_images = heldout.images[keep]
    ref_feats = embedding.embed(ref_images)
    ref_flat = float(spectral_flatness(ref_images, top_db=mel.top_db).mean())

    def fd_of(feats: torch.Tensor) -> Any:
        return lambda idx: frechet_distance(feats[torch.as_tensor(idx)].flatten(0, 1), ref_feats)

    # FD: the bootstrap's repeated inputs would shrink the covariances (a biased FD), so its
    # spread is the jackknife's over inputs (leave one input out)
    fd_long = jackknife(n_in, fd_of(feats_long))
    fd_single = jackknife(n_in, fd_of(feats_single))
    fd_diff = jackknife(n_in, lambda idx: fd_of(feats_long)(idx) - fd_of(feats_single)(idx))
    flat_l = bootstrap(n_in, lambda idx: flat_long[torch.as_tensor(idx)].mean(), **boot)
    flat_s = bootstrap(n_in, lambda idx: flat_single[torch.as_tensor(idx)].mean(), **boot)
    flat_d = bootstrap(
        n_in,
        lambda idx: (flat_long[torch.as_tensor(idx)] - flat_single[torch.as_tensor(idx)]).mean(),
        **boot,
    )
    floor = corpus_floor(heldout, keep, ref_feats, inputs, args)

    # the service path for one request, against its batched twin
    check = ""
    if not args.skip_service_check:
        t0 = time.perf_counter()
        stack = InProcessStack(model)
        served, _ = stack.serve(
            stack.upload(uploads[0]),
            seconds=args.seconds,
            seed=LONG_SEED_BASE,
            similarity=args.similarity,
            quality=args.quality,
        )
        twin = codec.track_to_audio(long_images[0])
        diff = float(np.abs(served - twin).max()) if served.shape == twin.shape else float("inf")
        check = (
            f"service path check ({inputs[0].name}, seed {LONG_SEED_BASE}): served WAV "
            f"{served.shape[0]} samples (16-bit), batched twin {twin.shape[0]}; "
            f"max |difference| {diff:.2e} of a peak "
            f"{float(np.abs(twin).max()):.2f} "
            f"({time.perf_counter() - t0:.0f} s)"
        )

    n_windows = n_in * args.windows_per_input
    lines = [
        f"| measure | long tracks ({length.seconds(mel):.2f} s) | single windows (1.49 s) | "
        f"reference |",
        "|---|---|---|---|",
        f"| seam flux ratio, median at joins / median inside the windows, mean over inputs | "
        f"{fmt(seams['long tracks (joins vs inside the windows)'], 2)} | hard cuts: "
        f"{fmt(seams['single windows butted together'], 2)} | input render at the same frames: "
        f"{fmt(seams['input render, same frames'], 2)} |",
        f"| seam flux ratio of means | {fmt(seam_means, 2)} | | |",
        f"| seam flux ratio against every other pair, crossfades included (the earlier "
        f"reference) | {fmt(seams_all, 2)} | | |",
        f"| median flux inside the crossfades / inside the windows | {fmt(blend, 2)} | | |",
        f"| spectral flatness (mel), mean of {n_windows} windows | {fmt(flat_l, 4)} | "
        f"{fmt(flat_s, 4)} | held-out corpus windows: {ref_flat:.4f} |",
        f"| flatness long − single | {fmt(flat_d, 4)} | | |",
        f"| FD to held-out corpus ({ref_feats.shape[0]} windows of other pieces), "
        f"{n_windows} windows | {fmt(fd_long, 2)} | {fmt(fd_single, 2)} | "
        f"floor ({args.floor_draws} draws of {n_in} renders × {args.windows_per_input}): "
        f"{floor[0]:.2f} ± {floor[1]:.2f} |",
        f"| FD long − single | {fmt(fd_diff, 2)} | | |",
    ]
    print()
    print("\n".join(lines))
    print(
        "\nintervals: 95 % percentile bootstrap over the inputs "
        f"({args.bootstrap} resamples, seed {args.seed}); FD: ± 1.96 jackknife SE over inputs"
    )
    per_input = [f"{inputs[i].name}: {seam_long[i].ratio:.2f}" for i in range(n_in)]
    print("seam ratio per input: " + ", ".join(per_input))
    print(
        "flux around the joins (frame pair p after each crossfade's first frame; median over "
        "joins and tracks, / the track's median inside its windows): "
        + " ".join(f"{p}:{x:.2f}" for p, x in profile.items())
    )
    if check:
        print(check)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items() if k != "func"},
                    "seams": seams,
                    "seam_ratio_of_means": seam_means,
                    "seam_ratio_to_others": seams_all,
                    "blend_over_window_flux": blend,
                    "join_profile": profile,
                    "flatness_long": flat_l,
                    "flatness_single": flat_s,
                    "flatness_diff": flat_d,
                    "flatness_corpus": ref_flat,
                    "fd_long": fd_long,
                    "fd_single": fd_single,
                    "fd_diff": fd_diff,
                    "fd_floor": floor,
                    "seam_ratio_per_input": {
                        inputs[i].name: seam_long[i].ratio for i in range(n_in)
                    },
                },
                indent=2,
            )
            + "\n"
        )
    print(f"wall {time.perf_counter() - started:.0f} s; {load_line('at end')}")
    return 0


def corpus_floor(
    heldout: CorpusSplit,
    keep: torch.Tensor,
    ref_feats: torch.Tensor,
    inputs: list[Input],
    args: argparse.Namespace,
) -> tuple[float, float]:
    """FD of ``--inputs`` random reference renders × ``--windows-per-input`` random windows each
    against the rest of the reference: the value a generator indistinguishable from the corpus
    would score with the same number and grouping of windows (mean, sd over draws)."""
    renders = heldout.pieces[keep] * len(heldout.instrument_names) + heldout.instruments[keep]
    groups = [
        torch.nonzero(renders == r).flatten()
        for r in renders.unique().tolist()
        if int((renders == r).sum()) >= args.windows_per_input
    ]
    if len(groups) <= len(inputs):
        raise ValidationError("too few held-out renders for the floor")
    gen = torch.Generator().manual_seed(args.seed)
    values = []
    for _ in range(args.floor_draws):
        chosen = torch.randperm(len(groups), generator=gen)[: len(inputs)]
        rows = torch.cat(
            [
                groups[g][torch.randperm(len(groups[g]), generator=gen)[: args.windows_per_input]]
                for g in chosen.tolist()
            ]
        )
        rest = torch.ones(ref_feats.shape[0], dtype=torch.bool)
        rest[rows] = False
        values.append(frechet_distance(ref_feats[rows], ref_feats[rest]))
    return float(np.mean(values)), float(np.std(values))


# -- command line ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "assets" / "base-model")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (1 or 2 here)")
    parser.add_argument("--similarity", type=float, default=0.5, help="s, the client's default")
    parser.add_argument(
        "--upload-seconds", type=float, default=30.0, help="how much of each render is uploaded"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sheet = sub.add_parser("sheet", help="serve one long track and draw its mel sheet")
    sheet.add_argument("--seconds", type=float, default=30.0)
    sheet.add_argument("--seed", type=int, default=1, help="the request's seed (≥ 1)")
    sheet.add_argument("--input", help="an input by name, e.g. bwv123.6/organ (default: the first)")
    sheet.add_argument(
        "--out", type=Path, default=REPO / "docs" / "results" / "long-track-30s-mel.png"
    )
    sheet.add_argument(
        "--wav", type=Path, default=REPO / "out" / "long-tracks" / "long-track-30s.wav"
    )
    sheet.set_defaults(func=cmd_sheet)
    fig = sub.add_parser("figures", help="long tracks vs single windows: seams, flatness, FD")
    fig.add_argument("--seconds", type=float, default=5.9, help="long-track length (5.9: default)")
    fig.add_argument("--inputs", type=int, default=8)
    fig.add_argument("--seeds", type=int, default=2, help="long tracks per input")
    fig.add_argument(
        "--windows-per-input", type=int, default=8,
        help="windows per input on each side (long-track cuts; single windows)",
    )  # fmt: skip
    fig.add_argument("--quality", type=int, default=50, help="q, the generator's default")
    fig.add_argument("--seed", type=int, default=0, help="seeds the bootstrap and the floor")
    fig.add_argument("--bootstrap", type=int, default=2000)
    fig.add_argument("--floor-draws", type=int, default=20)
    fig.add_argument("--embedding", type=Path, default=REPO / "assets" / "quality-embedding")
    fig.add_argument("--json", type=Path, help="also write the figures as JSON")
    fig.add_argument("--skip-service-check", action="store_true")
    fig.set_defaults(func=cmd_figures)
    args = parser.parse_args(argv)
    if not 1 <= args.threads <= 64:
        parser.error("--threads must lie in 1–64")
    if getattr(args, "seed", 1) < 0 or (args.command == "sheet" and args.seed < 1):
        parser.error("--seed must be ≥ 1 for a request (0 lets the service draw one)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    try:
        return int(args.func(args))
    except RiffloopError as exc:
        print(f"error: {exc.reason}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
