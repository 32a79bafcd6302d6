"""What the reapers do: end held sessions when due, retry failed ends, give up legs whose relay stopped
beating, and end sessions whose create was never followed by a registered leg (invariant I3 in
:mod:`app.calls.scripts`). Every step is atomic in Redis, so any number of reapers may run at once, and
each step stays correct when the worker running it is slow rather than dead.
"""
from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Iterator
from typing import Any

import redis

from app.calls.reasons import EndReason
from app.calls.states import SESSION_ENDED, EndOutcome
from app.kallglot.client import KallglotClient, KallglotConflict, KallglotError, KallglotSession
from app.redis_keys import RedisKeys, as_text

log = logging.getLogger(__name__)

#: A create whose leg is not registered this long after it started is presumed orphaned (worker died).
PENDING_CREATE_GRACE_SECONDS = 30
PENDING_CREATE_MAX_BACKOFF_SECONDS = 300
#: A reaper that took a due deadline has this long to finish before another may take it.
DEADLINE_LEASE_SECONDS = 30


def create_may_have_succeeded(exc: KallglotError) -> bool:
    """True when Kallglot may have created the session although the request failed.

    A request that got no answer (timeout, reset) may have been processed; so may one answered "still being
    processed" (409 ``idempotency_conflict``). The client retries after such failures, so its final error
    (a 503, say) does not tell whether an earlier attempt went through: it says so in ``maybe_processed``.
    Any other answer (a 5xx is not remembered by Kallglot's idempotency, a 4xx refuses) created nothing.
    """
    return exc.maybe_processed or exc.status is None or isinstance(exc, KallglotConflict)


def replay_proves_no_session(exc: KallglotError) -> bool:
    """True when a replayed create's failure shows that no session exists under its idempotency key.

    The create being replayed may have succeeded, and Kallglot answers a replay of a processed create with that
    create's response: so only a refusal of the request itself proves nothing was created — invalid (400/422,
    but not ``idempotency_mismatch``, which says the key was used), out of credits (402), not found (404).
    A failure that never reached the idempotency check (unreachable, a 5xx, which is not remembered, 409 still
    running, 429, 401/403) says nothing about the first create, however definitive it is about the replay.
    """
    return exc.status in (400, 402, 404, 422) and exc.code != "idempotency_mismatch"


