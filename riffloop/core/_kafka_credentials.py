"""Tell refused SASL credentials apart from an unreachable broker.

A broker that refuses a SCRAM proof closes the connection, and kafka-python 3 reports only
"socket disconnected" and retries until its bootstrap times out: the same outcome as a broker
that is down. When a client with SASL credentials cannot bootstrap, :func:`sasl_refusal` runs one
SASL handshake and SCRAM exchange of its own on a plain socket (TLS first for SASL_SSL):

1. SaslHandshake names the mechanism; a broker that does not offer it says so (a config error);
2. SaslAuthenticate with the client-first message, then with the client proof;
3. an error code, or the connection closed after a message that carries the user's credentials,
   is a refusal. No answer (timeout, connection refused, TLS failure) is no verdict.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Mapping
from typing import Any


class _Closed(Exception):
    """The broker closed the connection."""


def sasl_refusal(config: Mapping[str, Any], timeout_s: float = 5.0) -> str | None:
    """Why the first bootstrap server of this kafka-python client config refuses its SASL
    credentials, or None when it accepts them, is not asked (no SASL) or cannot be asked."""
    if not str(config.get("security_protocol", "")).startswith("SASL_"):
        return None
    servers = config.get("bootstrap_servers") or []
    server = servers[0] if isinstance(servers, list | tuple) else str(servers).split(",")[0]
    host, _, port = str(server).strip().rpartition(":")
    mechanism = str(config.get("sasl_mechanism"))
    user = str(config.get("sasl_plain_username"))
    try:
        raw = socket.create_connection((host, int(port)), timeout=timeout_s)
    except (OSError, ValueError):
        return None
    sock: socket.socket = raw
    try:
        if config["security_protocol"] == "SASL_SSL":
            context = ssl.create_default_context(cafile=config.get("ssl_cafile"))
            sock = context.wrap_socket(raw, server_hostname=host)
        refused = _exchange(sock, config, mechanism)
    except (OSError, ValueError):
        return None
    finally:
        if sock is not raw:  # a TLS socket wraps (detaches) the raw one: close it too
            sock.close()
        raw.close()
    if refused is None:
        return None
    return (
        f"Kafka at {host}:{port} refused the {mechanism} credentials of user {user!r} "
        f"({refused}): check RIFFLOOP_KAFKA_SASL_USERNAME and RIFFLOOP_KAFKA_SASL_PASSWORD "
        "(and that the user exists on the brokers)"
    )


def _exchange(sock: socket.socket, config: Mapping[str, Any], mechanism: str) -> str | None:
    from kafka.net.sasl import get_sasl_mechanism
    from kafka.protocol.parser import KafkaProtocol
    from kafka.protocol.sasl import SaslAuthenticateRequest, SaslHandshakeRequest

    parser = KafkaProtocol(client_id="riffloop-sasl-check")

    def call(request: Any) -> Any:
        parser.send_request(request)
        sock.sendall(parser.send_bytes())
        while True:
            data = sock.recv(65536)
            if not data:
                raise _Closed
            for _, response in parser.receive_bytes(data):
                return response

    try:
        handshake = call(SaslHandshakeRequest(version=1, mechanism=mechanism))
    except _Closed:
        return None  # closed before any credential was sent: not a verdict on them
    if handshake.error_code:
        return f"the listener offers {', '.join(handshake.mechanisms) or 'no mechanism'}"
    client = get_sasl_mechanism(mechanism)(host=sock.getpeername()[0], **config)
    try:
        while not client.is_done():
            response = call(SaslAuthenticateRequest(version=1, auth_bytes=client.auth_bytes()))
            if response.error_code:
                return response.error_message or "SASL_AUTHENTICATION_FAILED"
            client.receive(response.auth_bytes)
    except _Closed:
        return "the broker closed the connection after the credentials"
    except ValueError as err:  # a server-final message that does not verify
        return f"the SCRAM exchange failed: {err}"
    return None
