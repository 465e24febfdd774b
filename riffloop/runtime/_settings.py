"""Settings every service process shares on top of ``riffloop.core.Settings``."""

from __future__ import annotations

import dataclasses
import ipaddress
import secrets
from urllib.parse import urlsplit

from riffloop.core import ConfigurationError, Settings
from riffloop.runtime._auth import MIN_SECRET_CHARS


@dataclasses.dataclass(frozen=True, repr=False)
class ServiceSettings(Settings):
    # Address the gRPC and /metrics servers listen on: loopback for local stacks, 0.0.0.0 in pods.
    bind_host: str = "127.0.0.1"
    # Seconds a draining process waits for in-flight calls before it stops them.
    drain_grace_s: float = 10.0
    # Seconds a process keeps serving after SIGTERM with its health already NOT_SERVING, so load
    # balancers and Kubernetes endpoints stop sending before it refuses calls (0: at once).
    drain_delay_s: float = 0.0
    # Seconds between a model-serving replica's checks of models/CURRENT and models/CANARY
    # (model.published reaches only one replica of a consumer group; see ServedModel).
    model_poll_s: float = 5.0
    # Seconds between a service's checks that its Redis state is there (riffloop.runtime
    # RebuildWatch): an emptied store is rebuilt from Kafka within one check plus the replay.
    rebuild_check_s: float = 2.0
    # OTLP/HTTP collector that receives this process's trace spans, e.g.
    # http://otel-collector:4318 (spans go to <endpoint>/v1/traces); "" = tracing off: no
    # exporter, and a no-op tracer (riffloop.core._tracing).
    otlp_endpoint: str = ""

    def _validate(self) -> None:
        super()._validate()
        try:
            ipaddress.ip_address(self.bind_host)
        except ValueError:
            if self.bind_host != "localhost":
                raise ConfigurationError(
                    f"RIFFLOOP_BIND_HOST must be an IP address, got {self.bind_host!r}"
                ) from None
        if not 0 < self.drain_grace_s <= 300:
            raise ConfigurationError("RIFFLOOP_DRAIN_GRACE_S must lie in (0, 300]")
        if not 0 <= self.drain_delay_s <= 60:
            raise ConfigurationError("RIFFLOOP_DRAIN_DELAY_S must lie in [0, 60]")
        if not 0.1 <= self.model_poll_s <= 3600:
            raise ConfigurationError("RIFFLOOP_MODEL_POLL_S must lie in [0.1, 3600]")
        if not 0.1 <= self.rebuild_check_s <= 3600:
            raise ConfigurationError("RIFFLOOP_REBUILD_CHECK_S must lie in [0.1, 3600]")
        if self.otlp_endpoint:
            url = urlsplit(self.otlp_endpoint)
            if url.scheme not in ("http", "https") or not url.hostname or url.query:
                raise ConfigurationError(
                    "RIFFLOOP_OTLP_ENDPOINT must be an http:// or https:// URL of an OTLP/HTTP "
                    f"collector (e.g. http://otel-collector:4318), got {self.otlp_endpoint!r}"
                )


@dataclasses.dataclass(frozen=True, repr=False)
class OperatorGuarded(ServiceSettings):
    """Settings of the internal services (encoder, generator, feedback, selector, trainer).

    Their RPCs (Promote, Rollback, RunSelection, RaterReport, TrainStatus…) are for operators:
    every call but health and reflection must carry an operator token signed with
    ``operator_secret`` (``riffloop.runtime.operator_token``). A process that serves them
    refuses to start without the secret (``OperatorAuthInterceptor.from_settings``) unless
    ``dev_open_internal_rpcs`` says, for development only, that any caller may use them."""

    # The HS256 key of operator tokens (at least 16 characters; no default: required).
    operator_secret: str = dataclasses.field(default="", metadata={"secret": True})
    # Development only: the internal RPCs answer any caller. Never in production.
    dev_open_internal_rpcs: bool = False

    def _validate(self) -> None:
        super()._validate()
        if self.operator_secret and len(self.operator_secret) < MIN_SECRET_CHARS:
            raise ConfigurationError(
                f"RIFFLOOP_OPERATOR_SECRET is shorter than {MIN_SECRET_CHARS} characters"
            )
        if self.operator_secret and self.dev_open_internal_rpcs:
            raise ConfigurationError(
                "RIFFLOOP_DEV_OPEN_INTERNAL_RPCS=true and RIFFLOOP_OPERATOR_SECRET are both "
                "set: either the internal RPCs need an operator token or they are open"
            )


# One key per process for the embedded backend (every service of an embedded stack runs in one
# process, so they agree); real backends must be given one (DispatchKeyed._validate).
_EPHEMERAL_DISPATCH_KEY = secrets.token_hex(24)
MIN_DISPATCH_KEY_CHARS = 16


@dataclasses.dataclass(frozen=True, repr=False)
class DispatchKeyed(ServiceSettings):
    """Settings of the services that derive blind ids and draws (gateway, generator).

    The dispatch key decides, per request, baseline or generation, and derives every track id
    (riffloop.loop.Dispatcher): a client that could compute it would no longer be blind, so on
    real backends it is a required secret, the same in the gateway and every generator."""

    dispatch_key: str = dataclasses.field(default="", metadata={"secret": True})

    def _validate(self) -> None:
        super()._validate()
        if self.backend == "real" and not self.dispatch_key:
            raise ConfigurationError(
                f"RIFFLOOP_DISPATCH_KEY must be set (at least {MIN_DISPATCH_KEY_CHARS} "
                "characters, the same in the gateway and the generators): it keeps the "
                "baseline blind, so the services refuse to run on real backends without it"
            )
        if self.dispatch_key and len(self.dispatch_key) < MIN_DISPATCH_KEY_CHARS:
            raise ConfigurationError(
                f"RIFFLOOP_DISPATCH_KEY is shorter than {MIN_DISPATCH_KEY_CHARS} characters"
            )

    def effective_dispatch_key(self) -> str:
        """The configured key, or this process's random one on the embedded backend."""
        return self.dispatch_key or _EPHEMERAL_DISPATCH_KEY
