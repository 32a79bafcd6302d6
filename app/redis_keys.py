"""Every Redis key the service uses is built here, so the whole layout can be read (and changed) in one place.

Layout (``{ns}`` is ``REDIS_NAMESPACE``, default ``kb``; ``{S}`` is a lifecycle shard's hash tag, below):

=============================================  ======  =====================================================
key                                            type    holds
=============================================  ======  =====================================================
``{ns}:profile:{e164}``                        string  JSON number profile
``{ns}:profiles``                              set     E.164 numbers that have their own profile
``{ns}:call:{carrier}:{call_id}``              hash    one call leg's description: session id, numbers, speaker
``{ns}:{S}:leg:{carrier}:{call_id}``           hash    the leg's state: live/ended, stream, epoch, end reason
``{ns}:{S}:leg:{carrier}:{call_id}:gen``       string  generation of the leg's newest carrier stream (Telnyx)
``{ns}:call:{carrier}:{call_id}:events``       list    recorded carrier callbacks (capped)
``{ns}:{S}:session:{session_id}``              hash    our view of a Kallglot session and its legs
``{ns}:{S}:session:{session_id}:end-claim``    string  end claim's fencing token, then ``ended:{reason}``
``{ns}:seen:{source}:{event_id}``              string  webhook de-duplication marker (SET NX, TTL)
``{ns}:{S}:sessions:live``                     zset    the shard's sessions not yet ended (score: created at)
``{ns}:{S}:calls:recent``                      zset    ``carrier:call_id`` of recent legs (score: created at)
``{ns}:admin:audit``                           list    admin audit entries, newest first (capped)
``{ns}:admin:session:{digest}``                string  a live admin session (SHA-256 of its nonce; TTL 12 h)
``{ns}:admin:signin-delay:{digest}``           hash    failure streak of one (name, address) pair (TTL 24 h)
``{ns}:admin:limiter:LIMITER/{address}/…``     string  Flask-Limiter's failed-sign-in window counters (TTL)
``{ns}:{S}:deadlines``                         zset    the shard's sessions to end (held, ``end`` retry) by when
``{ns}:{S}:heartbeats``                        zset    ``carrier:call_id`` of the shard's live legs by expiry
``{ns}:held:{to}:{from}``                      string  session a returning caller re-attaches to (TTL)
``{ns}:{S}:pending-creates``                   zset    ``carrier:call_id`` whose session create is unconfirmed
``{ns}:{S}:pending-creates:data``              hash    ``carrier:call_id`` → the create's idempotency key and args
``{ns}:api:idempotency:{key_hash}``            string  hash of the body first sent with an Idempotency-Key (TTL)
``{ns}:api:rate:{token_hash}:{minute}``        string  ``POST /api/calls`` requests of one token in one minute
``{ns}:api:live:{token_hash}``                 zset    sessions started through the API by one token
``{ns}:relay-nonce:{nonce}``                   string  a relay token's nonce, consumed by its one media socket
``{ns}:relay-lease:{carrier}:{call_id}``       string  nonce of the one relay serving a leg (TTL, renewed)
``{ns}:worker-alive:{worker_id}``              string  present while that bridge worker runs (1 s TTL, renewed)
``{ns}:{S}:session:{id}:live-events``          stream  the session's live transcript and leg events (capped, TTL)
``{ns}:live-changes``                          stream  "a live session appeared, changed or ended" (capped, TTL)
``{ns}:{S}:session:{id}:artifacts:{kind}``     string  JSON cache of the session's transcript/recordings (TTL)
``{ns}:{S}:usage:sessions``                    zset    the shard's sessions with a billed duration (score: ended)
``{ns}:{A}:agents:waiting``                    zset    sessions waiting for a browser agent (score: deadline)
``{ns}:{A}:agents:offer:{session_id}``         hash    a waiting call as agents see it; who took it (TTL)
=============================================  ======  =====================================================

The lifecycle's keys change only through the Lua scripts in :mod:`app.calls.scripts`, whose invariants
are written there.

**Designed for Redis Cluster.** Every Lua script and every ``MULTI`` touches keys of one hash slot, so the same
code runs on a standalone server, under Sentinel and on a cluster (ElastiCache/MemoryDB cluster mode, Redis
Enterprise). The lifecycle is split into :data:`LIFECYCLE_SHARDS` shards; ``{S}`` is the shard's hash tag
(``{kb.7.12}``, say: only the part in braces picks the slot). A session belongs to the shard
``crc32(session_id) % LIFECYCLE_SHARDS``, and everything a lifecycle script touches for it lives under that tag:
its session hash and end claim, its legs' state hashes, and the shard's own deadline, heartbeat and live-session
sets — so a script's keys always share one slot, and the global indexes are ``LIFECYCLE_SHARDS`` sorted sets
instead of one (at 10 000 live calls no single slot takes every heartbeat). Call-log and pending-create
entries (``carrier:call_id``) are sharded the same way by their member. Each shard's tag is chosen so that its
slot falls in the shard's own 1/``LIFECYCLE_SHARDS`` of the 16 384 slots: a cluster that splits the slot range
evenly between its masters (``redis-cli --cluster create`` does, managed services do) gets an even share of
shards on every master. Readers of a global view (the reaper, the live page, the call log, usage) read every
shard and merge.

One global key takes writes from every call and stays unsharded: the ``{ns}:live-changes`` stream (the live
console's "a session appeared, changed or ended"). Its readers wait on it with one ``XREAD BLOCK``, which cannot
span slots on a cluster, and it is written only when a leg changes state — two entries per leg (started,
ended) and one per Kallglot ``session.ended`` webhook, never per frame, heartbeat or transcript line. At 10 000
live one-leg calls of three minutes each that is about 110–170 entries a second (computed, not measured), under a tenth
of the ~2 000 heartbeat scripts a second the shards share; the stream is capped at about 1 000 entries
(``MAXLEN ~``), so the key stays small.

The browser-agent queue (``{A}`` = ``{ns.agents}``) has one tag of its own: its claim script touches the
waiting set and an offer. Four kinds of key stay outside the shards, because they are found by something other than the session: a
call leg's description ``{ns}:call:…`` (found by the carrier's call id; it names the session, whose shard holds
the leg's state), the held-caller hint ``{ns}:held:…`` (found by the numbers), a worker's liveness key
``{ns}:worker-alive:…`` (found by the worker id a relay records on the leg's description) and everything keyed by
a webhook, relay token, API token or admin. Scripts never touch them; :mod:`app.calls.scripts` says how each
invariant holds with those written beside, not inside, a script. Changing this layout means draining live
calls first: keys of calls in progress under the old layout are not found under the new one. No value stored under these keys is a secret: Kallglot stream tokens travel sealed inside relay tokens
(:mod:`app.relay.tokens`), never through Redis.
"""
from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, overload

