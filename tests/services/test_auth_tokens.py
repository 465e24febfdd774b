"""Bearer JWTs (riffloop.runtime.JwtVerifier): Riffloop's HS256 tokens and an identity
provider's RS256 tokens by kid, from a PEM map or a JWKS URL; what each refusal says."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import json
import threading
import time
from collections.abc import Iterator

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from riffloop.core import UnauthenticatedError
from riffloop.runtime import JwtVerifier, TokenSigner, hmac_kid

pytestmark = pytest.mark.unit

SECRET = "s" * 24
ISSUER = "https://id.example.org/realms/riffloop"


def _rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _idp_token(key: rsa.RSAPrivateKey, kid: str, **claims: object) -> str:
    body = {"sub": "ida", "iss": ISSUER, "aud": "riffloop-gateway", "exp": time.time() + 600}
    body.update(claims)
    return jwt.encode(body, key, algorithm="RS256", headers={"kid": kid})


def test_a_verified_token_is_remembered_but_still_expires() -> None:
    now = [1_000.0]
    signer = TokenSigner(SECRET, clock=lambda: now[0])
    verifier = JwtVerifier(
        hmac_secrets={hmac_kid(SECRET): SECRET}, leeway_s=0, clock=lambda: now[0]
    )
    token = signer.issue("alice", ttl_s=60)
    assert verifier.verify(token) == "alice"
    assert verifier.verify(token) == "alice"  # from memory
    now[0] += 61
    with pytest.raises(UnauthenticatedError, match="expired"):
        verifier.verify(token)


def test_identity_provider_keys_by_kid_and_rotation() -> None:
    old, new = _rsa(), _rsa()
    verifier = JwtVerifier(
        hmac_secrets={hmac_kid(SECRET): SECRET},
        public_keys={"k1": old.public_key(), "k2": new.public_key()},
        issuer=ISSUER,
    )
    assert verifier.verify(_idp_token(old, "k1")) == "ida"
    assert verifier.verify(_idp_token(new, "k2", sub="ida-2")) == "ida-2"
    with pytest.raises(UnauthenticatedError, match="signature"):
        verifier.verify(_idp_token(old, "k2"))  # signed by another key than its kid names
    with pytest.raises(UnauthenticatedError, match="unknown key"):
        verifier.verify(_idp_token(old, "k3"))
    with pytest.raises(UnauthenticatedError, match="issuer"):
        verifier.verify(_idp_token(old, "k1", iss="https://elsewhere"))
    with pytest.raises(UnauthenticatedError, match="audience"):
        verifier.verify(_idp_token(old, "k1", aud="another-app"))
    with pytest.raises(UnauthenticatedError, match="expired"):
        verifier.verify(_idp_token(old, "k1", exp=time.time() - 3600))
    with pytest.raises(UnauthenticatedError, match="invalid user id"):
        verifier.verify(_idp_token(old, "k1", sub="not an id"))
    no_kid = jwt.encode({"sub": "ida", "iss": ISSUER, "aud": "riffloop-gateway"}, old, "RS256")
    with pytest.raises(UnauthenticatedError, match="kid"):
        verifier.verify(no_kid)


def test_a_public_key_is_never_used_as_an_hmac_secret() -> None:
    """Algorithm confusion: HS256 "signed" with the provider's public PEM under its kid."""
    key = _rsa()
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    verifier = JwtVerifier(public_keys={"k1": key.public_key()}, issuer=ISSUER)
    body = {"sub": "mallory", "iss": ISSUER, "aud": "riffloop-gateway", "exp": time.time() + 60}

    # PyJWT itself refuses to HMAC with a PEM, so the forgery is built by hand.
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "k1"}).encode())
    payload = b64(json.dumps(body).encode())
    mac = b64(hmac.new(pem, f"{head}.{payload}".encode(), hashlib.sha256).digest())
    forged = f"{head}.{payload}.{mac}"
    with pytest.raises(UnauthenticatedError):
        verifier.verify(forged)


@pytest.fixture
def jwks_url() -> Iterator[tuple[str, rsa.RSAPrivateKey]]:
    key = _rsa()
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    body = json.dumps({"keys": [{**jwk, "kid": "idp-1", "use": "sig", "alg": "RS256"}]}).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/jwks", key
    finally:
        server.shutdown()
        server.server_close()


def test_keys_come_from_the_providers_jwks_url(jwks_url: tuple[str, rsa.RSAPrivateKey]) -> None:
    url, key = jwks_url
    verifier = JwtVerifier(jwks_url=url, issuer=ISSUER)
    assert verifier.verify(_idp_token(key, "idp-1")) == "ida"
    with pytest.raises(UnauthenticatedError, match="unknown key"):
        verifier.verify(_idp_token(key, "idp-9"))
