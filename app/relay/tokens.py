"""Sealed, short-lived relay tokens.

Carriers drop query strings from stream URLs, so the TwiML/TeXML answer hands the relay token to the
carrier as a stream ``<Parameter>``; the carrier gives it back in its ``start`` message. The token is
*sealed* (XSalsa20-Poly1305 via PyNaCl's ``SecretBox``, keyed from ``SECRET_KEY``): it is authenticated,
so it cannot be forged, and encrypted, so the Kallglot stream token it carries is readable by nobody —
not the carrier, not the logs, and not Redis, which never sees it at all.
"""
from __future__ import annotations

import base64
import hashlib
import json
import time
from dataclasses import dataclass

import nacl.exceptions
import nacl.secret
import nacl.utils

from app.kallglot.client import StreamGrant

#: Names of the stream parameters the carriers' answers set and the relay reads back from ``start``.
SESSION_PARAMETER = "session_id"
RELAY_TOKEN_PARAMETER = "relay_token"
#: Long enough for a greeting before ``<Connect>``; Kallglot's stream token lives 5 minutes anyway.
RELAY_TOKEN_TTL_SECONDS = 300


class InvalidRelayToken(Exception):
    """The token is missing, forged, expired, or bound to another call."""


@dataclass(frozen=True)
class RelayGrant:
    """What a relay needs to bridge one call leg: which session, which call, and how to reach Kallglot."""

    session_id: str
    carrier: str
    call_id: str
    speaker: str
    stream_url: str
    stream_token: str
    stream_expires_at: float | None

    def __repr__(self) -> str:  # never print the Kallglot stream token
        return (f"RelayGrant(session_id={self.session_id!r}, carrier={self.carrier!r}, call_id={self.call_id!r}, "
                f"speaker={self.speaker!r})")


class RelayTokenSealer:
    """Seals and opens relay tokens with a key derived from ``SECRET_KEY``."""

    def __init__(self, secret_key: str, ttl_seconds: int = RELAY_TOKEN_TTL_SECONDS) -> None:
        key = hashlib.sha256(b"kallglot-bridge relay token v1\0" + secret_key.encode()).digest()
        self._box = nacl.secret.SecretBox(key)
        self.ttl_seconds = ttl_seconds

    def seal(self, grant: RelayGrant, now: float | None = None) -> str:
        """Return a URL-safe token carrying ``grant`` that expires ``ttl_seconds`` from ``now``."""
        issued = time.time() if now is None else now
        body = {
            "s": grant.session_id, "k": grant.carrier, "c": grant.call_id, "p": grant.speaker,
            "u": grant.stream_url, "t": grant.stream_token, "x": grant.stream_expires_at,
            "e": int(issued + self.ttl_seconds),
        }
        sealed = self._box.encrypt(json.dumps(body, separators=(",", ":")).encode())
        return base64.urlsafe_b64encode(bytes(sealed)).decode().rstrip("=")

    def seal_stream(self, stream: StreamGrant, *, session_id: str, carrier: str, call_id: str, speaker: str,
                    now: float | None = None) -> str:
        """A relay token that lets the media socket of ``carrier``'s ``call_id`` into ``session_id``'s Kallglot
        ``stream`` as ``speaker``: how every carrier answer seals one."""
        expires = stream.expires_at.timestamp() if stream.expires_at else None
        return self.seal(RelayGrant(session_id=session_id, carrier=carrier, call_id=call_id, speaker=speaker,
                                    stream_url=stream.url, stream_token=stream.token, stream_expires_at=expires),
                         now=now)

    def open(self, token: str | None, *, carrier: str, call_id: str | None, now: float | None = None) -> RelayGrant:
        """Verify ``token`` and return its grant; it must be unexpired and bound to this carrier and call."""
        if not token or len(token) > 4096:
            raise InvalidRelayToken("missing relay token")
        try:
            raw = self._box.decrypt(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
            body = json.loads(raw)
        except (ValueError, TypeError, nacl.exceptions.CryptoError) as exc:
            raise InvalidRelayToken("relay token does not verify") from exc
        if (time.time() if now is None else now) > body.get("e", 0):
            raise InvalidRelayToken("relay token expired")
        if body.get("k") != carrier or body.get("c") != call_id:
            raise InvalidRelayToken("relay token belongs to another call")
        return RelayGrant(session_id=body["s"], carrier=body["k"], call_id=body["c"], speaker=body["p"],
                          stream_url=body["u"], stream_token=body["t"], stream_expires_at=body.get("x"))
