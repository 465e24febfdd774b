"""Kafka TLS and SASL/SCRAM settings: validated at start-up, passed to every client."""

from __future__ import annotations

from pathlib import Path

import pytest

from riffloop.core import (
    ConfigurationError,
    KafkaEventBus,
    KafkaSecurity,
    Settings,
    ValidationError,
)

pytestmark = pytest.mark.unit

SASL = {
    "RIFFLOOP_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
    "RIFFLOOP_KAFKA_SASL_USERNAME": "riffloop-gateway",
    "RIFFLOOP_KAFKA_SASL_PASSWORD": "correct-horse-battery",
}


@pytest.fixture
def cafile(tmp_path: Path) -> str:
    path = tmp_path / "ca.crt"
    path.write_text("-----BEGIN CERTIFICATE-----\n")
    return str(path)


def test_plaintext_is_the_default_and_carries_no_credentials() -> None:
    settings = Settings.from_env({})
    assert settings.kafka_security_protocol == "PLAINTEXT"
    assert KafkaSecurity.from_settings(settings).client_config() == {
        "security_protocol": "PLAINTEXT"
    }


def test_sasl_ssl_without_a_ca_file_is_a_clear_configuration_error() -> None:
    env = {**SASL, "RIFFLOOP_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}
    with pytest.raises(ConfigurationError, match="RIFFLOOP_KAFKA_SSL_CAFILE is required"):
        Settings.from_env(env)
    with pytest.raises(ConfigurationError, match="RIFFLOOP_KAFKA_SSL_CAFILE is not a readable"):
        Settings.from_env({**env, "RIFFLOOP_KAFKA_SSL_CAFILE": "/nonexistent/ca.crt"})
    with pytest.raises(ConfigurationError, match="RIFFLOOP_KAFKA_SSL_CAFILE is required"):
        Settings.from_env({"RIFFLOOP_KAFKA_SECURITY_PROTOCOL": "SSL"})


@pytest.mark.parametrize(
    "missing", ["RIFFLOOP_KAFKA_SASL_USERNAME", "RIFFLOOP_KAFKA_SASL_PASSWORD"]
)
def test_sasl_needs_a_user_and_a_password(missing: str) -> None:
    env = {k: v for k, v in SASL.items() if k != missing}
    with pytest.raises(ConfigurationError, match=f"{missing} is required"):
        Settings.from_env(env)


def test_credentials_without_sasl_and_a_ca_file_without_tls_are_refused(cafile: str) -> None:
    with pytest.raises(ConfigurationError, match="does not authenticate with SASL"):
        Settings.from_env({"RIFFLOOP_KAFKA_SASL_USERNAME": "riffloop-gateway"})
    with pytest.raises(ConfigurationError, match="does not use TLS"):
        Settings.from_env({**SASL, "RIFFLOOP_KAFKA_SSL_CAFILE": cafile})
    with pytest.raises(ConfigurationError, match="must be one of"):
        Settings.from_env({**SASL, "RIFFLOOP_KAFKA_SASL_MECHANISM": "PLAIN"})


def test_sasl_ssl_settings_reach_every_client_and_the_password_stays_hidden(cafile: str) -> None:
    env = {
        **SASL,
        "RIFFLOOP_KAFKA_SECURITY_PROTOCOL": "sasl_ssl",
        "RIFFLOOP_KAFKA_SSL_CAFILE": cafile,
        "RIFFLOOP_KAFKA_BOOTSTRAP": "kafka-0.data.internal:9093",
    }
    settings = Settings.from_env(env)
    assert settings.kafka_security_protocol == "SASL_SSL"
    assert settings.describe()["kafka_sasl_password"] == "****"
    assert "correct-horse-battery" not in repr(settings)
    bus = KafkaEventBus.from_settings(settings)  # no connection until first use
    assert bus.security.client_config() == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "riffloop-gateway",
        "sasl_plain_password": "correct-horse-battery",
        "ssl_cafile": cafile,
        "ssl_check_hostname": True,
    }
    assert "correct-horse-battery" not in repr(bus.security)


def test_the_adapter_refuses_incomplete_security_given_directly() -> None:
    with pytest.raises(ValidationError, match="user name and password"):
        KafkaSecurity("SASL_PLAINTEXT", "SCRAM-SHA-512", "user", "")
    with pytest.raises(ValidationError, match="CA file"):
        KafkaSecurity("SSL")
    with pytest.raises(ValidationError, match="mechanism"):
        KafkaSecurity("SASL_PLAINTEXT", "GSSAPI", "user", "password")
