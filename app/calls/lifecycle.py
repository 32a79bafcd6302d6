"""Session lifecycle: correlate carrier call legs with Kallglot sessions in Redis and end each session once.

Vendor-free: adapters pass a carrier name (``twilio``, ``telnyx``), the carrier's call ID and normalized leg
states. Everything another worker or instance needs lives in Redis; nothing is kept in process memory.

Rules today (the reconnect window and agent legs of the lifecycle issue slot in at :meth:`leg_ended`):
- a session ends when its last live leg ends, whether the carrier or the relay noticed first;
- Kallglot's ``end`` is called by exactly one worker (``SET NX`` claim); if it fails the claim is released
  so the next trigger retries, and the failure is recorded on the session.
"""
from __future__ import annotations

import json
import logging
import time
from enum import Enum
from typing import Any

import redis

from app.kallglot.client import KallglotClient, KallglotError, KallglotNotFound
from app.redis_keys import (
    CALL_LOG_MAX_ENTRIES, CALL_LOG_RETENTION_SECONDS, MAX_EVENTS_PER_CALL, RECORD_TTL_SECONDS, RedisKeys,
)

log = logging.getLogger(__name__)

LEG_LIVE = "live"
LEG_ENDED = "ended"
SESSION_ACTIVE = "active"
SESSION_ENDED = "ended"
SESSION_END_FAILED = "end_failed"

# Moves a leg to "ended" unless it already is; returns 1 when this call made the transition, and whether
# any leg of the session is still live, atomically, so two workers can never both see "last leg".
_END_LEG = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {-1, 0} end
local changed = 0
if state ~= 'ended' then
  redis.call('HSET', KEYS[1], 'state', 'ended', 'end_reason', ARGV[2], 'ended_at', ARGV[3])
  redis.call('HSET', KEYS[2], ARGV[1], 'ended')
  changed = 1
end
local live = 0
local fields = redis.call('HGETALL', KEYS[2])
for i = 1, #fields, 2 do
  if string.sub(fields[i], 1, 4) == 'leg:' and fields[i + 1] == 'live' then live = live + 1 end
