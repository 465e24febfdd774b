"""In-process service harness: each service built by its own ``build`` on in-memory ports.

Services share one set of in-memory adapters (bus, object store, key-value store), so events flow
between them as they would through Kafka; each listens on a free loopback port with its own
``/metrics``. Only the services a test module asks for are started.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
import soundfile

from riffloop.client import operator_channel
from riffloop.core import MemoryEventBus, MemoryKeyValueStore, MemoryObjectStore
from riffloop.runtime import Ports, ServiceRuntime, TokenSigner, operator_token
from riffloop.v1 import common_pb2, events_pb2

SECRET = "test-secret-0123456789"
# RIFFLOOP_OPERATOR_SECRET of the internal services; their harness channels carry a token of it.
OPERATOR_SECRET = "test-operator-secret-0123"


def generated_track_ready(
    track_id: str,
    user: str,
    *,
    duration_seconds: float = 6.0,
    model_version: str = "v1",
    audio: common_pb2.ObjectRef | None = None,
) -> events_pb2.TrackReady:
    """A TrackReady for a generated track served to ``user`` (tests and benchmarks)."""
    return events_pb2.TrackReady(
        track_id=track_id,
        user_id=user,
        duration_seconds=duration_seconds,
        audio=audio,
        provenance=common_pb2.TrackProvenance(
            kind=common_pb2.TRACK_KIND_GENERATED,
            model_version=model_version,
            input_song_ids=["a" * 64],
            similarity=0.5,
            quality=5,
        ),
    )


def wav_bytes(
    seconds: float = 2.0, freq: float = 440.0, rate: int = 22050, amplitude: float = 0.3
) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    samples = (amplitude * np.sin(2 * np.pi * freq * t)).astype("float32")
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


@dataclass
class Running:
    name: str
    runtime: ServiceRuntime
    state: Any
    channel: grpc.Channel

    @property
    def port(self) -> int:
        return self.runtime.port

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.runtime.metrics_port}/metrics"


def shared_ports() -> Ports:
    return Ports("test", MemoryEventBus(), MemoryObjectStore(), MemoryKeyValueStore())


def start_service(name: str, ports: Ports, **overrides: Any) -> Running:
    """Build and start one service on free ports (its settings from defaults + overrides)."""
    common: dict[str, Any] = {"grpc_port": 0, "metrics_port": 0, "consumer_poll_timeout_s": 0.05}
    if name != "gateway":
        common["operator_secret"] = OPERATOR_SECRET
    state: Any = None
    own = Ports(name, ports.bus, ports.objects, ports.kv)
    if name == "gateway":
        from services.gateway import GatewaySettings, build

        audio = overrides.pop("audio", None)  # a stand-in for the upload decoder
        settings = GatewaySettings(**common, auth_secret=SECRET, **overrides)
        runtime, state = build(settings, own, audio=audio), own
    elif name == "feedback":
        from services.feedback import FeedbackSettings
        from services.feedback import build as build_feedback

        runtime, state = build_feedback(FeedbackSettings(**common, **overrides), own)
    elif name == "selector":
        from services.selector import SelectorSettings
        from services.selector import build as build_selector

        runtime, state = build_selector(SelectorSettings(**common, **overrides), own)
    elif name == "encoder":
        from services.encoder import EncoderSettings
        from services.encoder import build as build_encoder

        settings_e = EncoderSettings(**common, **{"inversion_steps": 5, **overrides})
        runtime, state = build_encoder(settings_e, own)
    elif name == "generator":
        from services.generator import GeneratorSettings
        from services.generator import build as build_generator

        settings_g = GeneratorSettings(**common, **{"default_quality": 5, **overrides})
        runtime, state = build_generator(settings_g, own)
    elif name == "trainer":
        from services.trainer import TrainerSettings
        from services.trainer import build as build_trainer

        settings_t = TrainerSettings(
            **common,
            **{
                # an untrained tiny model keeps these tests fast (explicitly: it draws noise)
                "untrained_base": True,
                "base_preset": "tiny",
                "finetune_steps": 4,
                "batch_size": 2,
                "gate_mode": "skip",
                **overrides,
            },
        )
        runtime, state = build_trainer(settings_t, own)
    else:
        raise ValueError(name)
    runtime.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{runtime.port}")
    if name != "gateway":  # an operator's channel: the internal RPCs refuse calls without it
        channel = operator_channel("", operator_token(OPERATOR_SECRET, "tests"), channel=channel)
    return Running(name, runtime, state, channel)


def wait_for(predicate: Callable[[], bool], timeout_s: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what or predicate}")


# Fast loop settings for the in-process tests (the tiny model makes each step cheap).
LOOP_OVERRIDES: dict[str, dict[str, Any]] = {
    "gateway": {"rate_limit_burst": 200, "rate_limit_per_s": 100.0},
    "feedback": {"score_interval_s": 0.3},
    "selector": {"select_interval_s": 0.3, "min_new_scores": 2},
    # Promote at once (then watch): a canary needs 20+ ratings a side; test_trainer_canary.py
    # covers the canary itself.
    "trainer": {"canary_share": 0.0},
}


@pytest.fixture(scope="session")
def signer() -> TokenSigner:
    return TokenSigner(SECRET)


@pytest.fixture
def auth(signer: TokenSigner) -> Callable[[str], tuple[tuple[str, str], ...]]:
    def metadata(user: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {signer.issue(user)}"),)

    return metadata


@pytest.fixture(scope="module")
def all_services() -> Iterator[dict[str, Running]]:
    """The six services in one process on shared in-memory ports (a tiny model)."""
    import torch

    torch.set_num_threads(1)
    ports = shared_ports()
    started: dict[str, Running] = {}
    try:
        # The trainer first: it publishes the base model the encoder and generator wait for.
        for name in ("trainer", "gateway", "encoder", "generator", "feedback", "selector"):
            started[name] = start_service(name, ports, **LOOP_OVERRIDES.get(name, {}))
        yield started
    finally:
        for running in started.values():
            running.channel.close()
            running.runtime.stop()
