"""Bearer tokens are JWTs (RFC 7519): the gateway checks signature, issuer, audience, expiry and
the key id (``kid``) that names the signing key, so keys rotate by publishing a new kid beside the
old one. The user id is the ``sub`` claim: 1–64 characters of ``[A-Za-z0-9_-]``.

Two kinds of keys, one :class:`JwtVerifier`:

1. HMAC (HS256) keys shared with Riffloop's own issuers: :class:`TokenSigner` (tests, the demo's
   simulated listeners, the dev sign-in page) signs with ``RIFFLOOP_AUTH_SECRET`` under a kid
   derived from it.
2. Public keys of the platform's identity provider (RS256/ES256/EdDSA): given as PEM per kid,
   or fetched by kid from the provider's JWKS URL (``jwt.PyJWKClient``, cached).

Stateless, so any gateway replica verifies any token without a lookup.

Operators (the experimenter, release tooling, an on-call engineer) call the internal services'
RPCs with an operator token: the same kind of HS256 JWT, signed with ``RIFFLOOP_OPERATOR_SECRET``
for the audience ``riffloop-operator`` (:func:`operator_token`, :class:`OperatorVerifier`), so a
listener's gateway token never opens Promote or Rollback, and an operator token names who called.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import jwt

from riffloop.core import PermissionDeniedError, UnauthenticatedError, ValidationError

_USER_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
DEFAULT_ISSUER = "riffloop"
DEFAULT_AUDIENCE = "riffloop-gateway"
OPERATOR_AUDIENCE = "riffloop-operator"
MIN_SECRET_CHARS = 16
_HMAC_ALGORITHMS = ["HS256"]
# Asymmetric algorithms an identity provider may sign with; "none" and HMAC-with-a-public-key
# confusion are impossible because each key is decoded only with its own family.
_PUBLIC_ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA"]


class TokenExpiredError(UnauthenticatedError):
    """A token that verified but has expired: the caller should fetch a new one."""


def _hmac_key(secret: str) -> bytes:
    """The HS256 key of a secret: SHA-256 of it, so a 16-character secret still gives the
    32-byte key RFC 7518 §3.2 asks for."""
    return hashlib.sha256(b"riffloop-jwt:" + secret.encode()).digest()


def hmac_kid(secret: str) -> str:
    """The kid of an HMAC secret: a short hash, so the secret never appears in a header."""
    return "hs-" + hashlib.sha256(secret.encode()).hexdigest()[:12]


class JwtVerifier:
    """Verify a bearer JWT: its kid names one of the keys, then signature, ``iss``, ``aud``,
    ``exp`` (required, checked against ``clock`` with ``leeway_s``) and ``sub``."""

    def __init__(
        self,
        *,
        hmac_secrets: Mapping[str, str] | None = None,
        public_keys: Mapping[str, Any] | None = None,
        jwks_url: str = "",
        issuer: str = DEFAULT_ISSUER,
        audience: str = DEFAULT_AUDIENCE,
        leeway_s: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._hmac = {kid: _hmac_key(secret) for kid, secret in (hmac_secrets or {}).items()}
        self._public = dict(public_keys or {})
        self._jwks = jwt.PyJWKClient(jwks_url, cache_keys=True) if jwks_url else None
        if not (self._hmac or self._public or self._jwks):
            raise ValidationError("a token verifier needs at least one key")
        self.issuer = issuer
        self.audience = audience
        self.leeway_s = leeway_s
        self._now = clock
        # token → (user, exp) of tokens that verified: a client sends the same token with every
        # call, and a full JWT check costs ~0.1 ms of CPU (ten times the HMAC compare it replaced).
        # Bounded: emptied when full. Expiry is still checked on every hit.
        self._verified: dict[str, tuple[str, float]] = {}

    _CACHE_SIZE = 20_000

    def _key(self, kid: str) -> tuple[Any, list[str]]:
        if kid in self._hmac:
            return self._hmac[kid], _HMAC_ALGORITHMS
        if kid in self._public:
            return self._public[kid], _PUBLIC_ALGORITHMS
        if self._jwks is not None:
            try:
                return self._jwks.get_signing_key(kid).key, _PUBLIC_ALGORITHMS
            except jwt.PyJWKClientError:
                pass
        raise UnauthenticatedError(f"bearer token is signed with an unknown key (kid {kid[:40]!r})")

    def verify(self, token: str) -> str:
        known = self._verified.get(token)
        if known is not None:
            user_id, expiry = known
            if expiry + self.leeway_s < self._now():
                raise TokenExpiredError("bearer token expired")
            return user_id
        user_id, expiry = self._verify(token)
        if len(self._verified) >= self._CACHE_SIZE:
            self._verified.clear()
        self._verified[token] = (user_id, expiry)
        return user_id

    def _verify(self, token: str) -> tuple[str, float]:
        if token.count(".") != 2:
            raise UnauthenticatedError("malformed bearer token (expected a JWT)")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            raise UnauthenticatedError(
                "bearer token signature does not match (the token is not a valid JWT)"
            ) from None
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise UnauthenticatedError("bearer token names no key id (kid)")
        key, algorithms = self._key(kid)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=algorithms,
                audience=self.audience,
                issuer=self.issuer,
                # exp is checked below against this verifier's clock
                options={"require": ["exp", "iss", "aud", "sub"], "verify_exp": False},
                leeway=self.leeway_s,
            )
        except jwt.InvalidSignatureError:
            raise UnauthenticatedError("bearer token signature does not match") from None
        except jwt.InvalidAudienceError:
            raise UnauthenticatedError(
                f"bearer token is not for this audience (expected {self.audience!r})"
            ) from None
        except jwt.InvalidIssuerError:
            raise UnauthenticatedError(
                f"bearer token has the wrong issuer (expected {self.issuer!r})"
            ) from None
        except jwt.MissingRequiredClaimError as err:
            raise UnauthenticatedError(f"bearer token lacks the {err.claim!r} claim") from None
        except jwt.InvalidTokenError as err:
            raise UnauthenticatedError(f"bearer token refused: {err}") from None
        expiry = claims["exp"]
        if not isinstance(expiry, int | float) or expiry + self.leeway_s < self._now():
            raise TokenExpiredError("bearer token expired")
        user_id = claims["sub"]
        if not isinstance(user_id, str) or not _USER_ID.match(user_id):
            raise UnauthenticatedError("bearer token names an invalid user id")
        return user_id, float(expiry)


class TokenSigner:
    """Issues HS256 JWTs under the kid of ``secret`` (what an identity service, the demo's
    simulated listeners, the dev sign-in page or tests call) and verifies them."""

    def __init__(
        self,
        secret: str,
        *,
        issuer: str = DEFAULT_ISSUER,
        audience: str = DEFAULT_AUDIENCE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if len(secret) < MIN_SECRET_CHARS:
            raise ValidationError(f"the auth secret must be at least {MIN_SECRET_CHARS} characters")
        self._secret = secret
        self.kid = hmac_kid(secret)
        self.issuer = issuer
        self.audience = audience
        self._now = clock
        self._verifier = JwtVerifier(
            hmac_secrets={self.kid: secret},
            issuer=issuer,
            audience=audience,
            leeway_s=0.0,
            clock=clock,
        )

    def issue(self, user_id: str, *, ttl_s: float = 24 * 3600) -> str:
        if not _USER_ID.match(user_id):
            raise ValidationError("user id must be 1–64 characters of letters, digits, '_' or '-'")
        now = self._now()
        claims = {
            "sub": user_id,
            "iss": self.issuer,
            "aud": self.audience,
            "iat": int(now),
            "exp": int(now + ttl_s),
        }
        return jwt.encode(
            claims, _hmac_key(self._secret), algorithm="HS256", headers={"kid": self.kid}
        )

    def verify(self, token: str) -> str:
        return self._verifier.verify(token)


def operator_token(secret: str, operator: str = "operator", *, ttl_s: float = 12 * 3600) -> str:
    """An operator token for the internal RPCs: an HS256 JWT signed with ``secret``
    (``RIFFLOOP_OPERATOR_SECRET``) for the audience ``riffloop-operator``, naming ``operator``."""
    return TokenSigner(secret, audience=OPERATOR_AUDIENCE).issue(operator, ttl_s=ttl_s)


class OperatorVerifier:
    """Checks operator tokens (:func:`operator_token`) for the internal services.

    A token that does not verify under this deployment's operator secret (another secret, a
    listener's gateway token, a forged or garbled one) is a wrong credential: PERMISSION_DENIED.
    An expired operator token stays UNAUTHENTICATED: a fresh one fixes it."""

    def __init__(
        self, secret: str, *, leeway_s: float = 30.0, clock: Callable[[], float] = time.time
    ) -> None:
        if len(secret) < MIN_SECRET_CHARS:
            raise ValidationError(
                f"the operator secret must be at least {MIN_SECRET_CHARS} characters"
            )
        self._jwt = JwtVerifier(
            hmac_secrets={hmac_kid(secret): secret},
            audience=OPERATOR_AUDIENCE,
            leeway_s=leeway_s,
            clock=clock,
        )

    def verify(self, token: str) -> str:
        try:
            return self._jwt.verify(token)
        except TokenExpiredError:
            raise
        except UnauthenticatedError as err:
            raise PermissionDeniedError(
                f"not an operator credential of this deployment ({err.reason})"
            ) from None


__all__ = [
    "OPERATOR_AUDIENCE",
    "JwtVerifier",
    "OperatorVerifier",
    "TokenExpiredError",
    "TokenSigner",
    "hmac_kid",
    "operator_token",
]
