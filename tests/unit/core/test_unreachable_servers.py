"""A dependency that is down is a TransientError with one sentence, quickly — never a traceback
from a client library, and never a hang (nothing listens on the port used here)."""

from __future__ import annotations

import gc
import logging
import socket
import threading
import time
from collections.abc import Callable

import pytest

from riffloop.core import (
    KafkaEventBus,
    RedisKeyValueStore,
    S3ObjectStore,
    TransientError,
)

pytestmark = pytest.mark.unit


@pytest.fixture
def dead_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _fails_fast(action: Callable[[], object], limit_s: float) -> TransientError:
    started = time.monotonic()
    with pytest.raises(TransientError) as info:
        action()
    assert time.monotonic() - started < limit_s
    assert "\n" not in info.value.reason
    return info.value


def test_redis_down(dead_port: int) -> None:
    store = RedisKeyValueStore.from_url(f"redis://127.0.0.1:{dead_port}/0", timeout_s=1)
    error = _fails_fast(lambda: store.apply_once("k", 10, {"h": {"n": 1}}), 10)
    assert "Redis unreachable" in error.reason
    _fails_fast(store.ping, 10)
    store.close()


def test_s3_down(dead_port: int) -> None:
    store = S3ObjectStore.connect(
        f"http://127.0.0.1:{dead_port}", "key", "secret", timeout_s=1, retries=0
    )
    error = _fails_fast(lambda: store.get("songs", "a.wav"), 10)
    assert "S3 endpoint unreachable" in error.reason
    _fails_fast(lambda: store.put("songs", "a.wav", b"x"), 10)


# kafka-python 3.0.12 starts an IO thread before bootstrapping and does not stop it when bootstrap
# fails; the adapter stops it (riffloop.core.construct_kafka_client). The failed connection
# sockets are still only closed by the garbage collector: collect them inside this test so their
# ResourceWarning is attributed (and filtered) here rather than at the end of the session.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_kafka_down_fails_fast_and_leaks_no_threads(
    dead_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    # kafka-python logs the failures with tracebacks; captured records would keep the sockets.
    caplog.set_level(logging.CRITICAL, logger="kafka")

    def kafka_threads() -> int:
        return sum(1 for t in threading.enumerate() if t.name.startswith("kafka-io"))

    before = kafka_threads()
    bus = KafkaEventBus(f"127.0.0.1:{dead_port}", request_timeout_s=1)
    for _ in range(2):  # e.g. readiness pings during an outage
        error = _fails_fast(lambda: bus.publish_raw("songs.uploaded.v1", "k", b"v"), 15)
        assert "Kafka" in error.reason
        _fails_fast(bus.ping, 15)
    bus.close()
    del error  # its __context__ chain holds the failed client's frames
    gc.collect()
    assert kafka_threads() == before


def test_the_infra_probe_of_an_unready_broker_leaves_no_thread_or_socket_behind(
    dead_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    """`bin/riffloop stack up` and the tests' fixture probe a starting broker until it answers.
    A failed probe's client is stopped and its sockets are collected at once, quietly: under
    the tests' warning filter one left to a later collection failed an unrelated test with its
    ResourceWarning (session 20, a contract test on a loaded machine)."""
    import sys
    import warnings

    from riffloop.infra._servers import kafka_admin_or_none

    caplog.set_level(logging.CRITICAL, logger="kafka")
    before = sum(1 for t in threading.enumerate() if t.name.startswith("kafka-io"))
    gc.collect()
    reported: list[object] = []
    hook = sys.unraisablehook
    sys.unraisablehook = reported.append
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", ResourceWarning)
            for _ in range(2):
                admin = kafka_admin_or_none(
                    bootstrap_servers=f"127.0.0.1:{dead_port}",
                    bootstrap_timeout_ms=1000,
                    request_timeout_ms=1000,
                )
                assert admin is None
            caplog.clear()  # captured records would keep the failed clients' frames
            gc.collect()
    finally:
        sys.unraisablehook = hook
    assert reported == []
    assert sum(1 for t in threading.enumerate() if t.name.startswith("kafka-io")) == before