import redis
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

#: How long call and session records outlive the call, for the call log and late callbacks.
RECORD_TTL_SECONDS = 7 * 24 * 3600
#: Carriers retry webhooks for minutes (Twilio) to ~42 h (Kallglot): keep de-dup markers two days.
SEEN_TTL_SECONDS = 48 * 3600
#: Callbacks kept per call leg.
MAX_EVENTS_PER_CALL = 50
#: Call-log retention: legs older than this drop out of the index (their records expire with RECORD_TTL).
CALL_LOG_RETENTION_SECONDS = RECORD_TTL_SECONDS
CALL_LOG_MAX_ENTRIES = 10_000
#: Shards of the lifecycle (sessions, legs and their deadline/heartbeat/live indexes) — see the module text.
#: Fixed: changing it moves every session to another key, like any layout change (drain calls first).
LIFECYCLE_SHARDS = 16


def shard_tags(namespace: str, shards: int = LIFECYCLE_SHARDS) -> tuple[str, ...]:
    """The hash tag of each shard: ``{ns.i.n}`` with the smallest ``n`` whose slot lies in shard ``i``'s own
    1/``shards`` of the slot range, so an evenly split cluster spreads the shards evenly over its masters."""
    tags = []
    for shard in range(shards):
        low, high = shard * REDIS_CLUSTER_HASH_SLOTS // shards, (shard + 1) * REDIS_CLUSTER_HASH_SLOTS // shards
        suffix = 0
        while not low <= key_slot(f"{namespace}.{shard}.{suffix}".encode()) < high:
            suffix += 1
        tags.append(f"{{{namespace}.{shard}.{suffix}}}")
    return tuple(tags)


