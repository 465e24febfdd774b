"""The gateway's browser API: GatewayService over the Connect protocol, plus the web page.

One ASGI app (uvicorn, on ``RIFFLOOP_CONNECT_PORT``) serves:

- ``/riffloop.v1.GatewayService/<Method>``: every RPC of the proto over Connect (connectrpc,
  binary or JSON). Each call passes the same checks as over gRPC, in the same order: the bearer
  token (``bearer_user``, the same verifier), the per-user rate limit (the same
  ``RateLimitInterceptor.charge`` and limiter, so both transports draw on one bucket), then the
  same ``GatewayServicer`` handler in a worker thread, in a SERVER span that continues a
  ``traceparent`` header (riffloop.core._tracing). A ``RiffloopError`` becomes the Connect
  code of the same name as its gRPC code, with its reason as the message; anything else is
  ``internal`` with a request id. Browsers cannot stream a request body, so the page uploads
  with ``UploadWholeSong`` (one message; the same size limit); ``UploadSong`` is served too,
  for HTTP/2 Connect clients.
- ``/auth/config`` and, with ``RIFFLOOP_DEV_SIGN_IN`` only, ``/auth/dev-token``: a token for a
  name (development; production tokens come from the identity provider).
- everything else: the built page (``web/dist``), ``index.html`` for unknown paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import mimetypes
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from connectrpc.code import Code
from connectrpc.compat import google_protobuf_codecs
from connectrpc.errors import ConnectError
from connectrpc.method import IdempotencyLevel, MethodInfo, StreamType
from connectrpc.request import RequestContext
from connectrpc.server import ConnectASGIApplication, Endpoint

from riffloop.core import RiffloopError, ValidationError
from riffloop.core._context import correlation_id_var
from riffloop.core._tracing import end_rpc, request_id_of, rpc_span
from riffloop.runtime import (
    RateLimitInterceptor,
    TokenSigner,
    TokenVerifier,
    bearer_user,
    metrics,
)
from riffloop.runtime._logging import request_id_var, user_id_var
from riffloop.v1 import gateway_service_pb2 as pb

_log = logging.getLogger("riffloop.gateway.connect")
SERVICE = "riffloop.v1.GatewayService"
WEB_ROOT = Path(__file__).resolve().parents[2] / "web" / "dist"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
# The two upload methods may carry a whole song; every other request is small (the largest, a
# SubmitFeedback batch of max_feedback_batch items, is ≈ 20 KB in JSON). connectrpc decodes a
# request on the event loop before the handler runs (and so before the caller is known): with
# one 20 MiB limit for all, a 20 MiB JSON SubmitFeedback of empty items took ≈ 0.8 GB and ≈ 35 s
# of the loop (measured at 0.9 MB: 36 MB and 1.6 s).
UPLOAD_METHODS = frozenset({"UploadSong", "UploadWholeSong"})
MESSAGE_BYTES = 256 * 1024  # or 1 KiB per feedback item where max_feedback_batch is larger
# A streamed upload over Connect (HTTP/2 clients; the page sends UploadWholeSong) is gathered in
# memory before its handler runs, and an empty message counts 0 bytes: 2^20 empty frames, 5 MB
# on the wire, held 600 MB. So the messages are counted too: chunks of 4 KiB or more on average.
UPLOAD_CHUNK_FLOOR = 4 * 1024
# What the page may load: its own scripts and styles, blob: audio and images it builds itself.
_SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob:; "
        b"style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


class _CallContext:
    """The little of ``grpc.ServicerContext`` the handlers use (StreamAudio asks is_active)."""

    def is_active(self) -> bool:
        return True

    def time_remaining(self) -> float | None:
        return None


class ConnectGateway:
    """GatewayService's methods as Connect endpoints over the gRPC servicer's handlers."""

    def __init__(
        self,
        servicer: Any,
        verifier: TokenVerifier,
        rate_limit: RateLimitInterceptor,
        *,
        service_name: str,
        max_upload_bytes: int,
        max_feedback_batch: int,
    ) -> None:
        self.servicer = servicer
        self.verifier = verifier
        self.rate_limit = rate_limit
        self.service_name = service_name
        self.max_upload_bytes = max_upload_bytes
        self.max_feedback_batch = max_feedback_batch

    def endpoints(self, uploads: bool) -> dict[str, Any]:
        """The Connect endpoints of the upload methods (``uploads``) or of all the others."""
        out: dict[str, Any] = {}
        for method in pb.DESCRIPTOR.services_by_name["GatewayService"].methods:
            if (method.name in UPLOAD_METHODS) != uploads:
                continue
            info: MethodInfo[Any, Any] = MethodInfo(
                name=method.name,
                service_name=SERVICE,
                input=getattr(pb, method.input_type.name),
                output=getattr(pb, method.output_type.name),
                idempotency_level=IdempotencyLevel.UNKNOWN,
                stream_type=(
                    StreamType.CLIENT_STREAM
                    if method.client_streaming
                    else StreamType.SERVER_STREAM
                    if method.server_streaming
                    else StreamType.UNARY
                ),
            )
            path = f"/{SERVICE}/{method.name}"
            if method.client_streaming:
                out[path] = Endpoint.client_stream(info, self._client_stream(method.name))
            elif method.server_streaming:
                out[path] = Endpoint.server_stream(info, self._server_stream(method.name))
            else:
                out[path] = Endpoint.unary(info, self._unary(method.name))
        return out

    # 1. auth, 2. rate limit, 3. the handler: what the gRPC interceptors do, in their order.
    def _invoke(
        self,
        name: str,
        ctx: RequestContext[Any, Any],
        request: Any,
        run: Callable[[], Any],
        admitted: bool = False,
    ) -> Any:
        headers = ctx.request_headers
        given = str(headers.get("x-request-id", ""))
        # the call's span continues a W3C traceparent header, as over gRPC
        carrier = {str(k).lower(): str(v) for k, v in headers.items()}
        with rpc_span(f"/{SERVICE}/{name}", carrier, system="connect_rpc") as span:
            request_id = given if _REQUEST_ID.match(given) else request_id_of(span)
            ctx.response_headers["x-request-id"] = request_id
            code = "OK"
            try:
                return self._call(name, ctx, request, run, request_id, admitted)
            except ConnectError as exc:
                code = exc.code.name
                raise
            finally:
                end_rpc(span, code, request_id, system="connect_rpc")

    def _call(
        self,
        name: str,
        ctx: RequestContext[Any, Any],
        request: Any,
        run: Callable[[], Any],
        request_id: str,
        admitted: bool,
    ) -> Any:
        """``admitted``: the caller charged the rate limit and holds the in-flight place
        already (a streamed upload, before gathering its messages)."""
        headers = ctx.request_headers
        rid = request_id_var.set(request_id)
        cid = correlation_id_var.set(request_id)
        started = time.perf_counter()
        code = "OK"
        try:
            user = bearer_user(str(headers.get("authorization", "")), self.verifier)
            uid = user_id_var.set(user)
            try:
                if admitted:
                    return run()
                self.rate_limit.charge(name, request)
                with self.rate_limit.admit(name):  # the in-flight caps, as over gRPC
                    return run()
            finally:
                user_id_var.reset(uid)
        except RiffloopError as exc:
            code = exc.grpc_code
            level = logging.ERROR if code == "INTERNAL" else logging.INFO
            _log.log(
                level, "rpc failed", extra={"method": name, "code": code, "reason": exc.reason}
            )
            retry_after = getattr(exc, "retry_after_s", None)
            if retry_after is not None:  # as the gRPC trailer: machine-readable, in ms
                ctx.response_headers["retry-after-ms"] = str(max(1, math.ceil(retry_after * 1000)))
            raise ConnectError(Code[exc.grpc_code], exc.reason) from None
        except Exception as exc:
            code = "INTERNAL"
            _log.error("unexpected error", exc_info=exc, extra={"method": name})
            raise ConnectError(Code.INTERNAL, f"internal error (request id {request_id})") from None
        finally:
            metrics.GRPC_REQUESTS.labels(self.service_name, name, code).inc()
            metrics.GRPC_REQUEST_SECONDS.labels(self.service_name, name).observe(
                time.perf_counter() - started
            )
            correlation_id_var.reset(cid)
            request_id_var.reset(rid)

    def _unary(self, name: str) -> Callable[[Any, RequestContext[Any, Any]], Any]:
        handler = getattr(self.servicer, name)

        async def call(request: Any, ctx: RequestContext[Any, Any]) -> Any:
            return await asyncio.to_thread(
                self._invoke, name, ctx, request, lambda: handler(request, _CallContext())
            )

        return call

    def _server_stream(self, name: str) -> Callable[[Any, RequestContext[Any, Any]], Any]:
        handler = getattr(self.servicer, name)

        async def call(request: Any, ctx: RequestContext[Any, Any]) -> AsyncIterator[Any]:
            # Tracks are seconds long (a few MB at most): the handler's chunks are gathered in
            # the worker thread, then sent, so every error surfaces before the first message.
            chunks = await asyncio.to_thread(
                self._invoke,
                name,
                ctx,
                request,
                lambda: list(handler(request, _CallContext())),
            )
            for chunk in chunks:
                yield chunk

        return call

    def _client_stream(self, name: str) -> Callable[[Any, RequestContext[Any, Any]], Any]:
        handler = getattr(self.servicer, name)
        limit = self.max_upload_bytes
        max_messages = 2 + limit // UPLOAD_CHUNK_FLOOR  # the metadata, the chunks, a short last

        async def call(requests: AsyncIterator[Any], ctx: RequestContext[Any, Any]) -> Any:
            # Who is calling, their rate limit and an in-flight place, before a byte of the
            # stream is gathered (over gRPC the interceptors do the same before the handler
            # reads its first chunk): gathered uploads are bounded per user and per process.
            held = contextlib.ExitStack()
            refusal: RiffloopError | None = None
            try:
                user = bearer_user(str(ctx.request_headers.get("authorization", "")), self.verifier)
                token = user_id_var.set(user)
                try:
                    self.rate_limit.charge(name)
                    held.enter_context(self.rate_limit.admit(name))
                finally:
                    user_id_var.reset(token)
            except RiffloopError as err:
                # nothing is read: ``run`` raises it inside _call, which logs, counts and
                # answers it (an unauthenticated call is refused by _call's own check first)
                refusal = err
            try:
                messages: list[Any] = []
                size = 0
                if refusal is None:
                    async for message in requests:
                        size += message.ByteSize()
                        if size > limit + 64 * 1024:  # refused with the reason; stop reading
                            refusal = ValidationError(f"upload exceeds the limit of {limit} bytes")
                            break
                        if len(messages) == max_messages:
                            refusal = ValidationError(
                                f"an upload may come in at most {max_messages} messages "
                                f"(chunks of {UPLOAD_CHUNK_FLOOR} bytes or more)"
                            )
                            break
                        messages.append(message)

                def run() -> Any:
                    if refusal is not None:
                        raise refusal
                    return handler(iter(messages), _CallContext())

                return await asyncio.to_thread(self._invoke, name, ctx, None, run, True)
            finally:
                held.close()

        return call


class _GatewayConnectApp(ConnectASGIApplication[ConnectGateway]):
    @property
    def path(self) -> str:
        return f"/{SERVICE}"


class GatewayWebApp:
    """The ASGI app: the Connect API, the sign-in helpers and the static page."""

    def __init__(
        self,
        gateway: ConnectGateway,
        *,
        dev_signer: TokenSigner | None,
        web_root: Path = WEB_ROOT,
    ) -> None:
        self.connect = _GatewayConnectApp(
            service=gateway,
            endpoints=lambda service: service.endpoints(uploads=False),
            codecs=google_protobuf_codecs(),
            read_max_bytes=max(MESSAGE_BYTES, 1024 * gateway.max_feedback_batch),
        )
        self.connect_uploads = _GatewayConnectApp(
            service=gateway,
            endpoints=lambda service: service.endpoints(uploads=True),
            codecs=google_protobuf_codecs(),
            # one UploadWholeSong message: the upload limit plus its metadata and framing
            read_max_bytes=gateway.max_upload_bytes + 64 * 1024,
        )
        self.dev_signer = dev_signer
        self.web_root = web_root.resolve()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        if path.startswith(f"/{SERVICE}/"):
            uploads = path.removeprefix(f"/{SERVICE}/") in UPLOAD_METHODS
            await (self.connect_uploads if uploads else self.connect)(scope, receive, send)
        elif path == "/auth/config":
            body = {"devSignIn": self.dev_signer is not None}
            await _respond(send, 200, json.dumps(body).encode(), "application/json")
        elif path == "/auth/dev-token":
            await self._dev_token(scope, receive, send)
        else:
            await self._static(path, send)

    async def _dev_token(self, scope: Any, receive: Any, send: Any) -> None:
        if self.dev_signer is None:
            await _respond(send, 404, b'{"error": "dev sign-in is off"}', "application/json")
            return
        if scope["method"] != "POST":
            await _respond(
                send, 405, b'{"error": "POST a JSON {\\"name\\": ...}"}', "application/json"
            )
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if len(body) > 4096:
                await _respond(send, 413, b'{"error": "too large"}', "application/json")
                return
            if not message.get("more_body"):
                break
        try:
            name = str(json.loads(body or b"{}").get("name", "")).strip()
            token = self.dev_signer.issue(name, ttl_s=12 * 3600)
        except (ValueError, AttributeError):
            await _respond(
                send, 400, b'{"error": "send JSON {\\"name\\": ...}"}', "application/json"
            )
            return
        except ValidationError as err:
            await _respond(
                send, 400, json.dumps({"error": err.reason}).encode(), "application/json"
            )
            return
        await _respond(
            send, 200, json.dumps({"token": token, "user": name}).encode(), "application/json"
        )

    async def _static(self, path: str, send: Any) -> None:
        relative = path.lstrip("/") or "index.html"
        target = (self.web_root / relative).resolve()
        if not target.is_relative_to(self.web_root) or not target.is_file():
            target = self.web_root / "index.html"  # the page routes by its own hash
        if not target.is_file():
            text = b"the web page is not built: run `npm ci && npm run build` in web/"
            await _respond(send, 404, text, "text/plain; charset=utf-8")
            return
        kind = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if kind.startswith("text/") or kind.endswith("javascript"):
            kind += "; charset=utf-8"
        await _respond(send, 200, await asyncio.to_thread(target.read_bytes), kind)


async def _respond(send: Any, status: int, body: bytes, content_type: str) -> None:
    headers = [
        (b"content-type", content_type.encode()),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        *_SECURITY_HEADERS,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class ConnectServer:
    """uvicorn serving ``app`` in a thread: a runtime worker named "connect". The socket is
    bound at construction, so ``port`` is known (port 0 picks a free one) before start."""

    name = "connect"

    def __init__(self, app: Any, host: str, port: int) -> None:
        import uvicorn

        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.port: int = self.socket.getsockname()[1]
        self.socket.listen(1024)  # connections wait in the backlog until uvicorn serves them
        config = uvicorn.Config(
            app, lifespan="off", access_log=False, log_config=None, timeout_graceful_shutdown=5
        )
        self.server = uvicorn.Server(config)
        self.failed: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="connect", daemon=True)

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.socket])
        except BaseException as exc:
            self.failed = exc
            _log.exception("the Connect server died")

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float) -> None:
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self.socket.close()


__all__ = ["ConnectGateway", "ConnectServer", "GatewayWebApp"]
