"""Session lifecycle: correlate carrier call legs with Kallglot sessions in Redis, hold sessions for reconnects,
and end each session exactly once — across workers and instances, and when a worker dies mid-call.

Vendor-free: adapters pass a carrier name (``twilio``, ``telnyx``), the carrier's call ID and whether a leg
ended cleanly. Everything another worker or instance needs lives in Redis; nothing in process memory.

Rules:
- A session ends when its last live leg ends: at once after a clean end (plus the profile's hang-up grace),
  or after the reconnect window when the leg was lost abnormally (socket dropped, relay died, odd hang-up).
- While held, a new call from the same caller to the same number, or a restored media stream, re-attaches.
- Deadlines live in Redis (``deadlines`` zset). Any instance's :class:`~app.calls.reaper.Reaper` may take a
  due one; a lease (the deadline pushed forward atomically) makes exactly one take it, and if that worker
  dies the deadline comes due again.
- Kallglot's ``end`` is called under an atomic claim, so at most one worker calls it per session; a failed
  ``end`` is retried with backoff until it succeeds or Kallglot says the session is gone.
- A relay beats a heartbeat; a leg whose heartbeat expires (worker killed, instance lost) counts as lost.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from enum import Enum
from typing import Any

import redis

from app import metrics
from app.calls import usage
from app.calls.leg_spec import LegSpec
from app.carriers.contract import CarrierError
from app.kallglot.client import KallglotClient, KallglotError, KallglotNotFound, KallglotSession, KallglotUnavailable
from app.redis_keys import (
    CALL_LOG_MAX_ENTRIES, CALL_LOG_RETENTION_SECONDS, MAX_EVENTS_PER_CALL, RECORD_TTL_SECONDS, RedisKeys, as_text,
    as_text_map,
)

log = logging.getLogger(__name__)

LEG_LIVE = "live"
LEG_ENDED = "ended"
SESSION_ACTIVE = "active"
SESSION_HELD = "held"
SESSION_ENDING = "ending"
SESSION_ENDED = "ended"
SESSION_END_FAILED = "end_failed"

#: Before its media stream starts, a leg counts as lost after this long without a heartbeat.
STREAM_START_GRACE_SECONDS = 60
#: A create whose leg is not registered this long after it started is presumed orphaned (worker died).
PENDING_CREATE_GRACE_SECONDS = 30
PENDING_CREATE_MAX_ATTEMPTS = 5
#: A reaper that took a due deadline has this long to finish before another may take it.
DEADLINE_LEASE_SECONDS = 30
#: A worker that claimed a session's end has this long (Kallglot client retries included) before the claim lapses.
END_CLAIM_LEASE_SECONDS = 30
END_RETRY_MAX_BACKOFF_SECONDS = 60

# KEYS: call, session, heartbeats, deadlines. ARGV: leg field, reason, now, heartbeat member, clean ("1"/"0"),
# session id, lease seconds.
# Ends the leg unless it already ended; returns {changed, live legs left} atomically, so exactly one caller
# sees "the last leg just ended". That caller then ends or holds the session; should it die first, the
# safety deadline set here (a lease) makes a reaper finish the job.
_END_LEG = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {-1, 0} end
local changed = 0
if state ~= 'ended' then
  redis.call('HSET', KEYS[1], 'state', 'ended', 'end_reason', ARGV[2], 'ended_at', ARGV[3], 'clean', ARGV[5])
  redis.call('HSET', KEYS[2], ARGV[1], 'ended')
  redis.call('ZREM', KEYS[3], ARGV[4])
  changed = 1
end
local live = 0
local fields = redis.call('HGETALL', KEYS[2])
for i = 1, #fields, 2 do
  if string.sub(fields[i], 1, 4) == 'leg:' and fields[i + 1] == 'live' then live = live + 1 end
end
-- No safety deadline for a session already ended (Kallglot ended it first): nothing is left to finish.
if changed == 1 and live == 0 and redis.call('HGET', KEYS[2], 'status') ~= 'ended' then
  redis.call('ZADD', KEYS[4], tonumber(ARGV[3]) + tonumber(ARGV[7]), ARGV[6])
end
return {changed, live}
"""

