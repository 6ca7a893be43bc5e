"""Console sign-in sessions: the operator's token sealed in an HttpOnly cookie.

The cookie holds the token and a CSRF secret, encrypted and authenticated (Fernet) with a
key derived from the control plane's key material (its first CA's key, kept across a CA change
in `box.key`), which every replica holds: a session works on any replica and across restarts,
and nothing about it is stored. It expires after
`SESSION_TTL_S`; the token itself is checked by the operator API on every call, and an open
live page's stream again every few seconds and before each change it sends. A revoked
operator is out at once on the replica that revoked it, on the others as soon as the store's
change notification reaches them (PostgreSQL) and within `TOKEN_CACHE_S` (5 s,
cloud/service/guard.py) at most; an open live page within twice that at most (it ends with a
`failed` event saying so)."""

from __future__ import annotations

import base64
import hmac
import json
import secrets
from dataclasses import dataclass

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

COOKIE = "autoglm_console"
SESSION_TTL_S = 12 * 3600
MAX_TOKEN_CHARS = 200


@dataclass(frozen=True)
class ConsoleSession:
    """A signed-in browser: the operator token its calls carry, its CSRF secret."""

    token: str
    csrf: str

    def csrf_ok(self, submitted: str) -> bool:
        return bool(submitted) and hmac.compare_digest(submitted.encode(), self.csrf.encode())


class SessionSeal:
    """Seals sessions into cookie values and opens them again."""

    def __init__(self, key_material: bytes) -> None:
        key = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=b"autoglm console sessions v1"
        ).derive(key_material)
        self._fernet = Fernet(base64.urlsafe_b64encode(key))

    def new(self, token: str) -> tuple[ConsoleSession, str]:
        """A session for `token` and its cookie value."""
        session = ConsoleSession(token=token, csrf=secrets.token_urlsafe(24))
        doc = json.dumps({"t": session.token, "c": session.csrf}).encode()
        return session, self._fernet.encrypt(doc).decode()

    def open(self, cookie: str | None) -> ConsoleSession | None:
        """The session in `cookie`; None when absent, forged, expired or malformed."""
        if not cookie or len(cookie) > 4096:
            return None
        try:
            doc = json.loads(self._fernet.decrypt(cookie.encode(), ttl=SESSION_TTL_S))
        except (InvalidToken, ValueError):
            return None
        if not isinstance(doc, dict):
            return None
        token, csrf = doc.get("t"), doc.get("c")
        if not isinstance(token, str) or not isinstance(csrf, str) or not token or not csrf:
            return None
        return ConsoleSession(token=token, csrf=csrf)


def clean_token(text: str) -> str:
    """A pasted token without surrounding blanks or a 'Bearer ' prefix; '' when unusable."""
    token = text.strip()
    if token.lower().startswith("bearer "):
        token = token[7:].strip()
    if not token or len(token) > MAX_TOKEN_CHARS or not token.isprintable() or " " in token:
        return ""
    return token
