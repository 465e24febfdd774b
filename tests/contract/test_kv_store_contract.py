"""The KeyValueStore contract, run against every adapter (memory, Redis)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

import pytest

from riffloop.core import KeyValueStore, ValidationError

pytestmark = pytest.mark.contract

KV = tuple[KeyValueStore, Callable[[], str]]


class TestKeyValueStoreContract:
    def test_get_set_delete(self, kv_store: KV) -> None:
        store, key = kv_store
        k = key()
        assert store.get(k) is None
        store.set(k, "hello")
        assert store.get(k) == "hello"
        assert store.ttl(k) is None
        assert store.delete(k) is True
        assert store.delete(k) is False
        assert store.get(k) is None

    def test_instance_id_names_the_server_and_holds_while_it_runs(self, kv_store: KV) -> None:
        """What a rebuild marker records to tell state that survived a restart (or a
        fail-over) from state written since: the same on every call to one running server."""
        store, key = kv_store
        first = store.instance_id()
        assert first and isinstance(first, str)
        store.set(key(), "x")
        assert store.instance_id() == first

    def test_ttl_expires(self, kv_store: KV) -> None:
        store, key = kv_store
        k = key()
        store.set(k, "v", ttl_s=0.2)
        remaining = store.ttl(k)
        assert remaining is not None and 0 < remaining <= 0.2
        deadline = time.monotonic() + 3
        while store.get(k) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store.get(k) is None

    def test_set_if_absent_is_first_writer_wins(self, kv_store: KV) -> None:
        store, key = kv_store
        k = key()
        assert store.set_if_absent(k, "first", ttl_s=60) is True
        assert store.set_if_absent(k, "second", ttl_s=60) is False
        assert store.get(k) == "first"
        remaining = store.ttl(k)
        assert remaining is not None and 59 < remaining <= 60

    def test_set_if_absent_under_contention_has_one_winner(self, kv_store: KV) -> None:
        store, key = kv_store
        k = key()
        wins: list[bool] = []
        lock = threading.Lock()

        def claim() -> None:
            won = store.set_if_absent(k, "x", ttl_s=60)
            with lock:
                wins.append(won)

        threads = [threading.Thread(target=claim) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(wins) == [False] * 7 + [True]

    def test_incr(self, kv_store: KV) -> None:
        store, key = kv_store
        k = key()
        assert store.incr(k) == 1
        assert store.incr(k, 5) == 6
        assert store.incr(k, -2) == 4
        assert store.get(k) == "4"
        text = key()
        store.set(text, "not a number")
        with pytest.raises(ValidationError):
            store.incr(text)

    def test_incr_with_ttl_sets_the_expiry_once(self, kv_store: KV) -> None:
        store, key = kv_store
        k = key()
        assert store.incr(k, ttl_s=60) == 1
        first = store.ttl(k)
        assert first is not None and 59 < first <= 60
        assert store.incr(k, 2, ttl_s=600) == 3  # an expiring key keeps its deadline
        later = store.ttl(k)
        assert later is not None and later <= first
        plain = key()
        store.set(plain, "5")
        assert store.incr(plain, ttl_s=30) == 6  # a key without expiry gets one (PEXPIRE NX)
        remaining = store.ttl(plain)
        assert remaining is not None and 29 < remaining <= 30
        short = key()
        store.incr(short, ttl_s=0.2)
        deadline = time.monotonic() + 3
        while store.get(short) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store.get(short) is None

    def test_get_many_keeps_order_and_absences(self, kv_store: KV) -> None:
        store, key = kv_store
        a, b, c = key(), key(), key()
        store.set(a, "1")
        store.set(c, "3")
        assert store.get_many([a, b, c]) == ["1", None, "3"]
        assert store.get_many([]) == []
        with pytest.raises(ValidationError):
            store.get_many([a, ""])

    def test_set_many_if_absent_claims_each_key_once(self, kv_store: KV) -> None:
        store, key = kv_store
        a, b, c = key(), key(), key()
        store.set(b, "taken")
        assert store.set_many_if_absent([a, b, c, a], "1", ttl_s=30) == [True, False, True, False]
        assert store.get_many([a, b, c]) == ["1", "taken", "1"]
        assert 0 < (store.ttl(a) or 0) <= 30
        assert store.set_many_if_absent([], "1") == []
        with pytest.raises(ValidationError):
            store.set_many_if_absent([key(), ""], "1")

    def test_hset_many_writes_every_hash(self, kv_store: KV) -> None:
        store, key = kv_store
        a, b = key(), key()
        store.hset(a, {"old": "0"})
        store.hset_many({a: {"u1": "x", "u2": "y"}, b: {"u1": "z"}})
        assert store.hgetall(a) == {"old": "0", "u1": "x", "u2": "y"}
        assert store.hgetall(b) == {"u1": "z"}
        store.hset_many({})

    def test_hset_many_writes_large_hashes_and_refuses_a_string_before_any_change(
        self, kv_store: KV
    ) -> None:
        store, key = kv_store
        big, small, text = key(), key(), key()
        fields = {f"f{i}": str(i) for i in range(2_345)}  # more than one unpack chunk
        store.hset_many({big: fields, small: {"a": "1"}})
        assert store.hgetall(big) == fields
        store.set(text, "plain")
        with pytest.raises(ValidationError):
            store.hset_many({small: {"b": "2"}, text: {"c": "3"}})
        assert store.hgetall(small) == {"a": "1"}
        assert store.get(text) == "plain"

    def test_hdel_removes_fields_and_an_emptied_hash(self, kv_store: KV) -> None:
        store, key = kv_store
        k, text = key(), key()
        store.hset(k, {"a": "1", "b": "2", "c": "3"})
        assert store.hdel(k, ["a", "zz", "a"]) == 1
        assert store.hgetall(k) == {"b": "2", "c": "3"}
        assert store.hdel(k, []) == 0
        assert store.hdel(k, ["b", "c"]) == 2
        assert store.hgetall(k) == {}
        store.set(k, "now a string")  # the emptied hash is gone: the key is free
        assert store.hdel(key(), ["a"]) == 0
        store.set(text, "plain")
        with pytest.raises(ValidationError):
            store.hdel(text, ["a"])

    def test_set_many_if_absent_without_ttl_keeps_the_keys(self, kv_store: KV) -> None:
        store, key = kv_store
        a = key()
        assert store.set_many_if_absent([a], "v") == [True]
        assert store.ttl(a) is None
        assert store.get(a) == "v"

    def test_hashes(self, kv_store: KV) -> None:
        store, key = kv_store
        k = key()
        assert store.hgetall(k) == {}
        assert store.hget(k, "n") is None
        store.hset(k, {"version": "v3", "parent": "v2"})
        assert store.hincrbyfloat(k, "sum", 4.5) == pytest.approx(4.5)
        assert store.hincrbyfloat(k, "sum", -1.25) == pytest.approx(3.25)
        all_fields = store.hgetall(k)
        assert all_fields["version"] == "v3"
        assert float(all_fields["sum"]) == pytest.approx(3.25)
        assert store.hget(k, "parent") == "v2"

    def test_wrong_type_is_a_validation_error(self, kv_store: KV) -> None:
        store, key = kv_store
        k = key()
        store.set(k, "plain")
        with pytest.raises(ValidationError):
            store.hincrbyfloat(k, "f", 1.0)

    def test_apply_once_counts_a_rating_exactly_once(self, kv_store: KV) -> None:
        """Σ stars, Σ stars² and n per track, updated atomically with the dedupe claim."""
        store, key = kv_store
        aggregate, user_aggregate = key(), key()
        event = key()
        stars = 4.0
        increments = {
            aggregate: {"sum": stars, "sum_sq": stars**2, "n": 1.0},
            user_aggregate: {"n": 1.0},
        }
        assert store.apply_once(event, 60, increments) is True
        assert store.apply_once(event, 60, increments) is False  # a redelivery
        assert store.apply_once(key(), 60, {aggregate: {"sum": 2.0, "n": 1.0}}) is True
        totals = {f: float(v) for f, v in store.hgetall(aggregate).items()}
        assert totals == {"sum": 6.0, "sum_sq": 16.0, "n": 2.0}
        assert float(store.hgetall(user_aggregate)["n"]) == 1.0
        remaining = store.ttl(event)
        assert remaining is not None and 59 < remaining <= 60

    def test_apply_once_under_contention_applies_once(self, kv_store: KV) -> None:
        store, key = kv_store
        aggregate, event = key(), key()
        results: list[bool] = []
        lock = threading.Lock()

        def deliver() -> None:
            applied = store.apply_once(event, 60, {aggregate: {"n": 1.0, "sum": 5.0}})
            with lock:
                results.append(applied)

        threads = [threading.Thread(target=deliver) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results.count(True) == 1
        assert float(store.hgetall(aggregate)["n"]) == 1.0

    def test_apply_once_is_all_or_nothing_on_a_bad_target(self, kv_store: KV) -> None:
        store, key = kv_store
        good, bad, event = key(), key(), key()
        store.set(bad, "a string, not a hash")
        with pytest.raises(ValidationError):
            store.apply_once(event, 60, {good: {"n": 1.0}, bad: {"n": 1.0}})
        assert store.hgetall(good) == {}
        assert store.get(event) is None  # the dedupe key was not claimed either

    @pytest.mark.parametrize("ttl", [0.0, -1.0, math.inf, math.nan])
    def test_bad_ttl_is_a_validation_error(self, kv_store: KV, ttl: float) -> None:
        store, key = kv_store
        with pytest.raises(ValidationError):
            store.set(key(), "v", ttl_s=ttl)

    def test_bad_increment_is_a_validation_error(self, kv_store: KV) -> None:
        store, key = kv_store
        with pytest.raises(ValidationError):
            store.apply_once(key(), 60, {key(): {"n": math.nan}})
        with pytest.raises(ValidationError):
            store.get("")
