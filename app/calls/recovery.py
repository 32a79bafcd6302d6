"""What the reapers do: end held sessions when due, retry failed ends, give up legs whose relay stopped
beating, and end sessions whose create was never followed by a registered leg (invariant I3 in
:mod:`app.calls.scripts`). Every step is atomic in Redis, so any number of reapers may run at once, and
each step stays correct when the worker running it is slow rather than dead.
"""
from __future__ import annotations

import json
import logging
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
PENDING_CREATE_MAX_ATTEMPTS = 5
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
        for session_id in self._take_due_members(self._keys.deadlines(), now, batch):
            taken += 1
            outcome = self.end_session(session_id, EndReason.HOLD_EXPIRED, force=False, now=now)
            # ALREADY with the session not ended means another worker's end is within its lease: the lease
            # deadline stays, so the session is looked at again if that worker dies or stalls.
            if outcome is EndOutcome.LEGS_LIVE or (
                    outcome is EndOutcome.ALREADY and self.session_record(session_id).get("status") == SESSION_ENDED):
                self._redis.zrem(self._keys.deadlines(), session_id)
        return taken

    def expire_lost_legs(self, now: float | None = None, batch: int = 50) -> int:
        """Treat legs whose relay stopped beating as lost abnormally; returns how many were given up.

        The check "still due?" and the end are one script, so a beat (or a restored stream) that lands after
        this pass read the heartbeats wins; a relay that was merely slow revives its leg on its next beat
        while the session is only held (see :data:`app.calls.scripts.BEAT`).
        """
        now = self._clock() if now is None else now
        given_up = 0
        for raw in self._redis.zrangebyscore(self._keys.heartbeats(), "-inf", now, start=0, num=batch):
            carrier, _, call_id = as_text(raw).partition(":")
            if self._give_up_leg(carrier, call_id, now):
                log.warning("%s call=%s relay heartbeat lost", carrier, call_id)
                given_up += 1
        return given_up

    def end_orphaned_creates(self, now: float | None = None, batch: int = 20) -> int:
        """End sessions whose create was never followed by a registered leg; returns how many were taken."""
        now = self._clock() if now is None else now
        taken = 0
        for member in self._take_due_members(self._keys.pending_creates(), now, batch):
            taken += 1
            carrier, _, call_id = member.partition(":")
            raw_intent = self._redis.hget(self._keys.pending_create_data(), member)
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
        if intent["attempts"] >= PENDING_CREATE_MAX_ATTEMPTS or not create_may_have_succeeded(exc):
            log.error("%s orphaned create given up: %s", member, exc)
            self._forget_pending_create(member)
            return
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._keys.pending_create_data(), member, json.dumps(intent))
            pipe.zadd(self._keys.pending_creates(), {member: now + 2 ** intent["attempts"]})
            pipe.execute()

    def _forget_pending_create(self, member: str) -> None:
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.zrem(self._keys.pending_creates(), member)
            pipe.hdel(self._keys.pending_create_data(), member)
            pipe.execute()

    def _take_due_members(self, zset: str, now: float, batch: int) -> Iterator[str]:
        """Members of ``zset`` due by ``now`` that this caller took (their score pushed forward by a lease, so
        no other worker takes them meanwhile, and they come due again if this one dies before finishing)."""
        for raw in self._redis.zrangebyscore(zset, "-inf", now, start=0, num=batch):
            member = as_text(raw)
            if self._take_due(keys=[zset], args=[member, now, DEADLINE_LEASE_SECONDS]):
                yield member
