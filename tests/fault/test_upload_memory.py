"""One user sends ten concurrent 20 MiB uploads to a gateway process on the real stack (Kafka,
MinIO, Redis): the gateway's memory stays bounded, and the uploads over the per-user cap are
refused cleanly.

Uploads are spooled to disk as they arrive and stored by a streamed multipart put, so what a
gateway holds per upload in flight is a message or two, gRPC's buffers and one 5 MiB S3 part,
not the file; the decode (the part that costs memory) runs in at most
RIFFLOOP_MAX_CONCURRENT_UPLOADS (2) slots. The gateway here lets a user have 8 uploads in flight
(RIFFLOOP_MAX_USER_UPLOADS_IN_FLIGHT; 2 by default), so 8 × 20 MiB = 160 MiB arrive at once, and
the 2 calls beyond are refused with RESOURCE_EXHAUSTED and a reason.

The bound. The gateway's peak resident memory (VmHWM of /proc/<pid>/status) over the run may
exceed its resident memory just before the uploads (VmRSS, after a warm-up upload) by at most
GROWTH_BOUND_MIB: two decodes of a 119 s 44.1 kHz stereo file at once (each peaks at ≈ 15 MiB
measured alone: the file is down-mixed and resampled block by block, riffloop/music/_audio.py,
so what it holds is the 22,050 Hz result, 10 MiB, and its pieces) plus ≈ 20 MiB per stream in
flight (8: gRPC's flow-control buffers, a 5 MiB S3 part and its copy), 190 MiB, with 130 MiB
for what a busier or larger machine adds (measured on the real stack: 65 and 115 MiB here;
with the whole song resampled at once, 141 and 144 MiB; with torchaudio's resampler a decode
peaked at 130 MiB, and growth was 370–430 MiB here and 543 MiB on CI's machine). In all it may
not exceed PEAK_BOUND_MIB, three quarters of the production pod's 2 GiB limit (the process
rests at ≈ 0.8 GiB: torch for the mel images). Holding the uploads in memory instead would add
2 × 20 MiB per upload in flight (the chunks and their joined copy, 320 MiB here, over the
bound): the bound would then grow with the cap, and with the file size.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile

from riffloop.runtime import TokenSigner
from riffloop.v1 import gateway_service_pb2 as pb
from riffloop.v1 import gateway_service_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MiB = 1024 * 1024
UPLOADS = 10
IN_FLIGHT = 8  # the gateway's per-user cap in this test
UPLOAD_LIMIT = 20 * MiB  # RIFFLOOP_MAX_UPLOAD_BYTES' default
CHUNK = 1 * MiB  # what riffloop.client sends per message
# The bounds of the module docstring: 2 × 15 + 8 × 20 MiB with 130 MiB of margin, and 0.75 × 2 GiB.
GROWTH_BOUND_MIB = 320
PEAK_BOUND_MIB = 1536


def _wav_file(path: Path, seed: int) -> Path:
    """Noise, 44.1 kHz stereo 16-bit, just under 20 MiB (≈ 119 s); each seed its own bytes."""
    frames = (UPLOAD_LIMIT - 4096) // 4
    rng = np.random.default_rng(seed)
    with soundfile.SoundFile(
        path, "w", samplerate=44100, channels=2, subtype="PCM_16", format="WAV"
    ) as out:
        for start in range(0, frames, 1 << 20):
            n = min(1 << 20, frames - start)
            out.write(rng.integers(-8000, 8000, size=(n, 2), dtype=np.int16))
    assert path.stat().st_size <= UPLOAD_LIMIT
    return path


def _memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak resident) of a process, in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = int(value.split()[0])
    return out


def _parts(path: Path, go: threading.Event) -> Iterator[pb.UploadSongRequest]:
    """Metadata at once; the bytes once every upload has been started (``go``)."""
    yield pb.UploadSongRequest(metadata=pb.UploadSongMetadata(content_type="audio/wav"))
    if not go.wait(120):
        return
    with path.open("rb") as file:
        while chunk := file.read(CHUNK):
            yield pb.UploadSongRequest(chunk=chunk)


def test_ten_concurrent_20_mib_uploads_of_one_user_stay_within_the_memory_bound(
    service_stack, tmp_path: Path
) -> None:
    stack = service_stack(
        ("gateway",),
        {
            "gateway": {
                "RIFFLOOP_MAX_USER_UPLOADS_IN_FLIGHT": str(IN_FLIGHT),
                # ten uploads at 10 tokens each: the rate limit is not what this test measures
                "RIFFLOOP_RATE_LIMIT_BURST": "200",
                "RIFFLOOP_UPLOAD_SPOOL_DIR": str(tmp_path),
                # as the gateway image sets it (services/gateway/Dockerfile)
                "MALLOC_ARENA_MAX": "2",
            }
        },
    )
    process = stack.state.processes["gateway"]
    token = TokenSigner(stack.state.auth_secret).issue("one-user")
    metadata = (("authorization", f"Bearer {token}"),)
    files = [_wav_file(tmp_path / f"upload-{i}.wav", seed=i) for i in range(UPLOADS)]
    digests = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]

    with grpc.insecure_channel(
        process.target, options=[("grpc.max_send_message_length", 4 * MiB)]
    ) as channel:
        stub = pb_grpc.GatewayServiceStub(channel)
        # warm-up: the decode path's first run (lazy imports, resampler kernels) is not the
        # uploads' memory
        warm = tmp_path / "warm.wav"
        soundfile.write(warm, np.sin(np.arange(88200) / 10.0) * 0.3, 44100, subtype="PCM_16")
        ready = threading.Event()
        ready.set()
        stub.UploadSong(_parts(warm, ready), metadata=metadata, timeout=60)
        before = _memory_kib(process.pid)

        samples: list[int] = []
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.is_set():
                samples.append(_memory_kib(process.pid)["VmRSS"])
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        go = threading.Event()
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=UPLOADS) as pool:
            calls = [
                stub.UploadSong.future(_parts(f, go), metadata=metadata, timeout=300) for f in files
            ]
            # the calls beyond the cap are refused at once; the others wait for their bytes
            deadline = time.monotonic() + 60
            while sum(c.done() for c in calls) < UPLOADS - IN_FLIGHT:
                assert time.monotonic() < deadline, "the calls over the cap were not refused"
                time.sleep(0.05)
            go.set()
            outcomes = list(pool.map(_outcome, calls))
        elapsed = time.monotonic() - started
        sampling.set()
        sampler.join(5)
    after = _memory_kib(process.pid)

    accepted = [(i, o) for i, o in enumerate(outcomes) if isinstance(o, pb.UploadSongResponse)]
    refusals = [o for o in outcomes if isinstance(o, grpc.RpcError)]
    assert len(accepted) == IN_FLIGHT, [error.details() for error in refusals]
    for i, response in accepted:
        assert response.song_id == digests[i]  # stored whole: the id is the bytes' sha256
        assert response.duration_seconds == pytest.approx(118.9, abs=0.5)
    assert len(refusals) == UPLOADS - IN_FLIGHT
    for error in refusals:
        assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"uploads in progress for you: {IN_FLIGHT} (limit {IN_FLIGHT} per user)" in (
            error.details() or ""
        )
        assert dict(error.trailing_metadata() or ())["retry-after-ms"] == "1000"

    growth_mib = (after["VmHWM"] - before["VmRSS"]) / 1024
    peak_mib = after["VmHWM"] / 1024
    print(
        f"\nupload memory: {IN_FLIGHT} × {files[0].stat().st_size / MiB:.2f} MiB accepted "
        f"at once, {len(refusals)} refused, {elapsed:.1f} s; gateway VmRSS before "
        f"{before['VmRSS'] / 1024:.0f} MiB, VmHWM before {before['VmHWM'] / 1024:.0f} MiB, "
        f"VmHWM after {peak_mib:.0f} MiB (growth {growth_mib:.0f} MiB), sampled VmRSS peak "
        f"{max(samples) / 1024:.0f} MiB"
    )
    assert growth_mib <= GROWTH_BOUND_MIB, f"peak grew by {growth_mib:.0f} MiB"
    assert peak_mib <= PEAK_BOUND_MIB, f"peak resident memory {peak_mib:.0f} MiB"


def _outcome(call: grpc.Future) -> pb.UploadSongResponse | grpc.RpcError:
    try:
        response: pb.UploadSongResponse = call.result()
    except grpc.RpcError as error:
        return error
    return response