# KEYS: end claim, session, deadlines. ARGV: reason, lease seconds, force ("1"/"0"), session id, now.
# Returns 1 when this caller may call Kallglot's end, 0 when the session is ended or another caller holds the
# claim, -1 when a leg is live again (a reconnect won the race) and force is off. The claim is a lease: if its
# holder dies mid-end the claim expires and the safety deadline set here lets a reaper end the session.
_CLAIM_END = """
if redis.call('HGET', KEYS[2], 'status') == 'ended' then return 0 end
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if ARGV[3] ~= '1' then
  local fields = redis.call('HGETALL', KEYS[2])
  for i = 1, #fields, 2 do
    if string.sub(fields[i], 1, 4) == 'leg:' and fields[i + 1] == 'live' then return -1 end
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('HSET', KEYS[2], 'status', 'ending')
redis.call('ZADD', KEYS[3], tonumber(ARGV[5]) + tonumber(ARGV[2]) + 1, ARGV[4])
return 1
"""

# KEYS: end claim, session, call, deadlines, heartbeats, held key ('' when none).
# ARGV: session id, leg field, heartbeat member, heartbeat expiry, now.
# Attaches a (new or returning) leg to a session that is not ended or being ended; 1 on success, else 0.
_ATTACH_LEG = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local status = redis.call('HGET', KEYS[2], 'status')
if status == 'ended' or status == 'ending' then return 0 end
redis.call('HSET', KEYS[2], ARGV[2], 'live', 'status', 'active')
redis.call('HDEL', KEYS[2], 'held_until')
redis.call('ZREM', KEYS[4], ARGV[1])
if KEYS[6] ~= '' then redis.call('DEL', KEYS[6]) end
redis.call('HSET', KEYS[3], 'state', 'live', 'attached_at', ARGV[5])
redis.call('ZADD', KEYS[5], ARGV[4], ARGV[3])
return 1
"""

# KEYS: zset. ARGV: member, now, lease. Takes a due member by pushing its score forward by the lease.
_TAKE_DUE = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], tonumber(ARGV[2]) + tonumber(ARGV[3]), ARGV[1])
return 1
"""


class EndOutcome(str, Enum):
    """What happened to a session when a leg ended or an end was attempted."""

    ENDED = "ended"  # this call ended it at Kallglot
    HELD = "held"  # kept for a reconnect (or the hang-up grace) until its deadline
    ALREADY = "already"  # ended, or being ended, by someone else
    LEGS_LIVE = "legs_live"  # a leg re-attached meanwhile: nothing to end
    FAILED = "failed"  # Kallglot's end failed; retried from the deadlines with backoff


