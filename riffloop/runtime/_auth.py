"""Bearer tokens: ``<user id>.<expiry unix s>.<HMAC-SHA256>`` signed with a shared secret.

Stateless, so any gateway replica verifies any token without a lookup. ``TokenSigner.issue`` is
what an identity service (or the demo's simulated listeners, or tests) calls; the gateway only
verifies. User ids are 1–64 characters of ``[A-Za-z0-9_-]``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from collections.abc import Callable

from riffloop.core import UnauthenticatedError, ValidationError

_USER_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class TokenSigner:
    def __init__(self, secret: str, *, clock: Callable[[], float] = time.time) -> None:
        if len(secret) < 16:
            raise ValidationError("the auth secret must be at least 16 characters")
        self._key = secret.encode()
        self._now = clock

    def _mac(self, body: str) -> str:
        digest = hmac.new(self._key, body.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def issue(self, user_id: str, *, ttl_s: float = 24 * 3600) -> str:
        if not _USER_ID.match(user_id):
            raise ValidationError("user id must be 1–64 characters of letters, digits, '_' or '-'")
        body = f"{user_id}.{int(self._now() + ttl_s)}"
        return f"{body}.{self._mac(body)}"

    def verify(self, token: str) -> str:
        parts = token.split(".")
        if len(parts) != 3 or not parts[1].isdigit():
            raise UnauthenticatedError("malformed bearer token")
        user_id, expiry, mac = parts
        if not hmac.compare_digest(mac, self._mac(f"{user_id}.{expiry}")):
            raise UnauthenticatedError("bearer token signature does not match")
        if int(expiry) < self._now():
            raise UnauthenticatedError("bearer token expired")
        if not _USER_ID.match(user_id):
            raise UnauthenticatedError("bearer token names an invalid user id")
        return user_id