class RecoveryPasses:
    """The reaper's passes; mixed into :class:`~app.calls.lifecycle.SessionLifecycle`, which provides the state
    below and ``end_session``, ``_give_up_leg``, ``session_for_call`` and ``session_record``."""

    _redis: redis.Redis
    _keys: RedisKeys
    _kallglot: KallglotClient
    _clock: Callable[[], float]
    _take_due: Any  # the registered TAKE_DUE script

    def end_due_sessions(self, now: float | None = None, batch: int = 50) -> int:
        """End (or retry ending) every session whose deadline passed; returns how many this call took."""
        now = self._clock() if now is None else now
        taken = 0
        for shard, session_id in self._take_due_members(self._keys.deadlines, now, batch):
            taken += 1
            outcome = self.end_session(session_id, EndReason.HOLD_EXPIRED, force=False, now=now)
            # ALREADY with the session not ended means another worker's end is within its lease: the lease
            # deadline stays, so the session is looked at again if that worker dies or stalls.
            if outcome is EndOutcome.LEGS_LIVE or (
                    outcome is EndOutcome.ALREADY and self.session_record(session_id).get("status") == SESSION_ENDED):
                self._redis.zrem(self._keys.deadlines(shard), session_id)
        return taken

    def expire_lost_legs(self, now: float | None = None, batch: int = 50,
                         on_lost: Callable[[str, str], object] | None = None) -> int:
        """Treat legs whose relay stopped beating as lost abnormally; returns how many were given up.
        ``on_lost(carrier, call_id)`` runs for each leg this pass gave up (a browser agent's: offer the call again).

        The check "still due?" and the end are one script, so a beat (or a restored stream) that lands after
        this pass read the heartbeats wins; a relay that was merely slow revives its leg on its next beat
        while the session is only held (see :data:`app.calls.scripts.BEAT`).
        """
        now = self._clock() if now is None else now
        given_up = 0
        for shard, member in self._due_members(self._keys.heartbeats, now, batch):
            carrier, _, call_id = member.partition(":")
            if self._give_up_leg(carrier, call_id, now, shard):
                log.warning("%s call=%s relay heartbeat lost", carrier, call_id)
                given_up += 1
                if on_lost is not None:
                    on_lost(carrier, call_id)
        return given_up

    def end_orphaned_creates(self, now: float | None = None, batch: int = 20) -> int:
        """End sessions whose create was never followed by a registered leg; returns how many were taken."""
        now = self._clock() if now is None else now
        taken = 0
        for shard, member in self._take_due_members(self._keys.pending_creates, now, batch):
            taken += 1
            carrier, _, call_id = member.partition(":")
            raw_intent = self._redis.hget(self._keys.pending_create_data(shard), member)
            session_id = self.session_for_call(carrier, call_id)
            if not raw_intent or (session_id and f"leg:{member}" in self.session_record(session_id)):
                # Attached after all; from then on the leg's end and the deadlines account for the session.
                self._forget_pending_create(member)
                continue
            intent = json.loads(raw_intent)
            try:
                session = self._kallglot.create_session(idempotency_key=intent["key"], **intent["args"])
            except KallglotError as exc:
                self._retry_orphan_later(member, intent, exc, now)
                continue
            self._end_orphan(member, carrier, call_id, session, intent, now)
        return taken

    def _end_orphan(self, member: str, carrier: str, call_id: str, session: KallglotSession,
                    intent: dict[str, Any], now: float) -> None:
        """End a replayed orphan through the end claim with ``force`` off: a slow worker that attached a leg
        meanwhile wins (its leg is live), and once this claim is taken that worker's attach is refused."""
        if any(name.startswith("leg:") for name in self.session_record(session.id)):
            self._forget_pending_create(member)  # registered after all, under another call ID (an outbound leg)
            return
        outcome = self.end_session(session.id, EndReason.ORPHANED_CREATE, force=False, now=now)
        if outcome is EndOutcome.FAILED:
            # The session's own deadline retries the end; the intent is no longer needed.
            self._forget_pending_create(member)
            return
        self._forget_pending_create(member)
        if outcome is EndOutcome.ENDED:
            log.warning("%s call=%s session=%s was created but never registered (worker lost?): ended", carrier,
                        call_id, session.id)

    def _retry_orphan_later(self, member: str, intent: dict[str, Any], exc: KallglotError,
                            now: float) -> None:
        intent["attempts"] += 1
        if replay_proves_no_session(exc):
            log.error("%s orphaned create given up: %s", member, exc)
            self._forget_pending_create(member)
            return
        # Never given up while the session may exist (invariant I3): a Kallglot outage only spaces the replays.
        delay = min(PENDING_CREATE_MAX_BACKOFF_SECONDS, 2 ** min(intent["attempts"], 10))
        shard = self._keys.shard_of(member)
        with self._redis.pipeline(transaction=True) as pipe:  # one slot: both keys are in the member's shard
            pipe.hset(self._keys.pending_create_data(shard), member, json.dumps(intent))
            pipe.zadd(self._keys.pending_creates(shard), {member: now + delay})
            pipe.execute()

    def _forget_pending_create(self, member: str) -> None:
        shard = self._keys.shard_of(member)
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.zrem(self._keys.pending_creates(shard), member)
            pipe.hdel(self._keys.pending_create_data(shard), member)
            pipe.execute()

    def _due_members(self, zset_of: Callable[[int], str], now: float, batch: int) -> list[tuple[int, str]]:
        """``(shard, member)`` due by ``now`` in every shard of an index (``zset_of(shard)`` names a shard's
        sorted set), at most ``batch`` per shard: one pipelined read (a cluster client sends one per node).
        The shards come in a random order, so reapers racing through the same due work rarely want the same
        member at the same moment."""
        shards = random.sample(self._keys.shards(), len(self._keys.shards()))
        with self._redis.pipeline(transaction=False) as pipe:
            for shard in shards:
                pipe.zrangebyscore(zset_of(shard), "-inf", now, start=0, num=batch)
            replies = pipe.execute()
        return [(shard, as_text(raw)) for shard, members in zip(shards, replies) for raw in members]

    def _take_due_members(self, zset_of: Callable[[int], str], now: float,
                          batch: int) -> Iterator[tuple[int, str]]:
        """``(shard, member)`` due by ``now`` that this caller took (their score pushed forward by a lease, so
        no other worker takes them meanwhile, and they come due again if this one dies before finishing)."""
        for shard, member in self._due_members(zset_of, now, batch):
            if self._take_due(keys=[zset_of(shard)], args=[member, now, DEADLINE_LEASE_SECONDS]):
                yield shard, member
