"""KeyValueStore on Redis (redis-py, text responses). ``apply_once``, ``set_many_if_absent`` and
``hset_many`` are Lua scripts: one command per call instead of a pipeline of one command per key,
which cost the gateway and the feedback service a fifth of their CPU at 5,000 ratings/s (py-spy,
bench/README.md), and each runs atomically.

With Redis Cluster, the dedupe key and the hash keys of one ``apply_once`` must share a hash slot
(use a ``{track_id}`` hash tag); a single Redis, as deployed here, has no such constraint.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from riffloop.core._errors import TransientError, ValidationError
from riffloop.core._kv_store import (
    Increments,
    KeyValueStore,
    validate_increments,
    validate_kv_key,
    validate_ttl,
)

if TYPE_CHECKING:
    import redis

    from riffloop.core._settings import Settings

T = TypeVar("T")


def _refuse_non_hashes(first: int) -> str:
    """Lua that fails the script, before it changes anything, if KEYS[first..] holds a
    non-hash."""
    return f"""
for i = {first}, #KEYS do
  local kind = redis.call('TYPE', KEYS[i])['ok']
  if kind ~= 'none' and kind ~= 'hash' then
    return redis.error_reply('WRONGTYPE ' .. KEYS[i] .. ' holds a ' .. kind .. ', not a hash')
  end
end"""


# KEYS[1] = dedupe key, KEYS[2..] = hashes; ARGV[1] = TTL ms, then per hash: n, n×(field, amount).
# 1. refuse (before any change) if a target is not a hash; 2. SET NX PX the dedupe key, stop if it
# was taken; 3. HINCRBYFLOAT every field. Redis runs a script atomically, so a concurrent
# duplicate either sees the key taken or runs entirely after this one.
_APPLY_ONCE_LUA = (
    _refuse_non_hashes(first=2)
    + """
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then
  return 0
end
local a = 2
for i = 2, #KEYS do
  local n = tonumber(ARGV[a])
  a = a + 1
  for _ = 1, n do
    redis.call('HINCRBYFLOAT', KEYS[i], ARGV[a], ARGV[a + 1])
    a = a + 2
  end
end
return 1
"""
)


# KEYS = the keys; ARGV[1] = value, ARGV[2] = TTL ms or "" (none). SET NX each key in order; the
# reply is 1 for a key this call set, 0 for one that was already there (a repeat within KEYS too).
_SET_MANY_IF_ABSENT_LUA = """
local out = {}
for i = 1, #KEYS do
  local ok
  if ARGV[2] == '' then
    ok = redis.call('SET', KEYS[i], ARGV[1], 'NX')
  else
    ok = redis.call('SET', KEYS[i], ARGV[1], 'NX', 'PX', ARGV[2])
  end
  out[i] = ok and 1 or 0
end
return out
"""

# KEYS = hashes; ARGV = per hash: n, then n × (field, value). Refuses (before any change) a key
# that holds something other than a hash, then HSETs each hash in chunks (Lua's unpack has a
# stack limit).
_HSET_MANY_LUA = (
    _refuse_non_hashes(first=1)
    + """
local a = 1
for i = 1, #KEYS do
  local last = a + 2 * tonumber(ARGV[a])
  a = a + 1
  while a <= last do
    local stop = math.min(a + 999, last)
    redis.call('HSET', KEYS[i], unpack(ARGV, a, stop))
    a = stop + 1
  end
