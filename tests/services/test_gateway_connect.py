"""The gateway's browser API (Connect protocol, services/gateway/_connect.py) against its gRPC API:
the same handlers, the same token checks, one rate-limit bucket per user across both, the same
error reasons, and the dev sign-in only when switched on."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any, cast

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from riffloop.core import install_tracing, uninstall_tracing
from riffloop.runtime import TokenSigner
from riffloop.v1 import gateway_service_pb2 as pb
from riffloop.v1 import gateway_service_pb2_grpc as pb_grpc
from tests.services.conftest import SECRET, Running, shared_ports, start_service, wav_bytes

pytestmark = pytest.mark.unit

BURST = 6
last_headers: dict[str, str] = {}  # of the last connect() call


@pytest.fixture(scope="module")
def gateway() -> Iterator[Running]:
    running = start_service(
        "gateway",
        shared_ports(),
        connect_port=0,
        rate_limit_burst=BURST,
        rate_limit_per_s=0.01,
        max_feedback_batch=BURST,
        # every call one token here: the per-method costs are test_gateway_limits.py's
        generate_cost=1,
        upload_cost=1,
        mel_image_cost=1,
        dev_sign_in=True,
    )
    try:
        yield running
    finally:
        running.channel.close()
        running.runtime.stop()


def base_url(gateway: Running) -> str:
    return f"http://127.0.0.1:{cast(Any, gateway.runtime.worker('connect')).port}"


def connect(
    gateway: Running,
    method: str,
    body: bytes,
    token: str | None,
    kind: str = "json",
    extra: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    """One Connect unary call; (HTTP status, body)."""
    headers = {"content-type": f"application/{kind}", "connect-protocol-version": "1"}
    headers.update(extra or {})
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        f"{base_url(gateway)}/riffloop.v1.GatewayService/{method}", body, headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            last_headers.clear()
            last_headers.update({k.lower(): v for k, v in response.headers.items()})
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        with err:
            last_headers.clear()
            last_headers.update({k.lower(): v for k, v in err.headers.items()})
            return err.code, err.read()


def grpc_reason(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code(), caught.value.details()


def test_a_call_over_connect_reaches_the_same_handlers(gateway: Running) -> None:
    token = TokenSigner(SECRET).issue("connie")
    status, body = connect(gateway, "ListModels", b"{}", token)
    assert status == 200, body
    assert json.loads(body) == {}  # no models yet: the empty ListModelsResponse
    status, body = connect(
        gateway, "GetTrack", pb.GetTrackRequest(track_id="nope").SerializeToString(), token, "proto"
    )
    stub = pb_grpc.GatewayServiceStub(gateway.channel)
    code, reason = grpc_reason(
        lambda: stub.GetTrack(
            pb.GetTrackRequest(track_id="nope"), metadata=(("authorization", f"Bearer {token}"),)
        )
    )
    assert code is grpc.StatusCode.NOT_FOUND
    assert status == 404 and json.loads(body) == {"code": "not_found", "message": reason}


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (None, "missing authorization"),
        (TokenSigner(SECRET, clock=lambda: 1_000.0).issue("old", ttl_s=1), "expired"),
        (TokenSigner("another-secret-0123").issue("eve"), "unknown key"),
        (TokenSigner(SECRET, audience="someone-else").issue("eve"), "audience"),
    ],
)
def test_bad_tokens_are_refused_as_over_grpc(
    gateway: Running, token: str | None, reason: str
) -> None:
    status, body = connect(gateway, "ListModels", b"{}", token)
    error = json.loads(body)
    assert status == 401 and error["code"] == "unauthenticated" and reason in error["message"]
    stub = pb_grpc.GatewayServiceStub(gateway.channel)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    code, grpc_message = grpc_reason(
        lambda: stub.ListModels(pb.ListModelsRequest(), metadata=metadata)
    )
    assert code is grpc.StatusCode.UNAUTHENTICATED and grpc_message == error["message"]


def test_the_rate_limit_is_one_bucket_across_grpc_and_connect(gateway: Running) -> None:
    token = TokenSigner(SECRET).issue("greedy")
    stub = pb_grpc.GatewayServiceStub(gateway.channel)
    for _ in range(BURST // 2):  # half the burst over gRPC ...
        stub.ListModels(pb.ListModelsRequest(), metadata=(("authorization", f"Bearer {token}"),))
    statuses = [connect(gateway, "ListModels", b"{}", token)[0] for _ in range(BURST // 2)]
    assert statuses == [200] * (BURST // 2)  # ... the other half over Connect
    status, body = connect(gateway, "ListModels", b"{}", token)
    error = json.loads(body)
    assert status == 429 and error["code"] == "resource_exhausted"
    assert "rate limit exceeded for user greedy" in error["message"]
    assert int(last_headers["retry-after-ms"]) > 0  # as the gRPC trailer
    code, _ = grpc_reason(
        lambda: stub.ListModels(
            pb.ListModelsRequest(), metadata=(("authorization", f"Bearer {token}"),)
        )
    )
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    # another user's bucket is untouched
    assert connect(gateway, "ListModels", b"{}", TokenSigner(SECRET).issue("modest"))[0] == 200


def test_whole_song_upload_has_the_streams_checks_and_reasons(gateway: Running) -> None:
    token = TokenSigner(SECRET).issue("uploader")
    wav = wav_bytes(2.0)
    good = pb.UploadWholeSongRequest(
        metadata=pb.UploadSongMetadata(title="a", content_type="audio/wav"), audio=wav
    )
    status, body = connect(gateway, "UploadWholeSong", good.SerializeToString(), token, "proto")
    assert status == 200, body
    answer = pb.UploadWholeSongResponse.FromString(body)
    assert len(answer.song_id) == 64 and answer.duration_seconds == pytest.approx(2.0, abs=0.01)
    bad = pb.UploadWholeSongRequest(
        metadata=pb.UploadSongMetadata(content_type="audio/wav"), audio=b"not audio at all" * 100
    )
    status, body = connect(gateway, "UploadWholeSong", bad.SerializeToString(), token, "proto")
    error = json.loads(body)
    stub = pb_grpc.GatewayServiceStub(gateway.channel)
    parts = iter(
        [
            pb.UploadSongRequest(metadata=bad.metadata),
            pb.UploadSongRequest(chunk=bad.audio),
        ]
    )
    code, reason = grpc_reason(
        lambda: stub.UploadSong(parts, metadata=(("authorization", f"Bearer {token}"),))
    )
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert status == 400 and error == {"code": "invalid_argument", "message": reason}


def test_dev_sign_in_issues_a_token_the_gateway_accepts(gateway: Running) -> None:
    url = f"{base_url(gateway)}/auth/dev-token"
    request = urllib.request.Request(
        url, json.dumps({"name": "dana"}).encode(), {"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        token = json.loads(response.read())["token"]
    assert connect(gateway, "ListModels", b"{}", token)[0] == 200
    with urllib.request.urlopen(f"{base_url(gateway)}/auth/config", timeout=10) as response:
        assert json.loads(response.read()) == {"devSignIn": True}


def test_dev_sign_in_is_off_unless_switched_on() -> None:
    running = start_service("gateway", shared_ports(), connect_port=0)
    try:
        request = urllib.request.Request(
            f"{base_url(running)}/auth/dev-token", b'{"name": "x"}', method="POST"
        )
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=10)
        with caught.value:
            assert caught.value.code == 404
    finally:
        running.channel.close()
        running.runtime.stop()


def test_the_upload_limit_is_the_same_over_connect() -> None:
    limit = 100_000
    running = start_service("gateway", shared_ports(), connect_port=0, max_upload_bytes=limit)
    try:
        token = TokenSigner(SECRET).issue("big")
        over = pb.UploadWholeSongRequest(
            metadata=pb.UploadSongMetadata(content_type="audio/wav"), audio=b"\0" * (limit + 1)
        )
        status, body = connect(running, "UploadWholeSong", over.SerializeToString(), token, "proto")
        stub = pb_grpc.GatewayServiceStub(running.channel)
        parts = iter(
            [pb.UploadSongRequest(metadata=over.metadata), pb.UploadSongRequest(chunk=over.audio)]
        )
        code, reason = grpc_reason(
            lambda: stub.UploadSong(parts, metadata=(("authorization", f"Bearer {token}"),))
        )
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        assert status == 400 and json.loads(body) == {"code": "invalid_argument", "message": reason}
        # far beyond the limit the Connect server stops reading before the handler runs
        huge = pb.UploadWholeSongRequest(audio=b"\0" * (limit + 200_000)).SerializeToString()
        status, body = connect(running, "UploadWholeSong", huge, token, "proto")
        assert status == 429 and json.loads(body)["code"] == "resource_exhausted", body
    finally:
        running.channel.close()
        running.runtime.stop()


def test_a_connect_call_is_a_span_of_the_callers_trace_as_over_grpc(gateway: Running) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    install_tracing(provider)
    trace_id, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    token = TokenSigner(SECRET).issue("tracy")
    try:
        traceparent = {"traceparent": f"00-{trace_id}-{caller_span}-01"}
        assert connect(gateway, "ListModels", b"{}", token, extra=traceparent)[0] == 200
        status, _ = connect(gateway, "GetTrack", json.dumps({"trackId": "nope"}).encode(), token)
        untraced_request_id = last_headers["x-request-id"]
    finally:
        uninstall_tracing()
    assert status == 404
    listed, missing = exporter.get_finished_spans()
    assert listed.name == "riffloop.v1.GatewayService/ListModels"
    assert listed.kind is SpanKind.SERVER
    assert format(listed.context.trace_id, "032x") == trace_id
    assert listed.parent is not None and format(listed.parent.span_id, "016x") == caller_span
    attributes = dict(listed.attributes or {})
    assert attributes["rpc.system"] == "connect_rpc"
    assert attributes["rpc.method"] == "ListModels"
    assert "rpc.connect_rpc.error_code" not in attributes
    # no traceparent: the call starts a trace, and its id is the call's request id
    assert missing.parent is None
    assert dict(missing.attributes or {})["rpc.connect_rpc.error_code"] == "not_found"
    assert untraced_request_id == format(missing.context.trace_id, "032x")


def connect_stream(
    gateway: Running, method: str, messages: list[bytes], token: str | None
) -> tuple[list[bytes], dict[str, Any]]:
    """One Connect client-streaming call (enveloped binary messages); (the response messages,
    the end-of-stream JSON)."""
    body = b"".join(b"\0" + len(m).to_bytes(4, "big") + m for m in messages)
    headers = {"content-type": "application/connect+proto", "connect-protocol-version": "1"}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        f"{base_url(gateway)}/riffloop.v1.GatewayService/{method}", body, headers, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        data = response.read()
    out, end, at = [], {}, 0
    while at < len(data):
        flags, size = data[at], int.from_bytes(data[at + 1 : at + 5], "big")
        payload = data[at + 5 : at + 5 + size]
        at += 5 + size
        if flags & 0x02:
            end = json.loads(payload or b"{}")
        else:
            out.append(payload)
    return out, end


def test_a_streamed_upload_over_connect_is_checked_as_over_grpc() -> None:
    limit = 100_000
    running = start_service("gateway", shared_ports(), connect_port=0, max_upload_bytes=limit)
    try:
        token = TokenSigner(SECRET).issue("streamer")
        song = wav_bytes(seconds=1.5)  # 66 KB: under the limit
        head = pb.UploadSongRequest(metadata=pb.UploadSongMetadata(content_type="audio/wav"))
        chunks = [song[i : i + 8192] for i in range(0, len(song), 8192)]
        parts = [head.SerializeToString()] + [
            pb.UploadSongRequest(chunk=c).SerializeToString() for c in chunks
        ]
        assert len(song) <= limit
        out, end = connect_stream(running, "UploadSong", parts, token)
        assert "error" not in end, end
        assert pb.UploadSongResponse.FromString(out[0]).duration_seconds == pytest.approx(1.5)
        # no token: refused before the stream is gathered, as the gRPC interceptor does
        _, end = connect_stream(running, "UploadSong", parts, None)
        assert end["error"]["code"] == "unauthenticated"
        # empty messages count no bytes; their number is capped (2 + limit // 4 KiB)
        empty = pb.UploadSongRequest(chunk=b"").SerializeToString()
        _, end = connect_stream(running, "UploadSong", [parts[0]] + [empty] * 100, token)
        assert end["error"]["code"] == "invalid_argument"
        assert "at most 26 messages (chunks of 4096 bytes or more)" in end["error"]["message"]
    finally:
        running.channel.close()
        running.runtime.stop()


def test_a_request_other_than_an_upload_is_read_up_to_256_kib(gateway: Running) -> None:
    token = TokenSigner(SECRET).issue("bulky")
    # a SubmitFeedback of empty items: nothing to charge before it is decoded, so its size is
    # the only bound on what decoding it costs
    items = b"{" + b'"items": [' + b",".join([b"{}"] * 140_000) + b"]}"
    assert len(items) > 256 * 1024
    status, body = connect(gateway, "SubmitFeedback", items, token)
    assert status == 429 and json.loads(body)["code"] == "resource_exhausted", body
    # the largest valid batch (max_feedback_batch's default of 100 items, 64-character ids,
    # both timestamps set) is a tenth of it in JSON
    from google.protobuf import json_format

    stamp = {"seconds": 1_800_000_000, "nanos": 999_999_999}
    item = pb.FeedbackItem(
        listen=pb.ReportListenRequest(
            track_id="t" * 64, seconds_listened=123.456789, completed=True, client_time=stamp
        )
    )
    full = pb.SubmitFeedbackRequest(items=[item] * 100)
    assert len(json_format.MessageToJson(full).encode()) < 256 * 1024 // 8


def test_a_streamed_upload_holds_its_in_flight_place_while_it_is_gathered() -> None:
    """Over Connect a streamed upload is gathered in memory before its handler runs: the rate
    limit and the in-flight cap apply before the first message is read, as over gRPC, so one
    user cannot hold many gathering uploads at once."""
    import socket

    running = start_service("gateway", shared_ports(), connect_port=0, max_user_uploads_in_flight=1)
    port = cast(Any, running.runtime.worker("connect")).port
    token = TokenSigner(SECRET).issue("hoarder")
    head = pb.UploadSongRequest(metadata=pb.UploadSongMetadata(content_type="audio/wav"))
    first = head.SerializeToString()
    slow = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        # a stream that sends its first message and then waits (chunked, never finished)
        frame = b"\0" + len(first).to_bytes(4, "big") + first
        slow.sendall(
            b"POST /riffloop.v1.GatewayService/UploadSong HTTP/1.1\r\n"
            b"host: 127.0.0.1\r\ncontent-type: application/connect+proto\r\n"
            b"connect-protocol-version: 1\r\n"
            + f"authorization: Bearer {token}\r\n".encode()
            + b"transfer-encoding: chunked\r\n\r\n"
            + f"{len(frame):x}\r\n".encode()
            + frame
            + b"\r\n"
        )
        song = wav_bytes(seconds=1.6)
        parts = [first, pb.UploadSongRequest(chunk=song).SerializeToString()]
        deadline = time.monotonic() + 10
        while True:  # the first stream takes its place as soon as its call starts
            _, end = connect_stream(running, "UploadSong", parts, token)
            if end.get("error") or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert end["error"]["code"] == "resource_exhausted", end
        assert "limit 1 per user" in end["error"]["message"]
        # another user is not held up, and the place comes back when the stream ends
        other = TokenSigner(SECRET).issue("neighbour")
        assert "error" not in connect_stream(running, "UploadSong", parts, other)[1]
        slow.close()
        deadline = time.monotonic() + 10
        while "error" in connect_stream(running, "UploadSong", parts, token)[1]:
            assert time.monotonic() < deadline, "the place was not given back"
            time.sleep(0.1)
    finally:
        slow.close()
        running.channel.close()
        running.runtime.stop()
