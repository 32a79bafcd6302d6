"""Sealed, short-lived relay tokens.

Carriers drop query strings from stream URLs, so the TwiML/TeXML answer hands the relay token to the
carrier as a stream ``<Parameter>``; the carrier gives it back in its ``start`` message. The token is
*sealed* (XSalsa20-Poly1305 via PyNaCl's ``SecretBox``, keyed from ``SECRET_KEY``): it is authenticated,
so it cannot be forged, and encrypted, so the Kallglot stream token it carries is readable by nobody —
not the carrier, not the logs, and not Redis, which never sees it at all.

Tokens are single-use: each carries a random nonce that the first media socket presenting it consumes in
Redis (:meth:`RelayGuard.consume`), and a leg runs at most one relay at a time (:meth:`RelayGuard.claim_leg`,
a lease its heartbeat renews): a token replayed on a second socket while the first is live gets nothing.
"""
from __future__ import annotations

import base64
import hashlib
import json
import time
import secrets
from dataclasses import dataclass, field

import nacl.exceptions
import nacl.secret
import nacl.utils
import redis

from app.redis_keys import RedisKeys

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
    #: The token's single-use nonce and expiry (set when opened; not part of what the grant grants).
    nonce: str = field(default="", compare=False)
    expires_at: float = field(default=0.0, compare=False)

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
            "e": int(issued + self.ttl_seconds), "n": secrets.token_urlsafe(12),
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
        if not isinstance(body.get("n"), str) or not body["n"]:
            raise InvalidRelayToken("relay token has no nonce")
        return RelayGrant(session_id=body["s"], carrier=body["k"], call_id=body["c"], speaker=body["p"],
                          stream_url=body["u"], stream_token=body["t"], stream_expires_at=body.get("x"),
                          nonce=body["n"], expires_at=float(body["e"]))

    def verifies(self, token: str | None, *, carrier: str, now: float | None = None) -> bool:
        """True when ``token`` is one of ours for ``carrier`` and unexpired, whichever call it is bound to
        (checked at a WebSocket upgrade, before the carrier's ``start`` names the call)."""
        if not token or len(token) > 4096:
            return False
        try:
            body = json.loads(self._box.decrypt(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))))
        except (ValueError, TypeError, nacl.exceptions.CryptoError):
            return False
        return (isinstance(body, dict) and body.get("k") == carrier
                and (time.time() if now is None else now) <= body.get("e", 0))


#: Deletes a leg's relay lease only if it still belongs to the relay releasing it.
_RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RelayGuard:
    """Redis-backed single use of relay tokens and one relay per leg (shared by every worker and instance)."""

    def __init__(self, client: redis.Redis, keys: RedisKeys, lease_seconds: int) -> None:
        self._redis = client
        self._keys = keys
        #: A lease not renewed for this long (its relay's worker died) lapses by itself.
        self.lease_seconds = lease_seconds
        self._release = client.register_script(_RELEASE_LEASE)

    def consume(self, grant: RelayGrant, now: float | None = None) -> bool:
        """True the first time ``grant``'s token is used, False for every replay (until the token expired)."""
        ttl = max(1, int(grant.expires_at - (time.time() if now is None else now)) + 1)
        return bool(self._redis.set(self._keys.relay_nonce(grant.nonce), grant.call_id, nx=True, ex=ttl))

    def claim_leg(self, grant: RelayGrant) -> bool:
        """Take the leg's relay lease; False while another relay holds it (and beats its heartbeat)."""
        return bool(self._redis.set(self._keys.relay_lease(grant.carrier, grant.call_id), grant.nonce, nx=True,
                                    ex=self.lease_seconds))

    def renew_leg(self, grant: RelayGrant) -> None:
        """Keep the lease (called with each heartbeat)."""
        self._redis.expire(self._keys.relay_lease(grant.carrier, grant.call_id), self.lease_seconds)

    def release_leg(self, grant: RelayGrant) -> None:
        """Give the lease up when the relay ends (only if it is still this relay's)."""
        self._release(keys=[self._keys.relay_lease(grant.carrier, grant.call_id)], args=[grant.nonce])

    def forget_leg(self, carrier: str, call_id: str) -> None:
        """Drop the leg's lease: the carrier itself reported its stream over (a restore may start at once)."""
        self._redis.delete(self._keys.relay_lease(carrier, call_id))