end
return {changed, live}
"""


class EndOutcome(str, Enum):
    """What :meth:`SessionLifecycle.end_session` did."""

    ENDED = "ended"  # this call ended it at Kallglot
    ALREADY = "already"  # ended (or being ended) by someone else
    FAILED = "failed"  # Kallglot's end failed; the next trigger retries


class SessionLifecycle:
    """Correlates call legs with sessions and ends sessions exactly once, across workers and instances."""

    def __init__(self, client: redis.Redis, keys: RedisKeys, kallglot: KallglotClient) -> None:
        self._redis = client
        self._keys = keys
        self._kallglot = kallglot
        self._end_leg = client.register_script(_END_LEG)

    # -- correlation ---------------------------------------------------------------------------------------
    def register_leg(self, *, session_id: str, carrier: str, call_id: str, speaker: str, from_number: str,
                     to_number: str, mode: str) -> None:
        """Record a live leg of ``session_id`` (idempotent: a retried webhook re-registers the same leg)."""
        started = time.time()
        now = f"{started:.3f}"
        call_key, session_key = self._keys.call(carrier, call_id), self._keys.session(session_id)
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(call_key, mapping={"session_id": session_id, "carrier": carrier, "speaker": speaker,
                                         "from": from_number, "to": to_number})
            pipe.hsetnx(call_key, "state", LEG_LIVE)
            pipe.hsetnx(call_key, "created_at", now)
            pipe.hsetnx(session_key, "status", SESSION_ACTIVE)
            pipe.hsetnx(session_key, "created_at", now)
            pipe.hset(session_key, mapping={"carrier": carrier, "mode": mode, "to": to_number})
            pipe.hsetnx(session_key, f"leg:{carrier}:{call_id}", LEG_LIVE)
            pipe.expire(call_key, RECORD_TTL_SECONDS)
            pipe.expire(session_key, RECORD_TTL_SECONDS)
            pipe.zadd(self._keys.live_sessions(), {session_id: started}, nx=True)
            pipe.zadd(self._keys.recent_calls(), {f"{carrier}:{call_id}": started}, nx=True)
            pipe.zremrangebyscore(self._keys.recent_calls(), 0, started - CALL_LOG_RETENTION_SECONDS)
            pipe.zremrangebyrank(self._keys.recent_calls(), 0, -CALL_LOG_MAX_ENTRIES - 1)
            pipe.execute()

    def session_for_call(self, carrier: str, call_id: str) -> str | None:
        """The Kallglot session a carrier call leg belongs to, if any."""
        value = self._redis.hget(self._keys.call(carrier, call_id), "session_id")
        return value.decode() if isinstance(value, bytes) else value

    def session_record(self, session_id: str) -> dict[str, str]:
        """Our stored view of a session (status, legs, end reason…)."""
        return _decode(self._redis.hgetall(self._keys.session(session_id)))

    def call_record(self, carrier: str, call_id: str) -> dict[str, str]:
        """Our stored view of one call leg."""
        return _decode(self._redis.hgetall(self._keys.call(carrier, call_id)))

    def record_event(self, carrier: str, call_id: str, source: str, fields: dict[str, Any]) -> None:
        """Append a carrier callback to the leg's capped event list. ``fields`` must hold no secrets."""
        key = self._keys.call_events(carrier, call_id)
        entry = json.dumps({"at": round(time.time(), 3), "source": source, **fields}, sort_keys=True)
        with self._redis.pipeline(transaction=False) as pipe:
            pipe.rpush(key, entry)
            pipe.ltrim(key, -MAX_EVENTS_PER_CALL, -1)
            pipe.expire(key, RECORD_TTL_SECONDS)
            pipe.execute()

    def events(self, carrier: str, call_id: str) -> list[dict[str, Any]]:
        """The recorded callbacks of one leg, oldest first."""
        return [json.loads(e) for e in self._redis.lrange(self._keys.call_events(carrier, call_id), 0, -1)]

    # -- ending --------------------------------------------------------------------------------------------
    def leg_ended(self, carrier: str, call_id: str, reason: str, *, clean: bool = True) -> EndOutcome | None:
        """A leg is over (hang-up, stream stop, relay lost): end the session when no live leg is left.

        ``clean`` is True for a normal end (the carrier said the call or stream is over) and False for a
        loss (socket dropped without ``stop``, abnormal hang-up cause), which the lifecycle may hold for a
        reconnect. Safe to call any number of times, from any worker, in any order. Returns what happened
        to the session, or None when the leg is unknown or other legs are still live.
        """
        session_id = self.session_for_call(carrier, call_id)
        if not session_id:
            return None
        changed, live = self._end_leg(
            keys=[self._keys.call(carrier, call_id), self._keys.session(session_id)],
            args=[f"leg:{carrier}:{call_id}", reason, f"{time.time():.3f}"])
        if changed == -1:
            return None
        if changed:
            log.info("session=%s %s call=%s leg ended (%s), %d live legs left", session_id, carrier, call_id,
                     reason, live)
        if live:
            return None
        return self.end_session(session_id, reason)

    def end_session(self, session_id: str, reason: str) -> EndOutcome:
        """End ``session_id`` at Kallglot unless it is ended or another worker is ending it."""
        claim = self._keys.session_end_claim(session_id)
        if not self._redis.set(claim, reason, nx=True, ex=RECORD_TTL_SECONDS):
            return EndOutcome.ALREADY
        try:
            self._kallglot.end_session(session_id)
        except KallglotNotFound:
            log.warning("session=%s unknown to Kallglot at end; treating as ended", session_id)
        except KallglotError as exc:
            # Release the claim so the next trigger (another callback, the relay) retries.
            self._redis.delete(claim)
            self._redis.hset(self._keys.session(session_id),
                             mapping={"status": SESSION_END_FAILED, "last_error": str(exc)[:200]})
            log.error("session=%s end failed: %s", session_id, exc)
            return EndOutcome.FAILED
        self._mark_ended(session_id, reason)
        log.info("session=%s ended at Kallglot (%s)", session_id, reason)
        return EndOutcome.ENDED

    def ended_by_kallglot(self, session_id: str, reason: str) -> None:
        """Kallglot ended the session itself: record it and make sure nobody calls ``end`` afterwards."""
        self._redis.set(self._keys.session_end_claim(session_id), f"kallglot:{reason}", nx=True,
                        ex=RECORD_TTL_SECONDS)
        self._mark_ended(session_id, f"kallglot:{reason}")

    def _mark_ended(self, session_id: str, reason: str) -> None:
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._keys.session(session_id),
                      mapping={"status": SESSION_ENDED, "end_reason": reason, "ended_at": f"{time.time():.3f}"})
            pipe.zrem(self._keys.live_sessions(), session_id)
            pipe.execute()

    # -- views for the admin UI ----------------------------------------------------------------------------
    def live_sessions(self, limit: int = 500) -> list[dict[str, str]]:
        """Sessions not yet ended (newest first), each with ``id`` and its stored fields (legs as ``leg:*``)."""
        ids = self._redis.zrevrange(self._keys.live_sessions(), 0, limit - 1)
        return [{"id": sid.decode(), **self.session_record(sid.decode())} for sid in ids]

    def recent_calls(self, limit: int = 100, *, number: str | None = None, since: float | None = None,
                     until: float | None = None) -> list[dict[str, str]]:
        """Recent call legs, newest first, optionally only those to/from ``number`` within [since, until]."""
        members = self._redis.zrevrangebyscore(self._keys.recent_calls(), until if until is not None else "+inf",
                                               since if since is not None else "-inf")
        calls: list[dict[str, str]] = []
        for member in members:
            carrier, _, call_id = member.decode().partition(":")
            record = self.call_record(carrier, call_id)
            if not record or (number and number not in (record.get("to"), record.get("from"))):
                continue
            calls.append({"call_id": call_id, **record})
            if len(calls) >= limit:
                break
        return calls


def _decode(raw: dict[Any, Any]) -> dict[str, str]:
    return {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in raw.items()}
