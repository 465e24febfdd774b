"""The base-model training corpus: music21's bundled scores rendered to audio, sliced into mels.

Steps (``build_corpus``), each idempotent:

1. Pick pieces from music21's corpus (Bach chorales plus the other composers it ships), a fixed,
   seeded choice, and split them train / held-out *by piece*, so no held-out window shares a piece
   with a training window.
2. Render every (piece, instrument) pair: music21 → MIDI with every program change set to the
   General MIDI instrument and an all-notes-off (CC 123) at the end of each track → ``fluidsynth
   -ni -F out.wav -r 22050 FluidR3_GM.sf2 in.mid`` under a timeout (a few pieces hang) → mono
   FLAC under ``<cache>/corpus-<version>/audio/``. Two worker processes.
3. Slice each render into mel windows (``MelCodec``), drop near-silent windows, and save per split
   ``mel-<n_mels>x<x_res>/<split>.pt`` (float16 images, piece / instrument / window indices) and,
   last, ``manifest.json`` — its presence marks the mel set complete.

The instrument label of each window is kept (``CorpusSplit.instruments``) so an instrument
classifier can be trained on it.
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import os
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
import torch

from riffloop.core import NotFoundError, PermanentError, ValidationError
from riffloop.music._mel import MelCodec, MelConfig

__all__ = [
    "CORPUS_VERSION",
    "INSTRUMENTS",
    "CorpusPiece",
    "CorpusSplit",
    "build_corpus",
    "corpus_dir",
    "default_cache_dir",
    "load_corpus",
    "pack_corpus",
    "select_pieces",
]

CORPUS_VERSION = "v1"
SOUNDFONT = Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")

# General MIDI programs (0-based): the instrument labels of the corpus.
INSTRUMENTS: dict[str, int] = {
    "piano": 0,  # Acoustic Grand Piano
    "organ": 19,  # Church Organ
    "strings": 48,  # String Ensemble 1
    "flute": 73,  # Flute
}

# How many pieces per music21 composer folder (a seeded sample of the folder's scores).
_COMPOSERS: dict[str, int] = {
    "bach": 110,
    "monteverdi": 16,
    "palestrina": 16,
    "trecento": 12,
    "beethoven": 4,
    "mozart": 6,
    "haydn": 5,
    "schumann_robert": 4,
    "schumann_clara": 3,
    "josquin": 4,
    "handel": 1,
    "corelli": 1,
    "cpebach": 1,
    "chopin": 1,
    "joplin": 1,
    "schubert": 1,
    "weber": 1,
    "verdi": 1,
    "beach": 1,
    "liliuokalani": 1,
    "johnson_j_r": 1,
}
_INSTRUMENTS_PER_PIECE = 2
_HELDOUT_FRACTION = 0.12
_MAX_RENDER_SECONDS = 75.0
_RENDER_TIMEOUT_S = 120.0
# A window whose RMS is below this (≈ −60 dBFS) is silence, not music.
_SILENCE_RMS = 1e-3
_MAX_COMPACT_BYTES = 24_000
_MAX_XML_BYTES = 640_000
_SCORE_SUFFIXES = (".mxl", ".xml", ".musicxml", ".krn", ".mid", ".midi", ".abc", ".rntxt")

Progress = Callable[[str], None]


def default_cache_dir() -> Path:
    """``RIFFLOOP_CACHE``, else ``$XDG_CACHE_HOME/riffloop``, else ``~/.cache/riffloop``."""
    explicit = os.environ.get("RIFFLOOP_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "riffloop"


def corpus_dir(cache: Path | None = None, version: str = CORPUS_VERSION) -> Path:
    return (cache or default_cache_dir()) / f"corpus-{version}"


@dataclass(frozen=True)
class CorpusPiece:
    """One score: ``piece_id`` is its path inside music21's corpus, e.g. ``bach/bwv66.6.mxl``."""

    piece_id: str
    composer: str
    split: str  # "train" or "heldout"
    instruments: tuple[str, ...]

    def render_name(self, instrument: str) -> str:
        stem = self.piece_id.replace("/", "__").replace(" ", "_")
        return f"{stem}__{instrument}.flac"


PACKED_SUFFIX = ".u8.pt.xz"


