"""Where things live: the per-user cache (keyed by version) and the per-stack state folder."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from riffloop.core import PermanentError

# Versions of what `install` fetches or builds; each keys its own folder in the cache.
KAFKA_VERSION = "4.4.0"
KAFKA_SCALA = "2.13"
LOG4J_VERSION = (
    "2.26.1"  # log4j-slf4j-impl: Kafka brings slf4j-api 1.7, so an slf4j2 binding logs nothing
)
MAVEN_DEPENDENCY_PLUGIN = "3.8.1"  # works with the Debian Maven 3.8
MINIO_MODULE = "github.com/minio/minio"
MINIO_VERSION = "v0.0.0-20260212201848-7aac2a2c5b7c"  # newest the Go proxy serves here
MINIO_TAG = "20260212201848"
VERSITYGW_MODULE = "github.com/versity/versitygw/cmd/versitygw"
VERSITYGW_VERSION = "v1.8.0"

REPO_ROOT = Path(__file__).resolve().parents[2]


class InfraError(PermanentError):
    """Local infrastructure could not be installed, started or stopped; `reason` says what to do."""


def cache_dir() -> Path:
    """`RIFFLOOP_CACHE`, else `$XDG_CACHE_HOME/riffloop`, else `~/.cache/riffloop`."""
    explicit = os.environ.get("RIFFLOOP_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "riffloop"


def default_state_dir() -> Path:
    """`<repo>/.riffloop/infra/`: one local stack per clone."""
    return REPO_ROOT / ".riffloop" / "infra"


@dataclass(frozen=True)
class CacheLayout:
    """Paths inside the cache folder (docs/ARCHITECTURE.md "Cache")."""

    root: Path

    @classmethod
    def default(cls) -> CacheLayout:
        return cls(cache_dir())

    @property
    def kafka_home(self) -> Path:
        return self.root / f"kafka-{KAFKA_VERSION}"

    @property
    def kafka_libs(self) -> Path:
        return self.kafka_home / "libs"

    @property
    def kafka_complete_marker(self) -> Path:
        return self.kafka_home / ".complete"

    @property
    def maven_repo(self) -> Path:
        return self.root / "m2"

    @property
    def go_path(self) -> Path:
        return self.root / "go"

    @property
    def minio_binary(self) -> Path:
        return self.root / "bin" / f"minio-{MINIO_TAG}" / "minio"

    @property
    def versitygw_binary(self) -> Path:
        return self.root / "bin" / f"versitygw-{VERSITYGW_VERSION.lstrip('v')}" / "versitygw"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def locks(self) -> Path:
        return self.root / "locks"

    def kafka_installed(self) -> bool:
        return self.kafka_complete_marker.is_file() and any(self.kafka_libs.glob("kafka_*.jar"))
