"""Per-user rate limit kept in the KeyValueStore, so every gateway replica shares one budget.

The port offers atomic ``incr`` but no compare-and-set (and no scripts), so the bucket is the
sliding-window form of a token bucket (as at Cloudflare): with rate r and burst b, a window lasts
W = b / r seconds and, at a fraction f of the current window,

    estimate = n_previous · (1 − f) + n_current

must stay ≤ b. It refills at r per second and allows bursts of b like a token bucket; each call
costs one ``incr`` (plus one ``set_if_absent`` to start a window with its TTL, and one ``get``).
Counters expire after 2W, so idle users cost nothing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from riffloop.core import ValidationError


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