class SessionLifecycle:
    """Correlates call legs with sessions, holds and ends sessions exactly once, across workers and instances."""

    def __init__(self, client: redis.Redis, keys: RedisKeys, kallglot: KallglotClient, *,
                 heartbeat_timeout_seconds: float = 15.0,
                 hang_up: Callable[[str, str], None] | None = None) -> None:
        self._redis = client
        # Hangs up a carrier leg (carrier, call_id): used when one participant's hang-up ends the call.
        self._hang_up = hang_up
        self._keys = keys
        self._kallglot = kallglot
        self.heartbeat_timeout_seconds = heartbeat_timeout_seconds
        self._end_leg = client.register_script(_END_LEG)
        self._claim_end = client.register_script(_CLAIM_END)
        self._attach_leg = client.register_script(_ATTACH_LEG)
        self._take_due = client.register_script(_TAKE_DUE)

    # -- creating sessions --------------------------------------------------------------------------------
    def create_session(self, *, carrier: str, call_id: str, idempotency_key: str,
                       **create_args: Any) -> KallglotSession:
        """Create the Kallglot session for a new leg, leaving a recoverable intent in Redis until it is registered.

        If this worker dies between Kallglot's create and :meth:`register_leg` (or the create timed out after
        Kallglot processed it), a reaper later replays the create with the same idempotency key — Kallglot
        answers with the same session — and ends it, so no session is left running unseen.
        """
        member = _member(carrier, call_id)
        intent = json.dumps({"key": idempotency_key, "args": create_args, "attempts": 0})
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._keys.pending_create_data(), member, intent)
            pipe.zadd(self._keys.pending_creates(), {member: time.time() + PENDING_CREATE_GRACE_SECONDS})
            pipe.execute()
        try:
            return self._kallglot.create_session(idempotency_key=idempotency_key, **create_args)
        except KallglotError as exc:
            # Only a transport failure is ambiguous (Kallglot may have created it); any answer is definitive.
            if not (isinstance(exc, KallglotUnavailable) and exc.status is None):
                self._forget_pending_create(member)
            raise

    def confirm_create(self, carrier: str, call_id: str) -> None:
        """The session created under ``call_id`` is tracked by a registered leg of another ID (outbound calls)."""
        self._forget_pending_create(_member(carrier, call_id))

    def _forget_pending_create(self, member: str) -> None:
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.zrem(self._keys.pending_creates(), member)
            pipe.hdel(self._keys.pending_create_data(), member)
            pipe.execute()

    def end_orphaned_creates(self, now: float | None = None, batch: int = 20) -> int:
        """End sessions whose create was never followed by a registered leg; returns how many were taken."""
        now = time.time() if now is None else now
        taken = 0
        for member in self._take_due_members(self._keys.pending_creates(), now, batch):
            taken += 1
            carrier, _, call_id = member.partition(":")
            raw_intent = self._redis.hget(self._keys.pending_create_data(), member)
            if self.session_for_call(carrier, call_id) or not raw_intent:
                self._forget_pending_create(member)  # registered after all
                continue
            intent = json.loads(raw_intent)
            try:
                session = self._kallglot.create_session(idempotency_key=intent["key"], **intent["args"])
                if self.session_record(session.id):
                    # Registered after all, under another call ID (an outbound leg): not an orphan.
                    self._forget_pending_create(member)
                    continue
                self._kallglot.end_session(session.id)
            except KallglotError as exc:
                intent["attempts"] += 1
                if intent["attempts"] >= PENDING_CREATE_MAX_ATTEMPTS or not isinstance(exc, KallglotUnavailable):
                    log.error("%s call=%s orphaned create given up: %s", carrier, call_id, exc)
                    self._forget_pending_create(member)
                else:
                    with self._redis.pipeline(transaction=True) as pipe:
                        pipe.hset(self._keys.pending_create_data(), member, json.dumps(intent))
                        pipe.zadd(self._keys.pending_creates(), {member: now + 2 ** intent["attempts"]})
                        pipe.execute()
                continue
            self._forget_pending_create(member)
            log.warning("%s call=%s session=%s was created but never registered (worker lost?): ended", carrier,
                        call_id, session.id)
        return taken

    # -- correlation ---------------------------------------------------------------------------------------
    def register_leg(self, leg: LegSpec, *, session_id: str, reattach_from: tuple[str, str] | None = None) -> bool:
        """Attach a live leg to ``session_id``; False if the session is ended or being ended.

        Idempotent: a retried webhook re-registers the same leg. ``reattach_from`` is the (to, from) pair of
        a held session a returning caller re-attaches to, so that hold is released in the same step.
        """
        started = time.time()
        carrier, call_id = leg.carrier, leg.call_id
        call_key, session_key = self._keys.call(carrier, call_id), self._keys.session(session_id)
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(call_key, mapping={"session_id": session_id, "carrier": carrier, "speaker": leg.speaker,
                                         "from": leg.from_number, "to": leg.to_number})
            pipe.hsetnx(call_key, "created_at", f"{started:.3f}")
            pipe.hsetnx(session_key, "status", SESSION_ACTIVE)
            pipe.hsetnx(session_key, "created_at", f"{started:.3f}")
            pipe.hsetnx(session_key, "reconnect_window", str(leg.reconnect_window_seconds))
            pipe.hsetnx(session_key, "hangup_grace", str(leg.hangup_grace_seconds))
            pipe.hsetnx(session_key, "agent_hangup_ends_call", "1" if leg.agent_hangup_ends_call else "0")
            pipe.hset(session_key, mapping={"carrier": carrier, "mode": leg.mode})
            if leg.speaker == "customer":
                pipe.hset(session_key, mapping={"to": leg.to_number, "from": leg.from_number})
            pipe.expire(call_key, RECORD_TTL_SECONDS)
            pipe.expire(session_key, RECORD_TTL_SECONDS)
            pipe.zadd(self._keys.live_sessions(), {session_id: started}, nx=True)
            pipe.zadd(self._keys.recent_calls(), {f"{carrier}:{call_id}": started}, nx=True)
            pipe.zremrangebyscore(self._keys.recent_calls(), 0, started - CALL_LOG_RETENTION_SECONDS)
            pipe.zremrangebyrank(self._keys.recent_calls(), 0, -CALL_LOG_MAX_ENTRIES - 1)
            pipe.zrem(self._keys.pending_creates(), _member(carrier, call_id))
            pipe.hdel(self._keys.pending_create_data(), _member(carrier, call_id))
            pipe.execute()
        held_key = self._keys.held(*reattach_from) if reattach_from else ""
        attached = self._attach_leg(
            keys=[self._keys.session_end_claim(session_id), session_key, call_key, self._keys.deadlines(),
                  self._keys.heartbeats(), held_key],
            args=[session_id, _leg_field(carrier, call_id), _member(carrier, call_id),
                  started + STREAM_START_GRACE_SECONDS, f"{started:.3f}"])
        if attached and reattach_from:
            metrics.SESSIONS_REATTACHED.labels("returning_caller").inc()
        return bool(attached)

    def reattach_leg(self, carrier: str, call_id: str) -> str | None:
        """Make an ended leg live again (its media stream is being restored); returns the session or None."""
        record = self.call_record(carrier, call_id)
        session_id = record.get("session_id")
        if not session_id:
            return None
        now = time.time()
        attached = self._attach_leg(
            keys=[self._keys.session_end_claim(session_id), self._keys.session(session_id),
                  self._keys.call(carrier, call_id), self._keys.deadlines(), self._keys.heartbeats(), ""],
            args=[session_id, _leg_field(carrier, call_id), _member(carrier, call_id),
                  now + STREAM_START_GRACE_SECONDS, f"{now:.3f}"])
        if attached:
            self._redis.hincrby(self._keys.call(carrier, call_id), "stream_restarts", 1)
            metrics.SESSIONS_REATTACHED.labels("stream_restored").inc()
        return session_id if attached else None

    def claim_agent_dial(self, session_id: str) -> bool:
        """True for exactly one caller per session: the one that dials the agent leg."""
        return bool(self._redis.hsetnx(self._keys.session(session_id), "agent_dial", f"{time.time():.3f}"))

    def held_session_for(self, to_number: str, from_number: str) -> str | None:
        """The held session a new call from ``from_number`` to ``to_number`` may re-attach to."""
        return as_text(self._redis.get(self._keys.held(to_number, from_number)))

    def session_for_call(self, carrier: str, call_id: str) -> str | None:
        """The Kallglot session a carrier call leg belongs to, if any."""
        return as_text(self._redis.hget(self._keys.call(carrier, call_id), "session_id"))

    def session_record(self, session_id: str) -> dict[str, str]:
        """Our stored view of a session (status, legs as ``leg:carrier:id``, end reason…)."""
        return as_text_map(self._redis.hgetall(self._keys.session(session_id)))

    def call_record(self, carrier: str, call_id: str) -> dict[str, str]:
        """Our stored view of one call leg."""
        return as_text_map(self._redis.hgetall(self._keys.call(carrier, call_id)))

    def session_legs(self, session_id: str) -> dict[tuple[str, str], str]:
        """``{(carrier, call_id): state}`` for every leg of a session."""
        legs = {}
        for name, state in self.session_record(session_id).items():
            if name.startswith("leg:"):
                carrier, _, call_id = name[4:].partition(":")
                legs[(carrier, call_id)] = state
        return legs

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

    # -- relay heartbeats ----------------------------------------------------------------------------------
    def heartbeat(self, carrier: str, call_id: str) -> None:
        """A relay is alive for this leg; without a beat for ``heartbeat_timeout_seconds`` the leg is lost."""
        # XX: a beat racing the leg's end must not bring the leg back.
        self._redis.zadd(self._keys.heartbeats(),
                         {_member(carrier, call_id): time.time() + self.heartbeat_timeout_seconds}, xx=True)

    # -- ending --------------------------------------------------------------------------------------------
    def leg_ended(self, carrier: str, call_id: str, reason: str, *, clean: bool = True) -> EndOutcome | None:
        """A leg is over: when it was the last live one, end the session now or hold it until its deadline.

        ``clean`` is True for a normal end (the carrier said the call or stream is over) and False for a loss
        (socket dropped without ``stop``, relay died, abnormal hang-up cause), which holds the session for the
        reconnect window. Safe to call any number of times, from any worker, in any order: only the call that
        ends the last live leg acts. Returns what happened, or None when nothing did.
        """
        session_id = self.session_for_call(carrier, call_id)
        if not session_id:
            return None
        now = time.time()
        changed, live = self._end_leg(
            keys=[self._keys.call(carrier, call_id), self._keys.session(session_id), self._keys.heartbeats(),
                  self._keys.deadlines()],
            args=[_leg_field(carrier, call_id), reason, f"{now:.3f}", _member(carrier, call_id),
                  "1" if clean else "0", session_id, DEADLINE_LEASE_SECONDS])
        if changed != 1:
            return None
        log.info("session=%s %s call=%s leg ended (%s, %s), %d live legs left", session_id, carrier, call_id,
                 reason, "clean" if clean else "lost", live)
        session = self.session_record(session_id)
        if live:
            if clean:
                self._hang_up_other_legs(session_id, session, carrier, call_id)
            return None
        window = int(session.get("hangup_grace" if clean else "reconnect_window") or 0)
        if window <= 0:
            return self.end_session(session_id, reason, force=False)
        call = self.call_record(carrier, call_id)
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.zadd(self._keys.deadlines(), {session_id: now + window})  # replaces the safety deadline
            pipe.hset(self._keys.session(session_id),
                      mapping={"status": SESSION_HELD, "held_until": f"{now + window:.3f}", "hold_reason": reason})
            if call.get("speaker") == "customer" and call.get("to") and call.get("from"):
                pipe.set(self._keys.held(call["to"], call["from"]), session_id, ex=max(1, int(window)))
            pipe.execute()
        log.info("session=%s held %ds for a reconnect (%s)", session_id, window, reason)
        metrics.SESSIONS_HELD.inc()
        return EndOutcome.HELD

    def _hang_up_other_legs(self, session_id: str, session: dict[str, str], carrier: str, call_id: str) -> None:
        """The customer hung up (or the agent did, where the profile says so): hang up the other live legs."""
        speaker = as_text(self._redis.hget(self._keys.call(carrier, call_id), "speaker"))
        if speaker != "customer" and not (speaker == "agent" and session.get("agent_hangup_ends_call") == "1"):
            return
        self.hang_up_live_legs(session_id, f"{speaker}_hung_up")

    def end_session(self, session_id: str, reason: str, *, force: bool = True) -> EndOutcome:
        """End ``session_id`` at Kallglot unless it is ended or being ended.

        ``force=False`` (the lifecycle's own automatic ends) also leaves it alone when a leg went live again
        meanwhile; an explicit end (admin, API) uses the default and ends it regardless.
        """
        claim = self._keys.session_end_claim(session_id)
        claimed = self._claim_end(keys=[claim, self._keys.session(session_id), self._keys.deadlines()],
                                  args=[reason, END_CLAIM_LEASE_SECONDS, "1" if force else "0", session_id,
                                        f"{time.time():.3f}"])
        if claimed == 0:
            return EndOutcome.ALREADY
        if claimed == -1:
            return EndOutcome.LEGS_LIVE
        summary: dict[str, Any] = {}
        try:
            summary = self._kallglot.end_session(session_id)
        except KallglotNotFound:
            log.warning("session=%s unknown to Kallglot at end; treating as ended", session_id)
        except KallglotError as exc:
            self._schedule_retry(session_id, claim, exc)
            return EndOutcome.FAILED
        self._mark_ended(session_id, reason)
        if (billed := usage.parse_seconds(summary.get("duration_seconds"))) is not None:  # Kallglot bills this
            usage.record_billed_seconds(self._redis, self._keys, session_id, billed)
        log.info("session=%s ended at Kallglot (%s)", session_id, reason)
        metrics.SESSIONS_ENDED.labels("bridge").inc()
        return EndOutcome.ENDED

    def _schedule_retry(self, session_id: str, claim: str, error: Exception) -> None:
        """Release the claim and put the session back on the deadlines with exponential backoff."""
        key = self._keys.session(session_id)
        attempts = int(self._redis.hincrby(key, "end_attempts", 1))
        metrics.SESSION_END_RETRIES.inc()
        delay = min(END_RETRY_MAX_BACKOFF_SECONDS, 2 ** (attempts - 1))
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(claim)
            pipe.hset(key, mapping={"status": SESSION_END_FAILED, "last_error": str(error)[:200]})
            pipe.zadd(self._keys.deadlines(), {session_id: time.time() + delay})
            pipe.execute()
        log.error("session=%s end failed (attempt %d), retrying in %ds: %s", session_id, attempts, delay, error)

    def hang_up_live_legs(self, session_id: str, reason: str) -> int:
        """Hang up every live leg of a session at its carrier and record their end; returns how many."""
        count = 0
        for (carrier, call_id), state in self.session_legs(session_id).items():
            if state != LEG_LIVE:
                continue
            if self._hang_up is not None:
                try:
                    self._hang_up(carrier, call_id)
                except CarrierError as exc:  # the leg's own status callback or heartbeat will still end it
                    log.error("session=%s could not hang up %s call=%s: %s", session_id, carrier, call_id, exc)
            self.leg_ended(carrier, call_id, reason, clean=True)
            count += 1
        return count

    def ended_by_kallglot(self, session_id: str, reason: str) -> bool:
        """Kallglot ended the session itself: record it so nobody calls ``end``; True the first time."""
        if self._redis.hget(self._keys.session(session_id), "status") in (SESSION_ENDED, SESSION_ENDED.encode()):
            return False
        first = bool(self._redis.set(self._keys.session_end_claim(session_id), f"kallglot:{reason}", nx=True,
                                     ex=RECORD_TTL_SECONDS))
        self._mark_ended(session_id, f"kallglot:{reason}")
        if first:
            metrics.SESSIONS_ENDED.labels("kallglot").inc()
        return first

    def _mark_ended(self, session_id: str, reason: str) -> None:
        with self._redis.pipeline(transaction=True) as pipe:
            # The claim now records the end for good (attaches and ends check it), not a short lease.
            pipe.set(self._keys.session_end_claim(session_id), f"ended:{reason}", ex=RECORD_TTL_SECONDS)
            pipe.hset(self._keys.session(session_id),
                      mapping={"status": SESSION_ENDED, "end_reason": reason, "ended_at": f"{time.time():.3f}"})
            pipe.zrem(self._keys.live_sessions(), session_id)
            pipe.zrem(self._keys.deadlines(), session_id)
            pipe.execute()

    # -- what the reaper does ------------------------------------------------------------------------------
    def end_due_sessions(self, now: float | None = None, batch: int = 50) -> int:
        """End (or retry ending) every session whose deadline passed; returns how many this call took."""
        now = time.time() if now is None else now
        taken = 0
        for session_id in self._take_due_members(self._keys.deadlines(), now, batch):
            taken += 1
            outcome = self.end_session(session_id, "hold_expired", force=False)
            # ALREADY with the session not ended means another worker's end is in flight: its lease deadline
            # stays, so the session is looked at again if that worker dies.
            if outcome is EndOutcome.LEGS_LIVE or (
                    outcome is EndOutcome.ALREADY and self.session_record(session_id).get("status") == SESSION_ENDED):
                self._redis.zrem(self._keys.deadlines(), session_id)
        return taken

    def expire_lost_legs(self, now: float | None = None, batch: int = 50) -> int:
        """Treat legs whose relay stopped beating as lost abnormally; returns how many this call took."""
        now = time.time() if now is None else now
        taken = 0
        for member in self._take_due_members(self._keys.heartbeats(), now, batch):
            taken += 1
            carrier, _, call_id = member.partition(":")
            log.warning("%s call=%s relay heartbeat lost", carrier, call_id)
            self.leg_ended(carrier, call_id, "heartbeat_lost", clean=False)
            self._redis.zrem(self._keys.heartbeats(), member)
        return taken

    def _take_due_members(self, zset: str, now: float, batch: int) -> Iterator[str]:
        """Members of ``zset`` due by ``now`` that this caller took (their score pushed forward by a lease, so
        no other worker takes them meanwhile, and they come due again if this one dies before finishing)."""
        for raw in self._redis.zrangebyscore(zset, "-inf", now, start=0, num=batch):
            member = as_text(raw)
            if self._take_due(keys=[zset], args=[member, now, DEADLINE_LEASE_SECONDS]):
                yield member

    # -- views for the admin UI ----------------------------------------------------------------------------
    def live_sessions(self, limit: int = 500) -> list[dict[str, str]]:
        """Sessions not yet ended (newest first), each with ``id`` and its stored fields (legs as ``leg:*``)."""
        ids = self._redis.zrevrange(self._keys.live_sessions(), 0, limit - 1)
        return [{"id": as_text(sid), **self.session_record(as_text(sid))} for sid in ids]

    def recent_calls(self, limit: int = 100, *, number: str | None = None, since: float | None = None,
                     until: float | None = None) -> list[dict[str, str]]:
        """Recent call legs, newest first, optionally only those to/from ``number`` within [since, until]."""
        members = self._redis.zrevrangebyscore(self._keys.recent_calls(), until if until is not None else "+inf",
                                               since if since is not None else "-inf")
        calls: list[dict[str, str]] = []
        for member in members:
            carrier, _, call_id = as_text(member).partition(":")
            record = self.call_record(carrier, call_id)
            if not record or (number and number not in (record.get("to"), record.get("from"))):
                continue
            calls.append({"call_id": call_id, **record})
            if len(calls) >= limit:
                break
        return calls


def _leg_field(carrier: str, call_id: str) -> str:
    return f"leg:{carrier}:{call_id}"


def _member(carrier: str, call_id: str) -> str:
    return f"{carrier}:{call_id}"

