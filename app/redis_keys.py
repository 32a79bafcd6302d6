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
``{ns}:admin:signin-failures:{scope}``         string  failed admin sign-ins in the current window (TTL)
``{ns}:deadlines``                             zset    sessions to end (held, or an ``end`` to retry) by when
``{ns}:heartbeats``                            zset    ``carrier:call_id`` of live legs by when they expire
``{ns}:held:{to}:{from}``                      string  session a returning caller re-attaches to (TTL)
``{ns}:pending-creates``                       zset    ``carrier:call_id`` whose session create is unconfirmed
``{ns}:pending-creates:data``                  hash    ``carrier:call_id`` → the create's idempotency key and args
=============================================  ======  =====================================================

The lifecycle's keys change only through the Lua scripts in :mod:`app.calls.scripts`, whose invariants
are written there. No value stored under these keys is a secret: Kallglot stream tokens travel sealed inside relay tokens
(:mod:`app.relay.tokens`), never through Redis.
"""
from __future__ import annotations

from dataclasses import dataclass

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

    def admin_signin_failures(self, scope: str) -> str:
        """Key counting failed admin sign-ins for ``scope`` (a client address, or ``*`` for all) in a window."""
        return f"{self.namespace}:admin:signin-failures:{scope}"

    def pending_creates(self) -> str:
        """Key of the sorted set of legs whose Kallglot create is not yet matched by a registered leg."""
        return f"{self.namespace}:pending-creates"

    def pending_create_data(self) -> str:
        """Key of the hash holding each pending create's idempotency key and arguments (no secrets)."""
        return f"{self.namespace}:pending-creates:data"


def first_seen(client: redis.Redis, key: str, value: str = "1", ttl_seconds: int = SEEN_TTL_SECONDS) -> bool:
    """True the first time ``key`` (a :meth:`RedisKeys.seen` marker) is claimed, False for every repeat.

    The one de-duplication primitive (``SET NX EX``) for webhook deliveries and retried requests, so every
    "have we handled this already?" question is answered the same way and expires the same way.
    """
    return bool(client.set(key, value, nx=True, ex=ttl_seconds))
