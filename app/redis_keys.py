"""Every Redis key the service uses is built here, so the whole layout can be read (and changed) in one place.

Layout (``{ns}`` is ``REDIS_NAMESPACE``, default ``kb``):

=============================================  ======  =====================================================
key                                            type    holds
=============================================  ======  =====================================================
``{ns}:profile:{e164}``                        string  JSON number profile
``{ns}:profiles``                              set     E.164 numbers that have their own profile
``{ns}:call:{carrier}:{call_id}``              hash    one carrier call leg: session id, numbers, state, stream
``{ns}:call:{carrier}:{call_id}:events``       list    recorded carrier callbacks (capped)
``{ns}:session:{session_id}``                  hash    our view of a Kallglot session and its legs
``{ns}:session:{session_id}:end-claim``        string  end claim's fencing token, then ``ended:{reason}``
``{ns}:seen:{source}:{event_id}``              string  webhook de-duplication marker (SET NX, TTL)
``{ns}:sessions:live``                         zset    sessions not yet ended (score: created at)
``{ns}:calls:recent``                          zset    ``carrier:call_id`` of recent legs (score: created at)
``{ns}:admin:audit``                           list    admin audit entries, newest first (capped)
``{ns}:admin:session:{digest}``                string  a live admin session (SHA-256 of its nonce; TTL 12 h)
``{ns}:admin:signin-delay:{digest}``           hash    failure streak of one (name, address) pair (TTL 24 h)
``{ns}:admin:limiter:LIMITER/{address}/…``     string  Flask-Limiter's failed-sign-in window counters (TTL)
``{ns}:deadlines``                             zset    sessions to end (held, or an ``end`` to retry) by when
``{ns}:heartbeats``                            zset    ``carrier:call_id`` of live legs by when they expire
``{ns}:held:{to}:{from}``                      string  session a returning caller re-attaches to (TTL)
``{ns}:pending-creates``                       zset    ``carrier:call_id`` whose session create is unconfirmed
``{ns}:pending-creates:data``                  hash    ``carrier:call_id`` → the create's idempotency key and args
``{ns}:api:idempotency:{key_hash}``            string  hash of the body first sent with an Idempotency-Key (TTL)
``{ns}:api:rate:{token_hash}:{minute}``        string  ``POST /api/calls`` requests of one token in one minute
``{ns}:api:live:{token_hash}``                 zset    sessions started through the API by one token
``{ns}:relay-nonce:{nonce}``                   string  a relay token's nonce, consumed by its one media socket
``{ns}:relay-lease:{carrier}:{call_id}``       string  nonce of the one relay serving a leg (TTL, renewed)
``{ns}:session:{session_id}:live-events``      stream  the session's live transcript and leg events (capped, TTL)
``{ns}:live-changes``                          stream  "a live session appeared, changed or ended" (capped, TTL)
``{ns}:session:{id}:artifacts:{kind}``         string  JSON cache of the session's transcript/recordings (TTL)
``{ns}:usage:sessions``                        zset    sessions with a billed duration (score: ended at)
``{ns}:agents:waiting``                        zset    sessions waiting for a browser agent (score: deadline)
``{ns}:agents:offer:{session_id}``             hash    a waiting call as agents see it; who took it (TTL)
=============================================  ======  =====================================================

The lifecycle's keys change only through the Lua scripts in :mod:`app.calls.scripts`, whose invariants
are written there. No value stored under these keys is a secret: Kallglot stream tokens travel sealed inside relay tokens
(:mod:`app.relay.tokens`), never through Redis.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, overload

import redis

#: How long call and session records outlive the call, for the call log and late callbacks.
RECORD_TTL_SECONDS = 7 * 24 * 3600
#: Carriers retry webhooks for minutes (Twilio) to ~42 h (Kallglot): keep de-dup markers two days.
SEEN_TTL_SECONDS = 48 * 3600
#: Callbacks kept per call leg.
MAX_EVENTS_PER_CALL = 50
#: Call-log retention: legs older than this drop out of the index (their records expire with RECORD_TTL).
CALL_LOG_RETENTION_SECONDS = RECORD_TTL_SECONDS
CALL_LOG_MAX_ENTRIES = 10_000


@dataclass(frozen=True)
class RedisKeys:
    """Builds namespaced key names; one instance per app (``app.extensions["redis_keys"]``)."""

    namespace: str = "kb"

    def profile(self, number: str) -> str:
        """Key of the profile JSON for an E.164 ``number``."""
        return f"{self.namespace}:profile:{number}"

    def profiles_index(self) -> str:
        """Key of the set of numbers that have their own profile."""
        return f"{self.namespace}:profiles"

    def call(self, carrier: str, call_id: str) -> str:
        """Key of the hash describing one carrier call leg."""
        return f"{self.namespace}:call:{carrier}:{call_id}"

    def call_events(self, carrier: str, call_id: str) -> str:
        """Key of the capped list of callbacks recorded for one call leg."""
        return f"{self.namespace}:call:{carrier}:{call_id}:events"

    def session(self, session_id: str) -> str:
        """Key of the hash describing a Kallglot session as this service sees it."""
        return f"{self.namespace}:session:{session_id}"

    def session_end_claim(self, session_id: str) -> str:
        """Key whose ``SET NX`` decides which worker calls Kallglot's ``end`` for a session."""
        return f"{self.namespace}:session:{session_id}:end-claim"

    def seen(self, source: str, event_id: str) -> str:
        """Key marking a webhook delivery from ``source`` as already handled."""
        return f"{self.namespace}:seen:{source}:{event_id}"

    def live_sessions(self) -> str:
        """Key of the sorted set of sessions not yet ended."""
        return f"{self.namespace}:sessions:live"

    def recent_calls(self) -> str:
        """Key of the sorted set of recent call legs (the call log's index)."""
        return f"{self.namespace}:calls:recent"

    def deadlines(self) -> str:
        """Key of the sorted set of sessions due to be ended (score: when)."""
        return f"{self.namespace}:deadlines"

    def heartbeats(self) -> str:
        """Key of the sorted set of live legs (member ``carrier:call_id``, score: when the leg counts as lost)."""
        return f"{self.namespace}:heartbeats"

    def held(self, to_number: str, from_number: str) -> str:
        """Key naming the held session a new call from ``from_number`` to ``to_number`` re-attaches to."""
        return f"{self.namespace}:held:{to_number}:{from_number}"

    def admin_audit(self) -> str:
        """Key of the capped list of admin audit entries (JSON, newest first)."""
        return f"{self.namespace}:admin:audit"

    def admin_session(self, nonce_digest: str) -> str:
        """Key whose presence keeps the admin session with this nonce digest valid (deleted at sign-out)."""
        return f"{self.namespace}:admin:session:{nonce_digest}"

    def admin_signin_delay(self, pair_digest: str) -> str:
        """Key of the failure streak of one (name, client address) pair, digested."""
        return f"{self.namespace}:admin:signin-delay:{pair_digest}"

    def admin_limiter_prefix(self) -> str:
        """Prefix Flask-Limiter's storage puts before its own ``LIMITER/{address}/{endpoint}/…`` keys."""
        return f"{self.namespace}:admin:limiter"

    def pending_creates(self) -> str:
        """Key of the sorted set of legs whose Kallglot create is not yet matched by a registered leg."""
        return f"{self.namespace}:pending-creates"

    def api_idempotency_body(self, key_hash: str) -> str:
        """Key holding the hash of the body first sent with an API ``Idempotency-Key`` (hashed too)."""
        return f"{self.namespace}:api:idempotency:{key_hash}"

    def api_rate(self, token_hash: str, window: int) -> str:
        """Key counting one API token's calls in one rate window."""
        return f"{self.namespace}:api:rate:{token_hash}:{window}"

    def api_live_calls(self, token_hash: str) -> str:
        """Key of the sorted set of sessions one API token started (pruned as they end)."""
        return f"{self.namespace}:api:live:{token_hash}"

    def relay_nonce(self, nonce: str) -> str:
        """Key whose ``SET NX`` lets exactly one media socket use a relay token."""
        return f"{self.namespace}:relay-nonce:{nonce}"

    def relay_lease(self, carrier: str, call_id: str) -> str:
        """Key naming the one relay (by token nonce) allowed to serve a leg right now."""
        return f"{self.namespace}:relay-lease:{carrier}:{call_id}"

    def pending_create_data(self) -> str:
        """Key of the hash holding each pending create's idempotency key and arguments (no secrets)."""
        return f"{self.namespace}:pending-creates:data"

    def session_live_events(self, session_id: str) -> str:
        """Key of the capped Redis Stream of a session's live transcript and leg events."""
        return f"{self.namespace}:session:{session_id}:live-events"

    def live_changes(self) -> str:
        """Key of the capped Redis Stream announcing that a live session appeared, changed or ended."""
        return f"{self.namespace}:live-changes"

    def session_artifacts(self, session_id: str, kind: str) -> str:
        """Key of the short-lived cache of a session's ``kind`` (``transcript`` or ``recordings``) from Kallglot."""
        return f"{self.namespace}:session:{session_id}:artifacts:{kind}"

    def billed_sessions(self) -> str:
        """Key of the sorted set of sessions with a recorded billed duration (score: when they ended)."""
        return f"{self.namespace}:usage:sessions"

    def agents_waiting(self) -> str:
        """Key of the sorted set of sessions offered to browser agents (score: when the wait runs out)."""
        return f"{self.namespace}:agents:waiting"

    def agent_offer(self, session_id: str) -> str:
        """Key of the hash describing a call offered to browser agents, and the agent leg that took it."""
        return f"{self.namespace}:agents:offer:{session_id}"


def first_seen(client: redis.Redis, key: str, value: str = "1", ttl_seconds: int = SEEN_TTL_SECONDS) -> bool:
    """True the first time ``key`` (a :meth:`RedisKeys.seen` marker) is claimed, False for every repeat.

    The one de-duplication primitive (``SET NX EX``) for webhook deliveries and retried requests, so every
    "have we handled this already?" question is answered the same way and expires the same way.
    """
    return bool(client.set(key, value, nx=True, ex=ttl_seconds))


@overload
def as_text(value: bytes | str) -> str: ...


@overload
def as_text(value: None) -> None: ...


def as_text(value: bytes | str | None) -> str | None:
    """A Redis reply as text: the clients here return bytes (``decode_responses`` is off, so binary-safe),
    everything we store is UTF-8 text; ``None`` (no such key) stays ``None``."""
    return value.decode() if isinstance(value, bytes) else value


def as_text_map(raw: Mapping[Any, Any]) -> dict[str, str]:
    """A Redis hash reply (``HGETALL``) as text keys and values."""
    return {as_text(k): as_text(v) for k, v in raw.items()}