end
return #KEYS
"""
)


def _ms(ttl_s: float) -> int:
    return max(1, round(ttl_s * 1000))


class RedisKeyValueStore(KeyValueStore):
    """Redis adapter; the client is injected (``decode_responses=True`` is required)."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._apply_once = client.register_script(_APPLY_ONCE_LUA)
        self._set_many_if_absent = client.register_script(_SET_MANY_IF_ABSENT_LUA)
        self._hset_many = client.register_script(_HSET_MANY_LUA)

    @classmethod
    def from_url(cls, url: str, *, timeout_s: float = 5.0) -> RedisKeyValueStore:
        import redis

        client = redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            health_check_interval=30,
        )
        return cls(client)

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisKeyValueStore:
        return cls.from_url(settings.redis_url)

    def _call(self, what: str, action: Callable[[], T]) -> T:
        import redis

        try:
            return action()
        except redis.ResponseError as exc:
            text = str(exc)
            if "WRONGTYPE" in text or "not an integer" in text or "not a valid float" in text:
                raise ValidationError(f"{what}: {text}") from None
            raise TransientError(f"{what}: Redis error {text}") from None
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            raise TransientError(f"{what}: Redis unreachable ({type(exc).__name__})") from None

    def get(self, key: str) -> str | None:
        validate_kv_key(key)
        value: Any = self._call(f"GET {key}", lambda: self._client.get(key))
        return None if value is None else str(value)

    def set(self, key: str, value: str, *, ttl_s: float | None = None) -> None:
        validate_kv_key(key)
        ttl = validate_ttl(ttl_s)
        px = None if ttl is None else _ms(ttl)
        self._call(f"SET {key}", lambda: self._client.set(key, str(value), px=px))

    def set_if_absent(self, key: str, value: str, *, ttl_s: float | None = None) -> bool:
        validate_kv_key(key)
        ttl = validate_ttl(ttl_s)
        px = None if ttl is None else _ms(ttl)
        return bool(
            self._call(f"SET NX {key}", lambda: self._client.set(key, str(value), px=px, nx=True))
        )

    def delete(self, key: str) -> bool:
        validate_kv_key(key)
        removed: Any = self._call(f"DEL {key}", lambda: self._client.delete(key))
        return bool(removed)

    def get_many(self, keys: Sequence[str]) -> list[str | None]:
        if not keys:
            return []
        for key in keys:
            validate_kv_key(key)
        values: Any = self._call(f"MGET {keys[0]}…", lambda: self._client.mget(list(keys)))
        return [None if v is None else str(v) for v in values]

    def set_many_if_absent(
        self, keys: Sequence[str], value: str, *, ttl_s: float | None = None
    ) -> list[bool]:
        if not keys:
            return []
        for key in keys:
            validate_kv_key(key)
        ttl = validate_ttl(ttl_s)
        args = [str(value), "" if ttl is None else str(_ms(ttl))]
        claimed: Any = self._call(
            f"SET NX {keys[0]}…", lambda: self._set_many_if_absent(keys=list(keys), args=args)
        )
        return [bool(int(x)) for x in claimed]

    def hset_many(self, writes: Mapping[str, Mapping[str, str]]) -> None:
        batch = {k: {str(f): str(v) for f, v in m.items()} for k, m in writes.items() if m}
        for key in batch:
            validate_kv_key(key)
        if not batch:
            return

        args: list[str] = []
        for mapping in batch.values():
            args.append(str(len(mapping)))
            for field, value in mapping.items():
                args += (field, value)
        self._call(
            f"HSET {next(iter(batch))}…", lambda: self._hset_many(keys=list(batch), args=args)
        )

    def incr(self, key: str, amount: int = 1, *, ttl_s: float | None = None) -> int:
        validate_kv_key(key)
        ttl = validate_ttl(ttl_s)
        if ttl is None:
            value: Any = self._call(f"INCRBY {key}", lambda: self._client.incrby(key, int(amount)))
            return int(value)

        def run() -> Any:
            # MULTI/EXEC: INCRBY then PEXPIRE NX (Redis ≥ 7) — only a key without expiry gets
            # one, i.e. the key this INCRBY created (or one set without TTL earlier).
            pipe = self._client.pipeline(transaction=True)
            pipe.incrby(key, int(amount))
            pipe.pexpire(key, _ms(ttl), nx=True)
            return pipe.execute()[0]

        return int(self._call(f"INCRBY {key} + PEXPIRE", run))

    def ttl(self, key: str) -> float | None:
        validate_kv_key(key)
        millis: Any = self._call(f"PTTL {key}", lambda: self._client.pttl(key))
        return None if millis is None or millis < 0 else millis / 1000.0

    def hset(self, key: str, mapping: Mapping[str, str]) -> None:
        validate_kv_key(key)
        if not mapping:
            return
        text = {str(k): str(v) for k, v in mapping.items()}
        self._call(f"HSET {key}", lambda: self._client.hset(key, mapping=text))  # type: ignore[arg-type]

    def hget(self, key: str, field: str) -> str | None:
        validate_kv_key(key)
        value: Any = self._call(f"HGET {key}", lambda: self._client.hget(key, field))
        return None if value is None else str(value)

    def hgetall(self, key: str) -> dict[str, str]:
        validate_kv_key(key)
        values: Any = self._call(f"HGETALL {key}", lambda: self._client.hgetall(key))
        return {str(k): str(v) for k, v in values.items()}

    def hdel(self, key: str, fields: Sequence[str]) -> int:
        validate_kv_key(key)
        if not fields:
            return 0
        removed: Any = self._call(f"HDEL {key}", lambda: self._client.hdel(key, *fields))
        return int(removed)

    def hincrbyfloat(self, key: str, field: str, amount: float) -> float:
        validate_increments({key: {field: amount}})
        value: Any = self._call(
            f"HINCRBYFLOAT {key}", lambda: self._client.hincrbyfloat(key, field, float(amount))
        )
        return float(value)

    def apply_once(self, dedupe_key: str, ttl_s: float, increments: Increments) -> bool:
        validate_kv_key(dedupe_key)
        ttl = validate_ttl(ttl_s)
        assert ttl is not None
        validate_increments(increments)
        keys = [dedupe_key, *increments]
        args: list[str | int] = [_ms(ttl)]
        for fields in increments.values():
            args.append(len(fields))
            for field, amount in fields.items():
                args.extend([field, repr(float(amount))])
        applied: Any = self._call(
            f"apply_once {dedupe_key}", lambda: self._apply_once(keys=keys, args=args)
        )
        return bool(int(applied))

    def instance_id(self) -> str:
        info: Any = self._call("INFO server", lambda: self._client.info("server"))
        return str(info.get("run_id", ""))

    def ping(self) -> None:
        self._call("PING", self._client.ping)

    def close(self) -> None:
        self._client.close()
