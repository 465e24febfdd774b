"""Admission of generation requests: what one user, and everyone, may have waiting.

A Generate is pending from the moment the gateway publishes it until its track is ready or the
generator gives up on it (dead letter). Two bounds keep the generators' queue serviceable:

1. per user: at most ``per_user`` pending requests, so one user cannot fill the queue that every
   listener's requests wait in;
2. in all: at most ``max_backlog`` pending requests. Past that the generators are behind (the
   consumer lag of generation.requested.v1 grows), and a new request would be answered long
   after its listener left: it is refused with a retry hint instead (admission control).

Both refusals are ``RateLimitedError`` (RESOURCE_EXHAUSTED) with ``retry_after_s``.

The pending requests live in the key-value store, so every gateway replica counts the same ones:

    <prefix>          hash track id → "<requested at> <user>"   every pending request
    <prefix>:<user>   hash track id → requested at               the user's

An entry older than ``stale_after_s`` is dropped when read: a request whose answer was lost stops
counting after that long instead of holding a place for ever. The backlog is re-read at most
every ``refresh_s`` (one HGETALL of at most ``max_backlog`` fields); the user's own entries are
read on every call (at most ``per_user`` fields).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any

from riffloop.core import RateLimitedError, ValidationError


@dataclasses.dataclass(frozen=True)
class AdmissionPolicy:
    per_user: int = 16
    max_backlog: int = 1000
    stale_after_s: float = 3600.0
    refresh_s: float = 1.0
    retry_after_s: float = 5.0

    def __post_init__(self) -> None:
        if not 1 <= self.per_user <= self.max_backlog:
            raise ValidationError("admission: need 1 ≤ per_user ≤ max_backlog")
        if not (self.stale_after_s > 0 and self.refresh_s >= 0 and self.retry_after_s > 0):
            raise ValidationError("admission: stale_after_s and retry_after_s > 0, refresh_s ≥ 0")


class GenerationBacklog:
    """The pending generation requests (module docstring): admit, add, done."""

    def __init__(
        self,
        kv: Any,
        policy: AdmissionPolicy,
        *,
        prefix: str = "gw:pending",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.kv = kv
        self.policy = policy
        self.prefix = prefix
        self.clock = clock
        self._lock = threading.Lock()
        self._backlog = 0  # as last read, plus what this process added since
        self._read_at = float("-inf")

    def _user_key(self, user: str) -> str:
        return f"{self.prefix}:{user}"

    def _live(self, key: str, at_of: Callable[[str], float], now: float) -> int:
        """The entries of hash ``key`` younger than stale_after_s; stale ones are deleted."""
        entries = self.kv.hgetall(key)
        stale = []
        for track_id, value in entries.items():
            try:
                at = at_of(value)
            except ValueError:
                at = float("-inf")  # unreadable: drop it rather than count it for ever
            if now - at > self.policy.stale_after_s:
                stale.append(track_id)
        if stale:
            self.kv.hdel(key, stale)
        return len(entries) - len(stale)

    def backlog(self) -> int:
        """Pending requests of all users (re-read at most every refresh_s)."""
        now = self.clock()
        with self._lock:
            if now - self._read_at < self.policy.refresh_s:
                return self._backlog
        count = self._live(self.prefix, lambda v: float(v.split(" ", 1)[0]), now)
        with self._lock:
            self._backlog, self._read_at = count, now
        return count

    def pending(self, user: str) -> int:
        return self._live(self._user_key(user), float, self.clock())

    def admit(self, user: str) -> None:
        """Raise RateLimitedError when ``user`` may not add a request now."""
        policy = self.policy
        mine = self.pending(user)
        if mine >= policy.per_user:
            raise RateLimitedError(
                f"you have {mine} generation requests pending (limit {policy.per_user}); "
                "wait until one of your tracks is ready",
                retry_after_s=policy.retry_after_s,
            )
        backlog = self.backlog()
        if backlog >= policy.max_backlog:
            raise RateLimitedError(
                f"the generators are behind ({backlog} requests waiting, limit "
                f"{policy.max_backlog}); retry in {policy.retry_after_s:g} s",
                retry_after_s=policy.retry_after_s,
            )

    def add(self, user: str, track_id: str) -> None:
        now = self.clock()
        self.kv.hset_many(
            {
                self.prefix: {track_id: f"{now!r} {user}"},
                self._user_key(user): {track_id: repr(now)},
            }
        )
        with self._lock:
            self._backlog += 1

    def done(self, track_id: str) -> None:
        """The request's track is ready, or failed for good: it waits no more (a track that
        was never pending here, such as a probe, changes nothing)."""
        value = self.kv.hget(self.prefix, track_id)
        if value is None:
            return
        self.kv.hdel(self.prefix, [track_id])
        _, _, user = value.partition(" ")
        if user:
            self.kv.hdel(self._user_key(user), [track_id])
