"""The ``KeyValueStore`` port (Redis semantics) and its in-memory adapter.

Values are text. Besides get/set/delete/incr and hashes, the port has two primitives the loop
relies on:

- ``set_if_absent(key, value, ttl_s)`` (Redis ``SET NX PX``): idempotency keys for event dedupe.
- ``apply_once(dedupe_key, ttl_s, increments)``: in ONE atomic step, claim ``dedupe_key`` and, only
  if it was free, apply every ``HINCRBYFLOAT`` in ``increments``. A rating aggregate updated this
  way (Σ stars, Σ stars², n per track) counts a redelivered rating event exactly once even if the
  consumer crashed after the update and before committing its offset.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence

from riffloop.core._errors import ValidationError

Increments = Mapping[str, Mapping[str, float]]


def validate_kv_key(key: str) -> str:
    if not isinstance(key, str) or not key or len(key) > 1024:
        raise ValidationError("key-value keys must be non-empty strings of at most 1024 chars")
    return key


def validate_ttl(ttl_s: float | None) -> float | None:
    if ttl_s is None:
        return None
    if not math.isfinite(ttl_s) or ttl_s <= 0:
        raise ValidationError(f"TTL must be a positive number of seconds, got {ttl_s!r}")
    return ttl_s


def validate_increments(increments: Increments) -> None:
    for key, fields in increments.items():
        validate_kv_key(key)
        for field, amount in fields.items():
            if not isinstance(field, str) or not field:
                raise ValidationError(f"hash field names of {key!r} must be non-empty strings")
            if not math.isfinite(amount):
                raise ValidationError(f"increment {key}.{field} must be finite, got {amount!r}")


class KeyValueStore(abc.ABC):
    """Port: a Redis-like store of text values and hashes. Adapters: memory, Redis."""

    @abc.abstractmethod
    def get(self, key: str) -> str | None: ...

    def get_many(self, keys: Sequence[str]) -> list[str | None]:
        """``[get(k) for k in keys]`` in one round trip where the adapter can (Redis MGET)."""
        return [self.get(k) for k in keys]

    @abc.abstractmethod
    def set(self, key: str, value: str, *, ttl_s: float | None = None) -> None: ...

    @abc.abstractmethod
    def set_if_absent(self, key: str, value: str, *, ttl_s: float | None = None) -> bool:
        """Set only if the key is absent; True if this call set it (Redis SET NX)."""

    def set_many_if_absent(
        self, keys: Sequence[str], value: str, *, ttl_s: float | None = None
    ) -> list[bool]:
        """``[set_if_absent(k, value) for k in keys]`` in one round trip where the adapter can
        (a Redis pipeline). Each key is claimed on its own: a repeated key is claimed once, by
        its first occurrence."""
        return [self.set_if_absent(k, value, ttl_s=ttl_s) for k in keys]

    @abc.abstractmethod
    def delete(self, key: str) -> bool:
        """Remove a key (string or hash); True if it existed."""

    @abc.abstractmethod
    def incr(self, key: str, amount: int = 1, *, ttl_s: float | None = None) -> int:
        """Add to an integer value (absent = 0); ValidationError if the value is not an integer.

        With ``ttl_s``, a key without an expiry (the one this call creates, for a windowed
        counter) gets ``ttl_s``; a key that already expires keeps its deadline. One round trip.
        """

    @abc.abstractmethod
    def ttl(self, key: str) -> float | None:
        """Seconds left before the key expires; None if it has no TTL or does not exist."""

    @abc.abstractmethod
    def hset(self, key: str, mapping: Mapping[str, str]) -> None: ...

    def hset_many(self, writes: Mapping[str, Mapping[str, str]]) -> None:
        """``hset`` of several hashes (key → fields) in one round trip where the adapter can."""
        for key, mapping in writes.items():
            self.hset(key, mapping)

    @abc.abstractmethod
    def hget(self, key: str, field: str) -> str | None: ...

    @abc.abstractmethod
    def hgetall(self, key: str) -> dict[str, str]: ...

    @abc.abstractmethod
    def hdel(self, key: str, fields: Sequence[str]) -> int:
        """Remove fields of a hash; return how many existed. A hash left empty is gone."""

    @abc.abstractmethod
    def hincrbyfloat(self, key: str, field: str, amount: float) -> float: ...

    @abc.abstractmethod
    def apply_once(self, dedupe_key: str, ttl_s: float, increments: Increments) -> bool:
        """Atomically claim ``dedupe_key`` (with TTL) and apply the hash increments.

        Returns True if applied, False if the key was already claimed (nothing changed).
        """

    def instance_id(self) -> str:
        """Names the server process that holds the data (Redis: its ``run_id``): it changes
        when the store restarts or fails over, so state written before that can be told from
        what survived it. "" when the store cannot say."""
        return ""

    def ping(self) -> None:
        """Raise TransientError if the store cannot be reached (readiness checks)."""
        return None

    def close(self) -> None:
        """Release connections."""
        return None


@dataclasses.dataclass
class _Entry:
    value: str | dict[str, str]
    expires_at: float | None


class MemoryKeyValueStore(KeyValueStore):
    """Thread-safe in-memory adapter; TTLs follow an injectable monotonic clock."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._data: dict[str, _Entry] = {}
        self._lock = threading.RLock()
        self._instance = uuid.uuid4().hex

    def instance_id(self) -> str:
        return self._instance

    def restart(self, *, keep: float = 1.0) -> None:
        """A server restart (a test's): a new :meth:`instance_id`, keeping the first ``keep``
        share of the keys in insertion order (an append-only file that missed the last writes
        keeps fewer than all)."""
        with self._lock:
            kept = list(self._data)[: int(len(self._data) * keep)]
            self._data = {k: self._data[k] for k in kept}
            self._instance = uuid.uuid4().hex

    # Expired entries vanish lazily on access, like Redis's passive expiry.
    def _live(self, key: str) -> _Entry | None:
        entry = self._data.get(validate_kv_key(key))
        if entry is not None and entry.expires_at is not None and entry.expires_at <= self._clock():
            del self._data[key]
            return None
        return entry

    def _expiry(self, ttl_s: float | None) -> float | None:
        ttl = validate_ttl(ttl_s)
        return None if ttl is None else self._clock() + ttl

    def _string(self, key: str) -> str | None:
        entry = self._live(key)
        if entry is None:
            return None
        if not isinstance(entry.value, str):
            raise ValidationError(f"key {key!r} holds a hash, not a string")
        return entry.value

    def _hash(self, key: str, *, create: bool) -> dict[str, str] | None:
        entry = self._live(key)
        if entry is None:
            if not create:
                return None
            entry = self._data[key] = _Entry({}, None)
        if not isinstance(entry.value, dict):
            raise ValidationError(f"key {key!r} holds a string, not a hash")
        return entry.value

    def get(self, key: str) -> str | None:
        with self._lock:
            return self._string(key)

    def dump(self) -> dict[str, str | dict[str, str]]:
        """Every live key and its value (a copy): what a test compares before and after."""
        with self._lock:
            live = [k for k in list(self._data) if self._live(k) is not None]
            return {
                k: v if isinstance(v, str) else dict(v)
                for k in live
                for v in (self._data[k].value,)
            }

    def flush(self) -> None:
        """Remove every key (Redis FLUSHDB): the store lost its data."""
        with self._lock:
            self._data.clear()

    def set(self, key: str, value: str, *, ttl_s: float | None = None) -> None:
        with self._lock:
            validate_kv_key(key)
            self._data[key] = _Entry(str(value), self._expiry(ttl_s))

    def set_if_absent(self, key: str, value: str, *, ttl_s: float | None = None) -> bool:
        with self._lock:
            if self._live(key) is not None:
                return False
            self._data[key] = _Entry(str(value), self._expiry(ttl_s))
            return True

    def delete(self, key: str) -> bool:
        with self._lock:
            if self._live(key) is None:
                return False
            del self._data[key]
            return True

    def incr(self, key: str, amount: int = 1, *, ttl_s: float | None = None) -> int:
        ttl = validate_ttl(ttl_s)
        with self._lock:
            current = self._string(key)
            try:
                value = (0 if current is None else int(current)) + int(amount)
            except ValueError:
                raise ValidationError(f"key {key!r} does not hold an integer") from None
            entry = self._live(key)
            expires = entry.expires_at if entry is not None else None
            if expires is None:  # as PEXPIRE NX: only a key without an expiry gets one
                expires = self._expiry(ttl)
            self._data[key] = _Entry(str(value), expires)
            return value

    def ttl(self, key: str) -> float | None:
        with self._lock:
            entry = self._live(key)
            if entry is None or entry.expires_at is None:
                return None
            return entry.expires_at - self._clock()

    def hset(self, key: str, mapping: Mapping[str, str]) -> None:
        with self._lock:
            target = self._hash(key, create=True)
            assert target is not None
            target.update({str(k): str(v) for k, v in mapping.items()})

    def hset_many(self, writes: Mapping[str, Mapping[str, str]]) -> None:
        with self._lock:
            for key in writes:  # all or nothing, as the Redis script: check every key first
                validate_kv_key(key)
                self._hash(key, create=False)
            for key, mapping in writes.items():
                if mapping:
                    self.hset(key, mapping)

    def hget(self, key: str, field: str) -> str | None:
        with self._lock:
            target = self._hash(key, create=False)
            return None if target is None else target.get(field)

    def hgetall(self, key: str) -> dict[str, str]:
        with self._lock:
            return dict(self._hash(key, create=False) or {})

    def hdel(self, key: str, fields: Sequence[str]) -> int:
        validate_kv_key(key)
        with self._lock:
            target = self._hash(key, create=False)
            if target is None:
                return 0
            removed = sum(target.pop(f, None) is not None for f in set(fields))
            if not target:
                del self._data[key]  # as in Redis: an empty hash does not exist
            return removed

    def _hincr(self, key: str, field: str, amount: float) -> float:
        target = self._hash(key, create=True)
        assert target is not None
        try:
            value = float(target.get(field, "0")) + float(amount)
        except ValueError:
            raise ValidationError(f"field {key}.{field} does not hold a number") from None
        target[field] = repr(value)
        return value

    def hincrbyfloat(self, key: str, field: str, amount: float) -> float:
        validate_increments({key: {field: amount}})
        with self._lock:
            return self._hincr(key, field, amount)

    def apply_once(self, dedupe_key: str, ttl_s: float, increments: Increments) -> bool:
        validate_kv_key(dedupe_key)
        validate_ttl(ttl_s)
        validate_increments(increments)
        with self._lock:
            # Type-check every target before changing anything, so the step stays all-or-nothing.
            for key in increments:
                self._hash(key, create=False)
            if not self.set_if_absent(dedupe_key, "1", ttl_s=ttl_s):
                return False
            for key, fields in increments.items():
                for field, amount in fields.items():
                    self._hincr(key, field, amount)
            return True
