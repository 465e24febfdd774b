"""Property: whatever members join, poll, commit and leave in whatever order, the in-process bus
delivers every record to its group at least once, in order per partition, and a member that
(re)joins never sees a record below its partition's committed offset."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from riffloop.core import MemoryEventBus, Message, Subscription

pytestmark = pytest.mark.unit

TOPIC = "prop.topic.v1"

operations = st.lists(
    st.one_of(
        st.tuples(st.just("publish"), st.sampled_from(["a", "b", "c", "d", "e"])),
        st.tuples(st.just("poll"), st.integers(0, 2)),
        st.tuples(st.just("commit"), st.integers(0, 2)),
        st.tuples(st.just("rejoin"), st.integers(0, 2)),
    ),
    max_size=40,
)


@settings(max_examples=40, deadline=None)
@given(operations)
def test_at_least_once_in_order_and_never_behind_the_commit(ops: list[tuple[str, object]]) -> None:
    bus = MemoryEventBus()
    bus.ensure_topics([TOPIC], partitions=3)
    members: list[Subscription] = [bus.subscribe("g", [TOPIC]) for _ in range(3)]
    polled: list[list[Message]] = [[], [], []]
    committed: dict[int, int] = {}
    published: list[tuple[int, int]] = []
    delivered: set[tuple[int, int]] = set()
    counter = 0

    def check_batch(index: int, batch: list[Message], floor: dict[int, int]) -> None:
        for partition in {m.partition for m in batch}:
            offsets = [m.offset for m in batch if m.partition == partition]
            assert offsets == sorted(offsets)  # order per partition
            assert offsets[0] >= floor.get(partition, 0)
        polled[index].extend(batch)
        delivered.update((m.partition, m.offset) for m in batch)

    for op, arg in ops:
        if op == "publish":
            counter += 1
            result = bus.publish_raw(TOPIC, str(arg), str(counter).encode())
            published.append((result.partition, result.offset))
        elif op == "poll":
            index = int(str(arg))
            check_batch(index, members[index].poll(0, 5), {})
        elif op == "commit" and polled[int(str(arg))]:
            index = int(str(arg))
            message = polled[index].pop(0)
            if (TOPIC, message.partition) in members[index].assignment():
                members[index].commit(message)
                committed[message.partition] = max(
                    committed.get(message.partition, 0), message.offset + 1
                )
        elif op == "rejoin":
            index = int(str(arg))
            members[index].close()
            members[index] = bus.subscribe("g", [TOPIC])
            polled[index] = []
            # a rebalance: every member restarts from the committed offsets
            for i, member in enumerate(members):
                floor = dict(committed)
                check_batch(i, member.poll(0, 100), floor)

    # a fresh member after everyone left sees exactly the uncommitted tail
    for member in members:
        member.close()
    last = bus.subscribe("g", [TOPIC])
    rest = last.poll(0, 10_000)
    assert all(m.offset >= committed.get(m.partition, 0) for m in rest)
    delivered.update((m.partition, m.offset) for m in rest)
    assert set(published) <= delivered
