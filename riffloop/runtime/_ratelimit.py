"""Per-user rate limit kept in the KeyValueStore, so every gateway replica shares one budget.

The port offers atomic ``incr`` but no compare-and-set (and no scripts), so the bucket is the
sliding-window form of a token bucket (as at Cloudflare): with rate r and burst b, a window lasts
W = b / r seconds and, at a fraction f of the current window,

    estimate = n_previous · (1 − f) + n_current

must stay ≤ b. It refills at r per second and allows bursts of b like a token bucket; each call
costs one ``incr`` (plus one ``set_if_absent`` to start a window with its TTL, and one ``get``).
Counters expire after 2W, so idle users cost nothing.

:class:`InFlightLimiter` is the other half: how many calls of a kind (uploads, Generate) a user
has in progress at once in this process, whatever their rate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from riffloop.core import RateLimitedError, ValidationError


class SlidingWindowLimiter:
    def __init__(
        self,
        kv: Any,
        *,
        rate_per_s: float,
        burst: int,
        prefix: str = "rl",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValidationError("rate limit needs rate_per_s > 0 and burst ≥ 1")
        self.kv = kv
        self.rate = rate_per_s
        self.burst = burst
        self.window_s = burst / rate_per_s
        self.prefix = prefix
        self.clock = clock

    def try_acquire(self, key: str, cost: int = 1) -> float:
        """Take ``cost`` tokens (a batch call pays per item); 0 when allowed, else the seconds
        until they are free. A cost above the burst can never pass."""
        if cost < 1:
            raise ValidationError("a rate-limited call costs at least one token")
        now = self.clock()
        index = math.floor(now / self.window_s)
        fraction = now / self.window_s - index
        current_key = f"{self.prefix}:{key}:{index}"
        # Two round trips per call: the counter is created with its TTL by the increment itself.
        count = self.kv.incr(current_key, cost, ttl_s=2 * self.window_s + 1)
        previous = int(self.kv.get(f"{self.prefix}:{key}:{index - 1}") or 0)
        estimate = previous * (1.0 - fraction) + count
        if estimate <= self.burst:
            return 0.0
        # Undo this call's claim, so refused calls do not keep a flooding client locked out.
        self.kv.incr(current_key, -cost)
        return max((estimate - self.burst) / self.rate, 1.0 / self.rate)


@dataclasses.dataclass(frozen=True)
class InFlightCap:
    """At most ``per_user`` calls of one kind of one user, and ``total`` of all users, in
    progress at once in this process; ``what`` names them in the refusal ("uploads")."""

    what: str
    per_user: int
    total: int

    def __post_init__(self) -> None:
        if not 1 <= self.per_user <= self.total:
            raise ValidationError(f"in-flight cap on {self.what}: need 1 ≤ per_user ≤ total")


class InFlightLimiter:
    """Calls in progress, counted per user and in all, per kind of call (several methods may
    share one kind: UploadSong and UploadWholeSong are both uploads). A rate limit bounds how
    often a user calls; this bounds what their calls hold at once (threads, spooled bytes, a
    decode), which a rate limit cannot: one 20 MiB upload may take a minute. Per process, as
    the memory and threads it protects are; nothing is shared through the key-value store."""

    def __init__(self, kinds: dict[str, str], caps: dict[str, InFlightCap]) -> None:
        """``kinds``: method name → kind; ``caps``: kind → its cap."""
        missing = set(kinds.values()) - set(caps)
        if missing:
            raise ValidationError(f"no in-flight cap for {sorted(missing)}")
        self.kinds = dict(kinds)
        self.caps = dict(caps)
        self._lock = threading.Lock()
        self._users: dict[tuple[str, str], int] = {}
        self._totals: dict[str, int] = dict.fromkeys(caps, 0)

    def in_flight(self, kind: str, user: str | None = None) -> int:
        with self._lock:
            return self._totals[kind] if user is None else self._users.get((kind, user), 0)

    @contextlib.contextmanager
    def hold(self, method: str, user: str) -> Iterator[None]:
        """Count one call of ``user`` to ``method`` while the block runs, or raise
        RateLimitedError (RESOURCE_EXHAUSTED, retry in a second) when a cap is reached."""
        kind = self.kinds.get(method)
        if kind is None:
            yield
            return
        cap = self.caps[kind]
        with self._lock:
            mine = self._users.get((kind, user), 0)
            if mine >= cap.per_user:
                raise RateLimitedError(
                    f"{cap.what} in progress for you: {mine} (limit {cap.per_user} per user); "
                    "wait for one to finish",
                    retry_after_s=1.0,
                )
            if self._totals[kind] >= cap.total:
                raise RateLimitedError(
                    f"too many {cap.what} in progress on this server (limit {cap.total}); "
                    "retry in a few seconds",
                    retry_after_s=2.0,
                )
            self._users[(kind, user)] = mine + 1
            self._totals[kind] += 1
        try:
            yield
        finally:
            with self._lock:
                self._totals[kind] -= 1
                left = self._users[(kind, user)] - 1
                if left:
                    self._users[(kind, user)] = left
                else:
                    del self._users[(kind, user)]
