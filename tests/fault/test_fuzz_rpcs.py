"""Fuzzing the public API: Hypothesis messages for every RPC of GatewayService, built from the
protobuf descriptors, must never get INTERNAL or UNKNOWN, and the gateway must keep serving.

The strategies walk each request's message descriptor (``message_strategy``): strings, bytes,
every integer width at its full range, doubles and floats with NaN and ±inf, enums with values
the proto does not define, repeated and map fields, oneofs (at most one member set) and nested
messages. Strings and bytes also draw from ids and audio that exist on the gateway (an uploaded
song, a ready track of the caller's), so the fuzzer reaches past the id checks into the
handlers. The gateway runs in-process on in-memory ports; calls go over a loopback channel, so
the interceptors (auth, rate limit, in-flight caps, error mapping) are fuzzed too.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from riffloop.runtime import TokenSigner
from riffloop.v1 import gateway_service_pb2 as pb
from riffloop.v1 import gateway_service_pb2_grpc as pb_grpc
from tests.services.conftest import SECRET, Running, shared_ports, start_service, wav_bytes
from tests.services.test_gateway_inputs import make_ready_track, upload

pytestmark = pytest.mark.unit

SERVICE = pb.DESCRIPTOR.services_by_name["GatewayService"]
METHODS = [method.name for method in SERVICE.methods]
# Per RPC: enough to reach every branch of its validation; the whole module runs in well under
# a minute on a busy two-core machine.
EXAMPLES = 30
_BAD_CODES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def scalar_strategy(
    field: FieldDescriptor, known_strings: list[str], known_bytes: list[bytes]
) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind in _INT_RANGES:
        low, high = _INT_RANGES[kind]
        # the small numbers handlers branch on (stars 1–5, quality, counts) and the extremes
        return st.one_of(st.integers(max(low, -4), 64), st.integers(low, high))
    if kind == FieldDescriptor.TYPE_DOUBLE:
        return st.floats(allow_nan=True, allow_infinity=True)
    if kind == FieldDescriptor.TYPE_FLOAT:
        return st.floats(allow_nan=True, allow_infinity=True, width=32)
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_STRING:
        return st.one_of(st.text(max_size=300), st.sampled_from(known_strings))
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.one_of(st.binary(max_size=4096), st.sampled_from(known_bytes))
    if kind == FieldDescriptor.TYPE_ENUM:
        defined = [value.number for value in field.enum_type.values]
        # open (proto3) enums carry numbers the proto does not define: a newer client's
        return st.one_of(st.sampled_from(defined), st.integers(-(2**31), 2**31 - 1))
    raise AssertionError(f"no strategy for field type {kind} ({field.full_name})")


def message_strategy(
    descriptor: Descriptor,
    known_strings: list[str],
    known_bytes: list[bytes],
    depth: int = 0,
) -> st.SearchStrategy[Message]:
    """Messages of ``descriptor`` with any subset of fields set (one member per oneof)."""
    cls = GetMessageClass(descriptor)

    def value_of(field: FieldDescriptor) -> st.SearchStrategy[Any]:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if depth >= 3:
                return st.just(GetMessageClass(field.message_type)())
            return message_strategy(field.message_type, known_strings, known_bytes, depth + 1)
        return scalar_strategy(field, known_strings, known_bytes)

    fields: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_field = field.message_type.fields_by_name["key"]
            value_field = field.message_type.fields_by_name["value"]
            fields[field.name] = st.dictionaries(
                scalar_strategy(key_field, known_strings, known_bytes),
                value_of(value_field),
                max_size=3,
            )
        elif field.is_repeated:
            # a few, or past any batch limit the handler enforces
            fields[field.name] = st.one_of(
                st.lists(value_of(field), max_size=4), st.lists(value_of(field), max_size=120)
            )
        else:
            fields[field.name] = value_of(field)
    oneof_of = {
        field.name: field.containing_oneof.name
        for field in descriptor.fields
        if field.containing_oneof is not None
    }

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        chosen = draw(st.sets(st.sampled_from(sorted(fields)))) if fields else set()
        message = cls()
        taken: set[str] = set()
        for name in sorted(chosen):
            group = oneof_of.get(name)
            if group is not None:
                if group in taken:
                    continue
                taken.add(group)
            value = draw(fields[name])
            field = descriptor.fields_by_name[name]
            target = getattr(message, name)
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                for key, item in value.items():
                    if isinstance(item, Message):
                        target[key].CopyFrom(item)
                    else:
                        target[key] = item
            elif field.is_repeated and field.type == FieldDescriptor.TYPE_MESSAGE:
                for item in value:
                    target.add().CopyFrom(item)
            elif field.is_repeated:
                target.extend(value)
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                target.CopyFrom(value)
            else:
                setattr(message, name, value)
        return message

    return build()


@pytest.fixture(scope="module")
def fuzz_target() -> Iterator[tuple[Running, list[str], list[bytes]]]:
    """The gateway (limits that would only slow the fuzzer down raised) and what exists on it:
    an uploaded song and a ready track of the fuzzing user."""
    running = start_service(
        "gateway",
        shared_ports(),
        max_upload_bytes=256 * 1024,
        rate_limit_per_s=1e6,
        rate_limit_burst=100_000,
        max_pending_generations_per_user=1000,
        max_generation_backlog=1000,
    )
    stub = pb_grpc.GatewayServiceStub(running.channel)
    signer = TokenSigner(SECRET)

    def auth(user: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {signer.issue(user)}"),)

    wav = wav_bytes(2.0, 523.0)
    song = stub.UploadSong(upload(wav), metadata=auth("fuzz"), timeout=10)
    track_id = make_ready_track(running, stub, auth, "fuzz")
    known_strings = [song.song_id, track_id, "audio/wav", "a" * 64, ""]
    known_bytes = [wav, wav[:44], wav[:2000]]
    yield running, known_strings, known_bytes
    running.channel.close()
    running.runtime.stop()


def _check(call: Any) -> None:
    try:
        result = call()
        if isinstance(result, Iterator):
            for _ in result:
                pass
    except grpc.RpcError as error:
        code, details = error.code(), error.details() or ""
        assert code not in _BAD_CODES, f"{code.name}: {details}"
        assert "Traceback" not in details


@pytest.mark.parametrize("method", METHODS)
def test_fuzzed_requests_never_get_internal_or_unknown(
    method: str, fuzz_target: tuple[Running, list[str], list[bytes]]
) -> None:
    running, known_strings, known_bytes = fuzz_target
    descriptor = SERVICE.methods_by_name[method]
    requests = message_strategy(descriptor.input_type, known_strings, known_bytes)
    call = getattr(pb_grpc.GatewayServiceStub(running.channel), method)
    metadata = (("authorization", f"Bearer {TokenSigner(SECRET).issue('fuzz')}"),)
    drawn = st.lists(requests, max_size=6) if descriptor.client_streaming else requests

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(drawn)
    def run(request: Any) -> None:
        body = iter(request) if descriptor.client_streaming else request
        _check(lambda: call(body, metadata=metadata, timeout=10))

    run()
    health = health_pb2_grpc.HealthStub(running.channel)
    answer = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
