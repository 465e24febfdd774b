"""What the rating fault tests share: the tracks they make ready, the calls their listeners make,
and the stars each rating carries (the same on every retry, so a recount can check them)."""

from __future__ import annotations

import io
import random
import zlib

import numpy as np
import soundfile

from riffloop.v1 import common_pb2, events_pb2

VERSION = "v0001"

Unit = tuple[str, list[str]]  # ("rate", [track]) or ("batch", [tracks])


def stars(track_id: str) -> int:
    """The same stars on every try of one rating."""
    return 1 + zlib.crc32(track_id.encode()) % 5


def silent_wav() -> bytes:
    """Half a second of silence: the audio every ready track points at."""
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(11025, dtype="float32"), 22050, format="WAV")
    return buffer.getvalue()


def track_ready(track_id: str, user: str, audio: common_pb2.ObjectRef) -> events_pb2.TrackReady:
    """The generator's TrackReady for a generated track served to ``user`` (no model needed)."""
    return events_pb2.TrackReady(
        track_id=track_id,
        audio=audio,
        provenance=common_pb2.TrackProvenance(
            kind=common_pb2.TRACK_KIND_GENERATED,
            model_version=VERSION,
            input_song_ids=["a" * 64],
            similarity=0.5,
            quality=5,
        ),
        user_id=user,
        duration_seconds=0.5,
    )


def rating_calls(
    user_tracks: list[str], seed: int, *, unary_share: float, batch: int
) -> list[Unit]:
    """A listener's ratings as calls in a random order: ``unary_share`` of them one Rate call
    each, the rest SubmitFeedback calls of ``batch`` items."""
    draw = random.Random(seed)
    order = list(user_tracks)
    draw.shuffle(order)
    singles = int(len(order) * unary_share)
    rest = order[singles:]
    units: list[Unit] = [("rate", [t]) for t in order[:singles]]
    units += [("batch", rest[i : i + batch]) for i in range(0, len(rest), batch)]
    draw.shuffle(units)
    return units
