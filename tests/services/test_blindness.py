"""A client cannot tell a baseline from a generation by anything it receives.

The paper's comparison is blind: 25 % of requests get the baseline z0 instead of a generation,
and the listener must not know which. Here a client asks for tracks through the gateway of the
in-process services (tiny model) and records everything it is given — ids, every field of the
track, the audio's size, the time until the track is ready — while the test reads each track's
kind from the generator's sidecar, which no client can reach. Every observable must be the same
for both kinds: ids of one form, equal fields and sizes, and ready delays from one distribution.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator

import pytest
from scipy import stats

from riffloop.client import GatewayClient
from riffloop.runtime import TokenSigner
from tests.services.conftest import (
    LOOP_OVERRIDES,
    SECRET,
    Running,
    shared_ports,
    start_service,
    wav_bytes,
)

pytestmark = [pytest.mark.contract, pytest.mark.slow]


@pytest.fixture(scope="module")
def services() -> Iterator[dict[str, Running]]:
    import torch

    torch.set_num_threads(1)
    ports = shared_ports()
    started: dict[str, Running] = {}
    try:
        for name in ("trainer", "gateway", "encoder", "generator"):
            overrides = LOOP_OVERRIDES.get(name, {})
            if name == "gateway":  # polled every 10 ms: the delays are measured that finely
                overrides = {"rate_limit_per_s": 1000.0, "rate_limit_burst": 2000}
            started[name] = start_service(name, ports, **overrides)
        yield started
    finally:
        for running in started.values():
            running.channel.close()
            running.runtime.stop()


def test_ids_fields_sizes_and_ready_delays_do_not_tell_the_kinds_apart(
    services: dict[str, Running],
) -> None:
    gateway = services["gateway"]
    client = GatewayClient(f"127.0.0.1:{gateway.port}", TokenSigner(SECRET).issue("eve"))
    songs = [client.upload_song(wav_bytes(3.0, f)).song_id for f in (220.0, 330.0, 495.0)]
    seen: dict[str, dict[str, object]] = {}
    for i in range(44):
        pair = [songs[i % 3], songs[(i + 1) % 3]]
        asked = time.perf_counter()
        track_id = client.generate(pair, similarity=0.5, quality=5)
        info = client.wait_ready(track_id, timeout_s=120, poll_s=0.01)
        delay = time.perf_counter() - asked
        seen[track_id] = {"info": info, "delay": delay, "size": len(client.audio(track_id))}
    objects = gateway.state.objects
    kinds = {t: json.loads(objects.get("tracks", f"{t}.json"))["provenance"]["kind"] for t in seen}
    baselines = [t for t, k in kinds.items() if k == "baseline"]
    generated = [t for t, k in kinds.items() if k == "generated"]
    assert len(baselines) >= 4 and len(generated) >= 4, kinds  # P(fewer) < 1e-3 at p = 0.25

    # 1. Ids: one form (20 hex characters), whatever the kind.
    assert all(re.fullmatch(r"[0-9a-f]{20}", t) for t in seen)

    # 2. Every field a client receives, but the id and the request time, and the audio's size.
    def observable(t: str) -> tuple[object, ...]:
        info = seen[t]["info"]
        return (info.status, info.duration_seconds, info.size_bytes, seen[t]["size"])

    assert {observable(t) for t in baselines} == {observable(t) for t in generated}
    # 3. Ready delays: one distribution (two-sided Mann-Whitney U; served at once, the
    # baselines came back in a fraction of a generation's time and p was < 1e-4).
    b = [float(seen[t]["delay"]) for t in baselines]  # type: ignore[arg-type]
    g = [float(seen[t]["delay"]) for t in generated]  # type: ignore[arg-type]
    p = stats.mannwhitneyu(b, g, alternative="two-sided").pvalue
    assert p > 0.001, (sorted(b), sorted(g), p)
