"""Settings every service process shares on top of ``riffloop.core.Settings``."""

from __future__ import annotations

import dataclasses
import ipaddress

from riffloop.core import ConfigurationError, Settings


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
