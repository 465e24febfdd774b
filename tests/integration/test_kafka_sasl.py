"""The Kafka adapter through a SASL/SCRAM-SHA-512 listener of a real broker.

The broker is one of its own (``riffloop.infra.standalone_kafka``: own ports, own temporary
folder, its SCRAM user created at format time), so the shared stack's broker stays PLAINTEXT and
the other tests never see it.
"""

from __future__ import annotations

import gc
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest

from riffloop.core import (
    ConfigurationError,
    KafkaEventBus,
    KafkaSecurity,
    Settings,
    new_envelope,
)
from riffloop.v1 import events_pb2

if TYPE_CHECKING:
    from riffloop.infra import ScramUser
    from riffloop.infra._servers import KafkaServer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sasl_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaServer]:
    from riffloop.infra import InfraError, ScramUser, standalone_kafka

    user = ScramUser("riffloop-sasl-test", secrets.token_urlsafe(24))
    try:
        with standalone_kafka(tmp_path_factory.mktemp("kafka-sasl"), scram=user) as server:
            yield server
    except InfraError as error:
        pytest.fail(error.reason, pytrace=False)


def _user(server: KafkaServer) -> ScramUser:
    assert server.scram is not None
    return server.scram


def test_publish_and_consume_through_sasl_scram(
    sasl_broker: KafkaServer, unique_name: Callable[[str], str]
) -> None:
    # the way a service gets there: RIFFLOOP_* settings -> KafkaEventBus.from_settings
    settings = Settings.from_env(
        {
            "RIFFLOOP_SERVICE_NAME": "sasl-test",
            "RIFFLOOP_KAFKA_BOOTSTRAP": sasl_broker.address,
            **_user(sasl_broker).settings_env(),
        }
    )
    assert settings.describe()["kafka_sasl_password"] == "****"
    bus = KafkaEventBus.from_settings(settings)
    topic, group = unique_name("sasl"), unique_name("group")
    try:
        bus.ensure_topics([topic], partitions=1)
        scored = events_pb2.TrackScored(track_id="t-sasl", rating_count=1)
        envelope = new_envelope("sasl-test", scored)
        bus.publish(topic, "t-sasl", envelope)
        subscription = bus.subscribe(group, [topic])
        try:
            deadline = time.monotonic() + 60
            messages = []
            while not messages and time.monotonic() < deadline:
                messages = subscription.poll(1.0)
            assert [m.key for m in messages] == ["t-sasl"]
            (message,) = messages
            assert events_pb2.Envelope.FromString(message.value).event_id == envelope.event_id
            subscription.commit(message)
        finally:
            subscription.close()
    finally:
        bus.close()


def test_a_wrong_password_is_a_clear_configuration_error(sasl_broker: KafkaServer) -> None:
    user = _user(sasl_broker)
    wrong = "not-" + user.password
    bus = KafkaEventBus(
        sasl_broker.address,
        client_id="sasl-wrong",
        request_timeout_s=3.0,
        security=KafkaSecurity("SASL_PLAINTEXT", "SCRAM-SHA-512", user.username, wrong),
    )
    try:
        with pytest.raises(ConfigurationError) as info:
            bus.ping()
    finally:
        bus.close()
    reason = info.value.reason
    assert "SASL" in reason and user.username in reason, reason
    assert "RIFFLOOP_KAFKA_SASL_PASSWORD" in reason, reason
    assert wrong not in reason and user.password not in reason
    # an unknown user is refused the same way
    stranger = KafkaEventBus(
        sasl_broker.address,
        client_id="sasl-stranger",
        request_timeout_s=3.0,
        security=KafkaSecurity("SASL_PLAINTEXT", "SCRAM-SHA-512", "nobody", user.password),
    )
    try:
        with pytest.raises(ConfigurationError, match="'nobody'"):
            stranger.ensure_topics(["sasl-stranger-topic"])
    finally:
        stranger.close()


# kafka-python 3.0.12 leaves the socket of a refused connect open (kafka/net/inet.py connect):
# collected inside the test, so its ResourceWarning is attributed (and filtered) here, as in
# tests/unit/core/test_unreachable_servers.py.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_the_broker_refuses_clients_without_sasl(
    sasl_broker: KafkaServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Control: the listener really requires SASL (a PLAINTEXT client gets nothing), and an
    unreachable broker stays an outage (TransientError), not a credentials problem."""
    # kafka-python logs the failures with tracebacks; captured records would keep the sockets.
    caplog.set_level(logging.CRITICAL, logger="kafka")
    from riffloop.core import TransientError
    from riffloop.infra._process import free_port

    bus = KafkaEventBus(sasl_broker.address, client_id="sasl-none", request_timeout_s=3.0)
    try:
        with pytest.raises(TransientError):
            bus.ping()
    finally:
        bus.close()
    user = _user(sasl_broker)
    nowhere = KafkaEventBus(
        f"127.0.0.1:{free_port(set())}",
        client_id="sasl-nowhere",
        request_timeout_s=2.0,
        security=KafkaSecurity("SASL_PLAINTEXT", "SCRAM-SHA-512", user.username, user.password),
    )
    try:
        with pytest.raises(TransientError):
            nowhere.ping()
    finally:
        nowhere.close()
    gc.collect()  # the leaked sockets' warnings, here