@dataclass(frozen=True)
class CorpusSplit:
    """The mel windows of one split. ``pieces[i]`` / ``instruments[i]`` index
    ``piece_ids`` / ``instrument_names``; ``windows[i]`` is the window's position in its render."""

    images: torch.Tensor  # [N, 1, n_mels, x_res] float32 in [−1, 1]
    pieces: torch.Tensor  # [N] int64
    instruments: torch.Tensor  # [N] int64
    windows: torch.Tensor  # [N] int64
    piece_ids: tuple[str, ...]
    instrument_names: tuple[str, ...]
    mel: MelConfig

    def __len__(self) -> int:
        return int(self.images.shape[0])


def _parse_is_cheap(path: Path) -> bool:
    """music21 needs about a minute to parse a 40 KB .mxl string quartet movement on this
    machine; the corpus keeps scores below these sizes (plain MusicXML vs the compact formats:
    compressed .mxl, Humdrum, ABC)."""
    limit = _MAX_XML_BYTES if path.suffix in (".xml", ".musicxml") else _MAX_COMPACT_BYTES
    return path.stat().st_size <= limit


def select_pieces(seed: int = 0) -> list[CorpusPiece]:
    """The corpus's pieces, their split and instruments — a pure function of ``seed`` and the
    music21 corpus contents."""
    from music21 import corpus as m21corpus

    rng = random.Random(seed)
    m21root = Path(m21corpus.__file__).parent
    by_composer: dict[str, list[str]] = {}
    for path in m21corpus.getPaths():
        rel = str(path).split("/corpus/", 1)[1]
        composer = rel.split("/", 1)[0]
        if composer not in _COMPOSERS or not rel.endswith(_SCORE_SUFFIXES):
            continue
        if composer == "bach" and not Path(rel).name.startswith("bwv"):
            continue
        by_composer.setdefault(composer, []).append(rel)
    chosen: list[tuple[str, str]] = []
    for composer, count in _COMPOSERS.items():
        candidates = sorted(by_composer.get(composer, []))
        rng.shuffle(candidates)
        small = [rel for rel in candidates if _parse_is_cheap(m21root / rel)]
        chosen.extend((composer, rel) for rel in small[:count])
    # Held-out pieces: a seeded fraction of every composer with ≥ 4 pieces, so both splits span
    # the styles; composers with fewer pieces stay in training.
    heldout: set[str] = set()
    for composer in _COMPOSERS:
        rels = [rel for c, rel in chosen if c == composer]
        if len(rels) >= 4:
            k = max(1, round(len(rels) * _HELDOUT_FRACTION))
            heldout.update(rng.sample(rels, k))
    names = list(INSTRUMENTS)
    pieces = []
    for i, (composer, rel) in enumerate(chosen):
        # Rotate through the instruments so every label gets about the same number of renders.
        instruments = tuple(names[(i + j) % len(names)] for j in range(_INSTRUMENTS_PER_PIECE))
        split = "heldout" if rel in heldout else "train"
        pieces.append(CorpusPiece(rel, composer, split, instruments))
    return pieces


# -- rendering -------------------------------------------------------------------------------


def _load_score(piece_id: str) -> Any:
    from music21 import corpus as m21corpus
    from music21 import stream

    parsed = m21corpus.parse(piece_id)
    if isinstance(parsed, stream.Opus):
        parsed = parsed.scores[0]
    return parsed


def _score_to_midi(score: Any, program: int, midi_path: Path) -> None:
    from music21 import midi

    mf = midi.translate.streamToMidiFile(score)
    for track in mf.tracks:
        channels: set[int] = set()
        for event in track.events:
            if isinstance(event, midi.MidiEvent) and event.channel is not None:
                if event.type == midi.ChannelVoiceMessages.PROGRAM_CHANGE:
                    event.data = program
                if isinstance(event.type, midi.ChannelVoiceMessages):
                    channels.add(event.channel)
        if not channels:
            continue
        # Every voice starts with the instrument's program and ends with all-notes-off (CC 123)
        # right before END_OF_TRACK, so a hanging note cannot sustain the render forever.
        head: list[Any] = []
        tail: list[Any] = []
        for channel in sorted(channels):
            head += _channel_event(
                track, midi.ChannelVoiceMessages.PROGRAM_CHANGE, channel, program
            )
            tail += _channel_event(track, midi.ChannelVoiceMessages.CONTROLLER_CHANGE, channel, 123)
        end = len(track.events) - 2  # [..., DeltaTime, END_OF_TRACK]
        track.events = head + track.events[:end] + tail + track.events[end:]
    mf.open(str(midi_path), "wb")
    try:
        mf.write()
    finally:
        mf.close()


