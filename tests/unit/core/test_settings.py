"""Settings: every RIFFLOOP_* variable typed and validated; unknown names and secrets handled."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from riffloop.core import ConfigurationError, Settings, run_main

pytestmark = pytest.mark.unit

REAL = {
    "RIFFLOOP_BACKEND": "real",
    "RIFFLOOP_KAFKA_BOOTSTRAP": "127.0.0.1:9092",
    "RIFFLOOP_S3_ENDPOINT": "http://127.0.0.1:9000",
    "RIFFLOOP_S3_ACCESS_KEY": "riffloop",
    "RIFFLOOP_S3_SECRET_KEY": "very-secret-key",
    "RIFFLOOP_REDIS_URL": "redis://:redis-pass@127.0.0.1:6379/0",
}


def test_defaults_are_the_embedded_backend() -> None:
    settings = Settings.from_env({})
    assert settings.backend == "embedded"
    assert settings.consumer_max_attempts >= 1
    assert settings.kafka_partitions == 3


def test_every_field_is_read_and_typed() -> None:
    settings = Settings.from_env(
        {
            **REAL,
            "RIFFLOOP_GRPC_PORT": "6000",
            "RIFFLOOP_S3_SECURE": "yes",
            "RIFFLOOP_CONSUMER_RETRY_BACKOFF_S": "0.05",
            "RIFFLOOP_DATA_DIR": "/tmp/riffloop-data",
            "RIFFLOOP_LOG_LEVEL": "debug",
            "RIFFLOOP_SERVICE_NAME": "feedback",
            "PATH": "/usr/bin",  # other variables are none of our business
        }
    )
    assert settings.grpc_port == 6000
    assert settings.s3_secure is True
    assert settings.consumer_retry_backoff_s == pytest.approx(0.05)
    assert settings.data_dir == Path("/tmp/riffloop-data")
    assert settings.log_level == "DEBUG"
    assert settings.s3_host == "127.0.0.1:9000"
    assert settings.service_name == "feedback"


def test_settings_are_frozen() -> None:
    settings = Settings.from_env({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.grpc_port = 1  # type: ignore[misc]


def test_unknown_variable_is_named() -> None:
    with pytest.raises(ConfigurationError, match="RIFFLOOP_GRPC_PROT") as info:
        Settings.from_env({"RIFFLOOP_GRPC_PROT": "6000"})
    assert "\n" not in info.value.reason
    assert info.value.reason.endswith("did you mean RIFFLOOP_GRPC_PORT?")
    with pytest.raises(ConfigurationError, match=r"known settings are .*RIFFLOOP_REDIS_URL"):
        Settings.from_env({"RIFFLOOP_FAVOURITE_COLOUR": "blue"})


def test_tooling_variables_are_not_settings_but_tolerated() -> None:
    settings = Settings.from_env(
        {"RIFFLOOP_TEST_INFRA_ENV": "/tmp/infra.env", "RIFFLOOP_PYTHON": "x"}
    )
    assert settings == Settings()


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("RIFFLOOP_GRPC_PORT", "fifty", "must be an integer"),
        ("RIFFLOOP_GRPC_PORT", "70000", "port number"),
        ("RIFFLOOP_S3_SECURE", "maybe", "true or false"),
        ("RIFFLOOP_BACKEND", "cloud", "one of embedded, real"),
        ("RIFFLOOP_CONSUMER_MAX_ATTEMPTS", "0", "at least 1"),
        ("RIFFLOOP_CONSUMER_RETRY_BACKOFF_S", "nan", "finite"),
        ("RIFFLOOP_REDIS_URL", "http://x", "redis://"),
        ("RIFFLOOP_REDIS_URL", "redis://h:abc", "port that is not a number"),
        ("RIFFLOOP_REDIS_URL", "redis://h:99999", "port that is not a number"),
        ("RIFFLOOP_S3_ENDPOINT", "minio:abc", "host:port"),
        ("RIFFLOOP_S3_ENDPOINT", "minio:9000/bucket", "host:port"),
        ("RIFFLOOP_KAFKA_BOOTSTRAP", "localhost", "host:port"),
        ("RIFFLOOP_SERVICE_NAME", "my service", "letters"),
        ("RIFFLOOP_KAFKA_MAX_POLL_INTERVAL_S", "5", "10–86,400 s"),
    ],
)
def test_bad_values_name_the_variable(variable: str, value: str, expected: str) -> None:
    with pytest.raises(ConfigurationError, match=expected) as info:
        Settings.from_env({variable: value})
    assert info.value.reason.startswith(variable)


def test_real_backend_requires_its_servers() -> None:
    env = {k: v for k, v in REAL.items() if k != "RIFFLOOP_REDIS_URL"}
    with pytest.raises(ConfigurationError, match="RIFFLOOP_REDIS_URL is required"):
        Settings.from_env(env)


def test_secrets_are_masked_in_repr_and_describe() -> None:
    settings = Settings.from_env(REAL)
    text = repr(settings) + str(settings.describe())
    assert "very-secret-key" not in text
    assert "redis-pass" not in text
    assert settings.describe()["s3_secret_key"] == "****"
    assert settings.s3_secret_key == "very-secret-key"  # the value itself is intact
    assert "127.0.0.1:6379" in settings.describe()["redis_url"]


def test_subclass_secrets_stay_masked_even_with_a_generated_repr() -> None:
    @dataclasses.dataclass(frozen=True)  # repr=True: dataclasses would print every field
    class GatewaySettings(Settings):
        auth_secret: str = dataclasses.field(default="", metadata={"secret": True})

    settings = GatewaySettings.from_env({**REAL, "RIFFLOOP_AUTH_SECRET": "hunter2"})
    assert "hunter2" not in repr(settings)
    assert "very-secret-key" not in repr(settings)
    assert settings.describe()["auth_secret"] == "****"


def test_direct_construction_validates_too() -> None:
    with pytest.raises(ConfigurationError, match="RIFFLOOP_METRICS_PORT"):
        Settings(metrics_port=-1)


def test_subclass_adds_settings() -> None:
    @dataclasses.dataclass(frozen=True, repr=False)
    class GeneratorSettings(Settings):
        baseline_share: float = 0.25

    settings = GeneratorSettings.from_env({"RIFFLOOP_BASELINE_SHARE": "0.5"})
    assert settings.baseline_share == 0.5
    with pytest.raises(ConfigurationError, match="RIFFLOOP_BASELINE_SHARE"):
        Settings.from_env({"RIFFLOOP_BASELINE_SHARE": "0.5"})


def test_run_main_exits_2_with_one_line() -> None:
    code = (
        "from riffloop.core import Settings, run_main\n"
        "run_main(lambda: Settings.from_env() and 0, program='svc')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={"RIFFLOOP_GRPC_PORT": "abc", "PYTHONPATH": str(Path(__file__).resolve().parents[3])},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == ["svc: configuration error: RIFFLOOP_GRPC_PORT must be an integer, got 'abc'"]


def test_run_main_reports_a_dependency_outage_at_start_up_in_one_line() -> None:
    code = (
        "from riffloop.core import TransientError, run_main\n"
        "def main():\n"
        "    raise TransientError('create topics: Kafka error KafkaTimeoutError')\n"
        "run_main(main, program='svc')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": str(Path(__file__).resolve().parents[3])},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "svc: cannot start, a dependency is unavailable: "
        "create topics: Kafka error KafkaTimeoutError"
    ]


def test_run_main_passes_the_exit_code() -> None:
    with pytest.raises(SystemExit) as info:
        run_main(lambda: 3)
    assert info.value.code == 3
