"""``Kallglot-Signature: t=<unix seconds>,v1=<hex>`` — HMAC-SHA256 over ``"{t}.{raw body}"`` (Kallglot's webhooks
documentation)."""
from __future__ import annotations

import hashlib
import hmac
import time

#: The docs give no tolerance; 300 s matches Telnyx's and Stripe's and bounds replays.
TOLERANCE_SECONDS = 300


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The header value Kallglot would send for ``body`` at ``timestamp`` (used by tests and the emulator)."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify(secret: str, header: str | None, body: bytes, *, now: float | None = None) -> bool:
    """True when ``header`` carries a fresh ``v1`` HMAC of ``body`` under ``secret``; constant-time; fails closed."""
    if not secret or not header or len(header) > 1024:
        return False
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t" and value.isdigit():
            timestamp = int(value)
        elif name == "v1":
            candidates.append(value)  # several v1 values appear while a secret is being rotated
    if timestamp is None or not candidates:
        return False
    if abs((time.time() if now is None else now) - timestamp) > TOLERANCE_SECONDS:
        return False
    expected = sign(secret, body, timestamp).split("v1=", 1)[1]
    return any(hmac.compare_digest(expected, candidate) for candidate in candidates)