def _channel_event(track: Any, kind: Any, channel: int, value: int) -> list[Any]:
    from music21 import midi

    delta = midi.DeltaTime(track, time=0, channel=channel)
    event = midi.MidiEvent(track, type=kind, channel=channel)
    if kind == midi.ChannelVoiceMessages.PROGRAM_CHANGE:
        event.data = value
    else:
        event.parameter1 = value
        event.parameter2 = 0
    return [delta, event]


def _render_piece(
    piece_id: str, instruments: tuple[str, ...], out_paths: tuple[str, ...], sample_rate: int
) -> dict[str, Any]:
    """Worker: parse the score once, then per instrument MIDI → fluidsynth WAV → mono FLAC
    (≤ _MAX_RENDER_SECONDS). Returns per-instrument results."""
    started = time.monotonic()
    try:
        score = _load_score(piece_id)
    except Exception as exc:  # music21 raises many types for unreadable scores
        error = f"score: {type(exc).__name__}: {exc}"[:300]
        return {inst: {"ok": False, "error": error} for inst in instruments}
    results: dict[str, Any] = {}
    for inst, out_path in zip(instruments, out_paths, strict=True):
        results[inst] = _render_instrument(score, inst, Path(out_path), sample_rate)
        results[inst]["wall"] = time.monotonic() - started
    return results


def _render_instrument(score: Any, instrument: str, out: Path, sample_rate: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="riffloop-render-") as tmp:
        midi_path = Path(tmp) / "in.mid"
        wav_path = Path(tmp) / "out.wav"
        try:
            _score_to_midi(score, INSTRUMENTS[instrument], midi_path)
        except Exception as exc:  # music21's MIDI translation fails on a few scores
            return {"ok": False, "error": f"midi: {type(exc).__name__}: {exc}"[:300]}
        command = [
            "fluidsynth",
            "-ni",
            "-q",
            "-F",
            str(wav_path),
            "-r",
            str(sample_rate),
            str(SOUNDFONT),
            str(midi_path),
        ]
        try:
            subprocess.run(
                command, check=True, capture_output=True, timeout=_RENDER_TIMEOUT_S, text=True
            )
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"fluidsynth timed out after {_RENDER_TIMEOUT_S:.0f} s"}
        except subprocess.CalledProcessError as exc:
            return {"ok": False, "error": f"fluidsynth failed: {exc.stderr[-300:]}"}
        audio, rate = soundfile.read(wav_path, dtype="float32", always_2d=True)
        if rate != sample_rate:
            return {"ok": False, "error": f"fluidsynth wrote {rate} Hz, not {sample_rate}"}
        mono = audio.mean(axis=1)[: int(_MAX_RENDER_SECONDS * sample_rate)]
        tmp_out = out.with_suffix(".tmp.flac")
        soundfile.write(tmp_out, mono, sample_rate, subtype="PCM_16")
        tmp_out.replace(out)
    return {"ok": True, "seconds": len(mono) / sample_rate}


def _render_all(
    pieces: list[CorpusPiece], audio_dir: Path, sample_rate: int, workers: int, progress: Progress
) -> dict[str, str]:
    audio_dir.mkdir(parents=True, exist_ok=True)
    failed_file = audio_dir / "failed.json"
    failed: dict[str, str] = json.loads(failed_file.read_text()) if failed_file.exists() else {}
    todo: list[tuple[CorpusPiece, tuple[str, ...]]] = []
    for p in pieces:
        missing = tuple(
            inst
            for inst in p.instruments
            if not (audio_dir / p.render_name(inst)).exists() and p.render_name(inst) not in failed
        )
        if missing:
            todo.append((p, missing))
    total = sum(len(p.instruments) for p in pieces)
    n_todo = sum(len(m) for _, m in todo)
    progress(f"render: {total - n_todo}/{total} renders cached, {n_todo} to do")
    if todo:
        started = time.monotonic()
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {
                pool.submit(
                    _render_piece,
                    p.piece_id,
                    missing,
                    tuple(str(audio_dir / p.render_name(inst)) for inst in missing),
                    sample_rate,
                ): p
                for p, missing in todo
            }
            for done, future in enumerate(as_completed(futures), start=1):
                piece = futures[future]
                for inst, result in future.result().items():
                    if not result["ok"]:
                        failed[piece.render_name(inst)] = result["error"]
                        failed_file.write_text(json.dumps(failed, indent=1, sort_keys=True))
                        status = f"FAILED ({result['error'][:80]})"
                    else:
                        status = f"{result['seconds']:.0f} s audio"
                    elapsed = time.monotonic() - started
                    progress(
                        f"render {done}/{len(todo)} [{elapsed:.0f} s] {piece.piece_id} {inst}: "
                        f"{status}"
                    )
    return failed


