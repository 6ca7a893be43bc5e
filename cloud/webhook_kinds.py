"""The kinds of alert delivery targets and their secrets (light: the CLI imports it)."""

from __future__ import annotations

import base64
import re
import secrets

from edge_agent.errors import InvalidInput

KINDS = ("standard", "pagerduty", "alertmanager")
PAGERDUTY_URL = "https://events.pagerduty.com/v2/enqueue"
SECRET_PREFIX = "whsec_"
MIN_SECRET_BYTES = 24


def new_secret() -> str:
    """A fresh Standard Webhooks secret: `whsec_` and 32 random bytes in base64."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def check_secret(kind: str, secret: str) -> str:
    """The secret to store for a target of `kind`; InvalidInput says what is wrong."""
    if kind not in KINDS:
        raise InvalidInput(f"webhook kind {kind!r} is not one of {', '.join(KINDS)}")
    if kind == "standard":
        if not secret.startswith(SECRET_PREFIX):
            raise InvalidInput(
                "a standard webhook secret is 'whsec_' and base64 (leave --secret out and "
                "one is made for you)"
            )
        try:
            key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
        except ValueError:
            raise InvalidInput("the webhook secret after 'whsec_' is not base64") from None
        if len(key) < MIN_SECRET_BYTES:
            raise InvalidInput(
                f"the webhook secret holds {len(key)} bytes; at least {MIN_SECRET_BYTES}"
            )
    elif kind == "pagerduty" and not re.fullmatch(r"[A-Za-z0-9]{20,64}", secret):
        raise InvalidInput(
            "a pagerduty target needs --secret: the integration's routing key (32 letters "
            "and digits, from the service's Events API v2 integration)"
        )
    elif kind == "alertmanager" and secret and not re.fullmatch(r"[\x21-\x7e]{16,4096}", secret):
        raise InvalidInput(
            "an alertmanager --secret is a bearer token: 16 or more visible ASCII characters"
        )
    return secret