@dataclass(frozen=True)
class RedisKeys:
    """Builds namespaced key names; one instance per app (``app.extensions["redis_keys"]``)."""

    namespace: str = "kb"
    #: Each lifecycle shard's hash tag (computed once from the namespace).
    tags: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tags", shard_tags(self.namespace))

    # -- sharding ------------------------------------------------------------------------------------------
    def shard_of(self, name: str) -> int:
        """The lifecycle shard of a session id (or of a ``carrier:call_id`` call-log / pending-create member)."""
        return zlib.crc32(name.encode()) % LIFECYCLE_SHARDS

    def _in_shard_of(self, name: str) -> str:
        return f"{self.namespace}:{self.tags[self.shard_of(name)]}"

    def shards(self) -> range:
        """Every shard number, for readers of a global view (the reaper, the live page, the call log)."""
        return range(LIFECYCLE_SHARDS)

    def _shard(self, shard: int) -> str:
        return f"{self.namespace}:{self.tags[shard]}"

    def profile(self, number: str) -> str:
        """Key of the profile JSON for an E.164 ``number``."""
        return f"{self.namespace}:profile:{number}"

    def profiles_index(self) -> str:
        """Key of the set of numbers that have their own profile."""
        return f"{self.namespace}:profiles"

    def call(self, carrier: str, call_id: str) -> str:
        """Key of the hash describing one carrier call leg (session id, numbers, speaker): found by the call id."""
        return f"{self.namespace}:call:{carrier}:{call_id}"

    def leg(self, session_id: str, carrier: str, call_id: str) -> str:
        """Key of the hash holding a leg's state (``state``, ``stream``, ``epoch``, end…), in its session's shard."""
        return f"{self._in_shard_of(session_id)}:leg:{carrier}:{call_id}"

    def stream_generation(self, session_id: str, carrier: str, call_id: str) -> str:
        """Key of the generation number of a leg's newest carrier media stream (which stream a carrier's stop or
        failure event is about), in its session's shard beside the leg's state."""
        return f"{self._in_shard_of(session_id)}:leg:{carrier}:{call_id}:gen"

    def call_events(self, carrier: str, call_id: str) -> str:
        """Key of the capped list of callbacks recorded for one call leg."""
        return f"{self.namespace}:call:{carrier}:{call_id}:events"

    def session(self, session_id: str) -> str:
        """Key of the hash describing a Kallglot session as this service sees it."""
        return f"{self._in_shard_of(session_id)}:session:{session_id}"

    def session_end_claim(self, session_id: str) -> str:
        """Key whose ``SET NX`` decides which worker calls Kallglot's ``end`` for a session."""
        return f"{self._in_shard_of(session_id)}:session:{session_id}:end-claim"

    def seen(self, source: str, event_id: str) -> str:
        """Key marking a webhook delivery from ``source`` as already handled."""
        return f"{self.namespace}:seen:{source}:{event_id}"

    def live_sessions(self, shard: int) -> str:
        """Key of one shard's sorted set of sessions not yet ended (a session's: ``shard_of(session_id)``)."""
        return f"{self._shard(shard)}:sessions:live"

    def recent_calls(self, shard: int) -> str:
        """Key of one shard of the call log's index (a leg's: ``shard_of("carrier:call_id")``)."""
        return f"{self._shard(shard)}:calls:recent"

    def deadlines(self, shard: int) -> str:
        """Key of one shard's sorted set of sessions due to be ended (score: when)."""
        return f"{self._shard(shard)}:deadlines"

    def heartbeats(self, shard: int) -> str:
        """Key of one shard's sorted set of live legs (member ``carrier:call_id``, score: when it counts as lost);
        a leg beats in its session's shard."""
        return f"{self._shard(shard)}:heartbeats"

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

    def pending_creates(self, shard: int) -> str:
        """Key of one shard of the legs whose Kallglot create is not yet matched by a registered leg (a leg's
        shard: ``shard_of("carrier:call_id")``)."""
        return f"{self._shard(shard)}:pending-creates"

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

    def worker_alive(self, worker_id: str) -> str:
        """Key that exists while bridge worker ``worker_id`` runs (:mod:`app.calls.workers`; short TTL, renewed)."""
        return f"{self.namespace}:worker-alive:{worker_id}"

    def pending_create_data(self, shard: int) -> str:
        """Key of one shard's hash of each pending create's idempotency key and arguments (no secrets)."""
        return f"{self._shard(shard)}:pending-creates:data"

    def session_live_events(self, session_id: str) -> str:
        """Key of the capped Redis Stream of a session's live transcript and leg events."""
        return f"{self._in_shard_of(session_id)}:session:{session_id}:live-events"

    def live_changes(self) -> str:
        """Key of the capped Redis Stream announcing that a live session appeared, changed or ended."""
        return f"{self.namespace}:live-changes"

    def session_artifacts(self, session_id: str, kind: str) -> str:
        """Key of the short-lived cache of a session's ``kind`` (``transcript`` or ``recordings``) from Kallglot."""
        return f"{self._in_shard_of(session_id)}:session:{session_id}:artifacts:{kind}"

    def billed_sessions(self, shard: int) -> str:
        """Key of one shard's sorted set of sessions with a billed duration (score: when they ended)."""
        return f"{self._shard(shard)}:usage:sessions"

    def _agents(self) -> str:
        # One hash tag for the browser-agent queue: its claim script touches the waiting set and one offer
        # (a few writes per offered call, so one slot is plenty).
        return f"{self.namespace}:{{{self.namespace}.agents}}"

    def agents_waiting(self) -> str:
        """Key of the sorted set of sessions offered to browser agents (score: when the wait runs out)."""
        return f"{self._agents()}:agents:waiting"

    def agent_offer(self, session_id: str) -> str:
        """Key of the hash describing a call offered to browser agents, and the agent leg that took it (in the
        waiting set's slot: taking an offer is one script over both)."""
        return f"{self._agents()}:agents:offer:{session_id}"


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