# -- slicing ---------------------------------------------------------------------------------


def _mel_dir(root: Path, mel: MelConfig) -> Path:
    return root / f"mel-{mel.n_mels}x{mel.x_res}"


def _fingerprint(pieces: list[CorpusPiece], mel: MelConfig) -> str:
    blob = json.dumps(
        {
            "pieces": [(p.piece_id, p.split, p.instruments) for p in pieces],
            "mel": mel.to_dict(),
            "silence_rms": _SILENCE_RMS,
            "max_seconds": _MAX_RENDER_SECONDS,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _slice_all(
    pieces: list[CorpusPiece],
    audio_dir: Path,
    failed: dict[str, str],
    mel: MelConfig,
    out_dir: Path,
    progress: Progress,
) -> dict[str, Any]:
    codec = MelCodec(mel)
    piece_ids = [p.piece_id for p in pieces]
    names = list(INSTRUMENTS)
    per_split: dict[str, dict[str, list[Any]]] = {
        s: {"images": [], "pieces": [], "instruments": [], "windows": []}
        for s in ("train", "heldout")
    }
    dropped_silent = 0
    for i, piece in enumerate(pieces):
        for inst in piece.instruments:
            path = audio_dir / piece.render_name(inst)
            if piece.render_name(inst) in failed or not path.exists():
                continue
            audio, _ = soundfile.read(path, dtype="float32")
            n = codec.count_windows(len(audio))
            if n == 0:
                continue
            frames = audio[: n * mel.slice_samples].reshape(n, mel.slice_samples)
            keep = np.sqrt((frames.astype(np.float64) ** 2).mean(axis=1)) >= _SILENCE_RMS
            dropped_silent += int((~keep).sum())
            if not keep.any():
                continue
            images = codec.audio_to_images(audio)[torch.from_numpy(keep)]
            bucket = per_split[piece.split]
            bucket["images"].append(images.to(torch.float16))
            idx = np.flatnonzero(keep)
            bucket["pieces"].append(torch.full((len(idx),), i, dtype=torch.int64))
            bucket["instruments"].append(
                torch.full((len(idx),), names.index(inst), dtype=torch.int64)
            )
            bucket["windows"].append(torch.from_numpy(idx.astype(np.int64)))
        if (i + 1) % 25 == 0 or i + 1 == len(pieces):
            progress(f"mel: {i + 1}/{len(pieces)} pieces sliced")
    out_dir.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    for split, bucket in per_split.items():
        if not bucket["images"]:
            raise PermanentError(f"corpus has no {split} windows (all renders failed?)")
        payload = {key: torch.cat(value) for key, value in bucket.items()}
        counts[split] = int(payload["images"].shape[0])
        tmp = out_dir / f".{split}.pt.tmp"
        torch.save(payload, tmp)
        tmp.replace(out_dir / f"{split}.pt")
    return {
        "piece_ids": piece_ids,
        "instrument_names": names,
        "windows": counts,
        "dropped_silent_windows": dropped_silent,
    }


def build_corpus(
    cache: Path | None = None,
    mel: MelConfig | None = None,
    *,
    seed: int = 0,
    workers: int = 2,
    limit: int | None = None,
    progress: Progress = print,
) -> Path:
    """Render and slice the corpus (skipping whatever is already there); returns the mel folder.

    ``limit`` keeps only the first pieces of the selection (for smoke tests); a limited corpus
    goes to its own folder so it never masquerades as the full one."""
    if shutil.which("fluidsynth") is None:
        raise PermanentError("fluidsynth is not installed (Debian: apt-get install fluidsynth)")
    if not SOUNDFONT.exists():
        raise PermanentError(f"soundfont {SOUNDFONT} missing (Debian: fluid-soundfont-gm)")
    if workers < 1:
        raise ValidationError("workers must be at least 1")
    mel = mel or MelConfig()
    pieces = select_pieces(seed)
    version = CORPUS_VERSION
    if limit is not None:
        if limit < 2:
            raise ValidationError("limit must be at least 2 (one train and one held-out piece)")
        train = [p for p in pieces if p.split == "train"][: limit - limit // 4]
        heldout = [p for p in pieces if p.split == "heldout"][: max(1, limit // 4)]
        pieces = train + heldout
        version = f"{CORPUS_VERSION}-limit{limit}"
    root = corpus_dir(cache, version)
    out_dir = _mel_dir(root, mel)
    manifest_path = out_dir / "manifest.json"
    fingerprint = _fingerprint(pieces, mel)
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("fingerprint") == fingerprint:
            progress(f"corpus: {out_dir} is complete ({manifest['windows']} windows), skipping")
            return out_dir
        progress("corpus: manifest fingerprint differs, rebuilding the mel set")
    started = time.monotonic()
    failed = _render_all(pieces, root / "audio", mel.sample_rate, workers, progress)
    stats = _slice_all(pieces, root / "audio", failed, mel, out_dir, progress)
    manifest = {
        "version": version,
        "fingerprint": fingerprint,
        "seed": seed,
        "mel": mel.to_dict(),
        "soundfont": str(SOUNDFONT),
        "instruments": INSTRUMENTS,
        "pieces": [
            {
                "id": p.piece_id,
                "composer": p.composer,
                "split": p.split,
                "instruments": p.instruments,
            }
            for p in pieces
        ],
        "failed_renders": failed,
        "build_seconds": round(time.monotonic() - started, 1),
        **stats,
    }
    tmp = out_dir / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(manifest_path)
    progress(
        f"corpus: {stats['windows']} windows ({len(failed)} failed renders, "
        f"{stats['dropped_silent_windows']} silent windows dropped) in {out_dir}"
    )
    return out_dir


def load_corpus(mel_dir: Path, split: str = "train") -> CorpusSplit:
    """Read one split (``train`` or ``heldout``) of a built corpus's mel folder, or of a packed
    copy of it (:func:`pack_corpus`)."""
    if split not in ("train", "heldout"):
        raise ValidationError(f"split must be 'train' or 'heldout', got {split!r}")
    manifest_path = Path(mel_dir) / "manifest.json"
    if not manifest_path.exists():
        raise NotFoundError(
            f"no complete corpus at {mel_dir} (run `python -m riffloop.music corpus`)"
        )
    manifest = json.loads(manifest_path.read_text())
    packed = Path(mel_dir) / f"{split}{PACKED_SUFFIX}"
    if packed.exists():
        payload = torch.load(io.BytesIO(lzma.decompress(packed.read_bytes())), weights_only=True)
        # Code k ∈ {0…255} stands for k / 127.5 − 1 (the window's dB scale in [−1, 1]).
        images = payload["images"].to(torch.float32) / 127.5 - 1.0
    else:
        payload = torch.load(Path(mel_dir) / f"{split}.pt", weights_only=True)
        images = payload["images"].to(torch.float32)
    return CorpusSplit(
        images=images,
        pieces=payload["pieces"],
        instruments=payload["instruments"],
        windows=payload["windows"],
        piece_ids=tuple(manifest["piece_ids"]),
        instrument_names=tuple(manifest["instrument_names"]),
        mel=MelConfig.from_dict(manifest["mel"]),
    )


def pack_corpus(mel_dir: Path, out_dir: Path, splits: tuple[str, ...] = ("train",)) -> Path:
    """A compact copy of a corpus mel folder for carrying to another machine (a GPU box that
    cannot reach this cache): each split's windows quantised to 8 bits (step 2/255 of the
    [−1, 1] scale, ≤ 0.16 dB of the 80 dB range) and xz-compressed; the 64×64 training split
    shrinks from 89 MB to ≈ 30 MB. :func:`load_corpus` reads it like the original; the
    manifest records the encoding so a model trained on it says so in its card."""
    manifest_path = Path(mel_dir) / "manifest.json"
    if not manifest_path.exists():
        raise NotFoundError(
            f"no complete corpus at {mel_dir} (run `python -m riffloop.music corpus`)"
        )
    manifest = json.loads(manifest_path.read_text())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split in splits:
        payload = torch.load(Path(mel_dir) / f"{split}.pt", weights_only=True)
        codes = torch.round((payload["images"].to(torch.float32) + 1.0) * 127.5)
        payload["images"] = codes.clamp(0, 255).to(torch.uint8)
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        (out_dir / f"{split}{PACKED_SUFFIX}").write_bytes(
            lzma.compress(buffer.getvalue(), preset=6)
        )
    manifest["encoding"] = "uint8-xz"
    manifest["packed_splits"] = list(splits)
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return out_dir
