"""Is what a running stack serves music-like? (issue 22: the default model, not noise)

    bin/riffloop stack up
    bin/riffloop python scripts/stack_music_check.py [--song FILE] [--tracks 3]

Uploads a real recording (a corpus render by default) through the gateway, asks for tracks with
the server's defaults, and prints each track's spectral flatness next to the same measure of
corpus recordings sent through the same Griffin-Lim round trip (mel → audio → mel), so both sides
carry the phase-reconstruction floor. Noise scores ≈ 0.3 here; the corpus 0.01–0.1.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import soundfile

from riffloop.client import GatewayClient
from riffloop.music import MelCodec, MelConfig, spectral_flatness
from riffloop.music._corpus import corpus_dir
from riffloop.runtime import TokenSigner

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--song", type=Path, help="audio file to upload (default: a corpus render)")
    parser.add_argument("--tracks", type=int, default=3)
    parser.add_argument("--state", type=Path, default=REPO / ".riffloop" / "stack" / "state.json")
    args = parser.parse_args()
    state = json.loads(args.state.read_text())
    target = f"127.0.0.1:{state['processes']['gateway']['grpc_port']}"
    client = GatewayClient(target, TokenSigner(state["auth_secret"]).issue("check"), timeout_s=60)
    mel = MelConfig.from_dict(json.loads((REPO / "assets/base-model/mel_config.json").read_text()))
    codec = MelCodec(mel)

    def flatness(samples: np.ndarray) -> float:
        return float(spectral_flatness(codec.audio_to_images(samples)).mean())

    def round_trip(samples: np.ndarray) -> np.ndarray:
        return np.concatenate(list(codec.images_to_audio(codec.audio_to_images(samples))))

    renders = sorted((corpus_dir() / "audio").glob("*.flac"))[:3]
    song = args.song or renders[0]
    audio, rate = soundfile.read(song, dtype="float32")
    buffer = io.BytesIO()
    soundfile.write(buffer, audio[: 20 * rate], rate, format="FLAC")
    song_id = client.upload_song(buffer.getvalue()).song_id
    served = []
    for seed in range(1, args.tracks + 1):
        track = client.generate([song_id], similarity=0.5, seed=seed)
        info = client.wait_ready(track, timeout_s=600)
        samples, _ = soundfile.read(io.BytesIO(client.audio(track)), dtype="float32")
        served.append(flatness(samples))
        print(f"track {track}: {info.duration_seconds:.2f} s, flatness {served[-1]:.4f}")
    reference = []
    for path in renders:
        samples, sr = soundfile.read(path, dtype="float32")
        reference.append(flatness(round_trip(samples[: 20 * sr])))
        print(f"corpus {path.name} after the Griffin-Lim round trip: {reference[-1]:.4f}")
    print(
        f"served mean {np.mean(served):.4f}; corpus mean {np.mean(reference):.4f} "
        f"(range {min(reference):.4f}–{max(reference):.4f}); "
        f"ratio {np.mean(served) / np.mean(reference):.2f}"
    )


if __name__ == "__main__":
    main()
