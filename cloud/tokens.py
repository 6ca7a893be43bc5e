"""Secrets shown once and stored hashed: enrollment tokens and operator tokens."""

from __future__ import annotations

import hashlib
import secrets

ENROLLMENT_PREFIX = "agt_enr_"
GROUP_PREFIX = "agt_grp_"  # enrolls up to N devices that name themselves
OPERATOR_PREFIX = "agt_op_"


def new_token(prefix: str) -> str:
    """256 random bits, URL-safe, with a prefix that tells a person what the token is for."""
    return prefix + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """SHA-256 suffices: tokens carry 256 random bits, so there is nothing to brute-force."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()
