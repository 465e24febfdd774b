"""`install`: fetch or build the three servers once per version into the cache folder.

Every step prints one progress line, is idempotent (a finished step only says "cached"), and turns
every failure a user can hit into an `InfraError` with one sentence naming what to do.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import psutil

from riffloop.infra._layout import (
    KAFKA_SCALA,
    KAFKA_VERSION,
    LOG4J_VERSION,
    MAVEN_DEPENDENCY_PLUGIN,
    MINIO_MODULE,
    MINIO_VERSION,
    VERSITYGW_MODULE,
    VERSITYGW_VERSION,
    CacheLayout,
    InfraError,
)

Progress = Callable[[str], None]
COMPONENTS: tuple[str, ...] = ("kafka", "s3", "redis")
HEARTBEAT_S = 30.0
MIN_JAVA = 17  # Kafka 4 brokers need Java 17


def print_progress(message: str) -> None:
    """Default progress sink: one `[infra] …` line on stderr."""
    print(f"[infra] {message}", file=sys.stderr, flush=True)


def install(
    components: Sequence[str] = COMPONENTS,
    *,
    layout: CacheLayout | None = None,
    progress: Progress = print_progress,
) -> None:
    """Install each named component ("kafka", "s3", "redis"); cached ones return at once."""
    layout = layout or CacheLayout.default()
    unknown = sorted(set(components) - set(COMPONENTS))
    if unknown:
        raise InfraError(
            f"Unknown component {', '.join(unknown)}; choose from {', '.join(COMPONENTS)}."
        )
    for component in COMPONENTS:
        if component not in components:
            continue
        if component == "kafka":
            install_kafka(layout, progress)
        elif component == "s3":
            install_s3_server(layout, progress)
        else:
            install_redis(progress)


def s3_server_binary(layout: CacheLayout) -> tuple[str, Path] | None:
    """The installed S3 server as (kind, path): MinIO preferred, versitygw the fallback."""
    if _is_executable(layout.minio_binary):
        return "minio", layout.minio_binary
    if _is_executable(layout.versitygw_binary):
        return "versitygw", layout.versitygw_binary
    return None


def redis_server_binary() -> Path | None:
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if _is_executable(Path("/usr/bin/redis-server")) else None
    )
    return Path(found) if found else None


def java_binary() -> Path:
    """`$JAVA_HOME/bin/java`, else `java` on PATH; raises when neither exists."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home and _is_executable(Path(java_home) / "bin" / "java"):
        return Path(java_home) / "bin" / "java"
    found = shutil.which("java")
    if not found:
        raise InfraError(
            f"Java is not installed; install a JDK {MIN_JAVA} or newer "
            "(Debian: apt-get install openjdk-17-jre-headless) and retry."
        )
    return Path(found)


# 1. Kafka: the broker jar and its runtime dependencies, copied by Maven into kafka-<ver>/libs/.


def install_kafka(layout: CacheLayout, progress: Progress) -> None:
    label = f"kafka {KAFKA_VERSION} jars"
    if layout.kafka_installed():
        progress(f"{label}: cached in {layout.kafka_libs}")
        return
    _check_java_version(java_binary())
    mvn = shutil.which("mvn")
    if not mvn:
        raise InfraError(
            "Maven (mvn) is not installed; install it (Debian: apt-get install maven) and retry."
        )
    with _install_lock(layout, "kafka"):
        if layout.kafka_installed():
            progress(f"{label}: cached in {layout.kafka_libs} (installed by another process)")
            return
        progress(f"{label}: fetching from Maven Central (≈43 MB)…")
        started = time.monotonic()
        layout.kafka_home.mkdir(parents=True, exist_ok=True)
        log_path = layout.logs / f"kafka-{KAFKA_VERSION}-install.log"
        with tempfile.TemporaryDirectory(prefix="build-", dir=layout.kafka_home) as build:
            build_dir = Path(build)
            (build_dir / "pom.xml").write_text(_kafka_pom(), encoding="utf-8")
            staged = build_dir / "libs"
            rc = _run_logged(
                [
                    mvn,
                    "-B",
                    "--no-transfer-progress",
                    "-f",
                    str(build_dir / "pom.xml"),
                    f"-Dmaven.repo.local={layout.maven_repo}",
                    f"-DoutputDirectory={staged}",
                    "-DincludeScope=runtime",
                    f"org.apache.maven.plugins:maven-dependency-plugin:{MAVEN_DEPENDENCY_PLUGIN}"
                    ":copy-dependencies",
                ],
                log_path=log_path,
                label=label,
                progress=progress,
                cwd=build_dir,
            )
            if rc != 0:
                raise InfraError(
                    f"Maven could not fetch the Kafka jars (exit {rc}); check access to Maven "
                    f"Central (or a mirror in ~/.m2/settings.xml) and see {log_path}."
                )
            jars = sorted(staged.glob("*.jar"))
            if not any(jar.name.startswith(f"kafka_{KAFKA_SCALA}-") for jar in jars):
                raise InfraError(
                    f"Maven finished but copied no Kafka broker jar; see {log_path} and retry."
                )
            if layout.kafka_libs.exists():
                shutil.rmtree(layout.kafka_libs)
            staged.rename(layout.kafka_libs)
        size_mb = sum(jar.stat().st_size for jar in layout.kafka_libs.glob("*.jar")) / 1e6
        layout.kafka_complete_marker.write_text(f"{KAFKA_VERSION}\n", encoding="utf-8")
        progress(
            f"{label}: {len(jars)} jars, {size_mb:.0f} MB in {layout.kafka_libs} "
            f"({time.monotonic() - started:.0f} s)"
        )


def _kafka_pom() -> str:
    dependencies = [
        ("org.apache.kafka", f"kafka_{KAFKA_SCALA}", KAFKA_VERSION),
        ("org.apache.logging.log4j", "log4j-core", LOG4J_VERSION),
        ("org.apache.logging.log4j", "log4j-slf4j-impl", LOG4J_VERSION),
    ]
    rendered = "\n".join(
        "    <dependency><groupId>{}</groupId><artifactId>{}</artifactId>"
        "<version>{}</version></dependency>".format(*dependency)
        for dependency in dependencies
    )
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<!-- Throwaway pom written by riffloop.infra install: only used to copy Kafka's jars. -->
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>riffloop.local</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>{KAFKA_VERSION}</version>
  <packaging>pom</packaging>
  <dependencies>
{rendered}
  </dependencies>
</project>
"""


def _check_java_version(java: Path) -> None:
    try:
        result = subprocess.run(
            [str(java), "-version"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise InfraError(
            f"Could not run {java} -version ({error}); check the JDK install."
        ) from None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', result.stderr + result.stdout)
    if not match:
        raise InfraError(f"Could not read the Java version from {java}; install JDK {MIN_JAVA}+.")
    major = int(match.group(1))
    if major == 1 and match.group(2):  # "1.8" style
        major = int(match.group(2))
    if major < MIN_JAVA:
        raise InfraError(
            f"Kafka {KAFKA_VERSION} needs Java {MIN_JAVA} or newer but {java} is Java {major}; "
            "install a newer JDK or point JAVA_HOME at one."
        )


# 2. S3: MinIO built from source with Go (archived upstream: a test fixture), versitygw fallback.


def install_s3_server(layout: CacheLayout, progress: Progress) -> None:
    installed = s3_server_binary(layout)
    if installed:
        kind, path = installed
        progress(f"s3 server ({kind}): cached at {path}")
        return
    go = shutil.which("go") or (
        "/usr/local/go/bin/go" if _is_executable(Path("/usr/local/go/bin/go")) else None
    )
    if not go:
        raise InfraError(
            "Go is not installed, so the MinIO test server cannot be built; install Go 1.24+ "
            "(https://go.dev/doc/install or Debian golang) and retry."
        )
    with _install_lock(layout, "s3"):
        _wait_for_foreign_build(layout.minio_binary, progress)
        if s3_server_binary(layout):
            install_s3_server(layout, progress)
            return
        attempts = (
            ("minio", MINIO_MODULE, MINIO_VERSION, layout.minio_binary, "≈10 min on 2 cores"),
            ("versitygw", VERSITYGW_MODULE, VERSITYGW_VERSION, layout.versitygw_binary, "≈3 min"),
        )
        logs: list[Path] = []
        for kind, module, version, binary, estimate in attempts:
            log_path = layout.logs / f"{kind}-{version}.log"
            logs.append(log_path)
            label = f"s3 server ({kind} {version})"
            progress(f"{label}: building with go install ({estimate}, log {log_path})…")
            started = time.monotonic()
            rc = _run_logged(
                [go, "install", f"{module}@{version}"],
                log_path=log_path,
                label=label,
                progress=progress,
                env=_go_env(layout, binary.parent),
                nice=True,
            )
            if rc == 0 and _is_executable(binary):
                minutes = (time.monotonic() - started) / 60
                progress(f"{label}: built {binary} ({minutes:.1f} min)")
                return
            progress(f"{label}: build failed (exit {rc}), see {log_path}")
        raise InfraError(
            "Neither MinIO nor versitygw could be built with go install; check access to the Go "
            f"module proxy and see {' and '.join(str(log) for log in logs)}."
        )


def _go_env(layout: CacheLayout, gobin: Path) -> dict[str, str]:
    gobin.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        CGO_ENABLED="0",
        GOBIN=str(gobin),
        GOPATH=str(layout.go_path),
        GOMODCACHE=str(layout.go_path / "mod"),
        GOCACHE=str(layout.go_path / "build"),
        GOFLAGS="-modcacherw",  # lets `rm -rf` clean the cache
    )
    return env


def _wait_for_foreign_build(binary: Path, progress: Progress) -> None:
    """Another process (e.g. the bootstrap in another shell) may be building MinIO right now."""
    while True:
        pids = [
            process.pid
            for process in psutil.process_iter(["cmdline"])
            if _is_minio_build(process.info.get("cmdline") or [])
        ]
        if not pids or _is_executable(binary):
            return
        progress(f"s3 server: another MinIO build is running (pid {pids[0]}); waiting for it…")
        time.sleep(HEARTBEAT_S)


def _is_minio_build(cmdline: list[str]) -> bool:
    return (
        len(cmdline) >= 3
        and Path(cmdline[0]).name == "go"
        and "install" in cmdline
        and any(arg.startswith(f"{MINIO_MODULE}@") for arg in cmdline)
    )


# 3. Redis: Debian's redis-server.


def install_redis(progress: Progress) -> None:
    found = redis_server_binary()
    if found:
        progress(f"redis: {found} (system package)")
        return
    apt = shutil.which("apt-get")
    if os.geteuid() != 0 or not apt:
        raise InfraError(
            "redis-server is not installed; install it (Debian/Ubuntu: sudo apt-get install "
            "redis-server, macOS: brew install redis) and retry."
        )
    progress("redis: installing redis-server with apt-get…")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install_command = [apt, "install", "-y", "redis-server"]
    subprocess.run(install_command, env=env, capture_output=True, check=False)
    if not redis_server_binary():  # stale package lists: refresh once and try again
        subprocess.run([apt, "update"], env=env, capture_output=True, check=False)
        subprocess.run(install_command, env=env, capture_output=True, check=False)
    found = redis_server_binary()
    if not found:
        raise InfraError(
            "apt-get could not install redis-server; check the Debian package sources and run "
            "apt-get install redis-server by hand."
        )
    progress(f"redis: installed {found}")


# Shared plumbing.


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


@contextlib.contextmanager
def _install_lock(layout: CacheLayout, component: str) -> Iterator[None]:
    """Serialise installs of one component across processes (two clones, two shells)."""
    layout.locks.mkdir(parents=True, exist_ok=True)
    with open(layout.locks / f"{component}.lock", "w", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run_logged(
    command: list[str],
    *,
    log_path: Path,
    label: str,
    progress: Progress,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    nice: bool = False,
) -> int:
    """Run `command` with its output appended to `log_path`, a heartbeat line every 30 s."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if nice and shutil.which("nice"):
        command = ["nice", "-n", "10", *command]
    started = time.monotonic()
    with open(log_path, "ab") as log:
        log.write(f"\n$ {' '.join(command)}\n".encode())
        log.flush()
        try:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=cwd, env=env, start_new_session=True,  # one group: go and its compilers
            )  # fmt: skip
        except OSError as error:
            raise InfraError(f"Could not run {command[0]} ({error}); check its install.") from None
        try:
            while True:
                try:
                    rc = process.wait(timeout=HEARTBEAT_S)
                    break
                except subprocess.TimeoutExpired:
                    elapsed = time.monotonic() - started
                    progress(
                        f"{label}: still running ({elapsed / 60:.1f} min; "
                        f"last: {_last_line(log_path)})"
                    )
        except BaseException:  # Ctrl-C or SIGTERM: leave no half-finished build running
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise
        log.write(f"done {rc}\n".encode())
    return rc


def _last_line(path: Path, limit: int = 100) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, path.stat().st_size - 4096))
            lines = [line for line in handle.read().decode(errors="replace").splitlines() if line]
    except OSError:
        return "no output yet"
    line = lines[-1].strip() if lines else "no output yet"
    return line if len(line) <= limit else line[: limit - 1] + "…"
